"""Model-free reading of short answers to a question: what an answer adds beyond the question
(``residual``), the candidate it offers, and whether one answer entails another.

``lexicon`` holds the word lists, ``tokens`` the tokeniser (numbers, aliases), ``residual``
the analysis and the implication rules; ``se_ray.judges.residual`` wraps them in the
entailment-judge protocol. Pure Python and numpy: no torch, ray or vllm import.
"""

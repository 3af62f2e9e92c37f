"""The model-free entailment judge: ``se_ray.answers.residual.implication`` behind the judge
protocol of ``se_ray.judges.entailment``, optionally helped by an embedding of the candidates.

Imports numpy and the answer analysis only (no torch, ray or vllm), and not
``se_ray.judges.entailment``, whose ``build_judge`` imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from se_ray.answers.residual import Similarity, analyse, implication

__all__ = ["Embedder", "ResidualJudge"]


class _Query(Protocol):
    # The fields of ``se_ray.judges.entailment.Query``, restated to keep off that import.
    question: str
    premise: str
    hypothesis: str


Embedder = Callable[[list[str]], np.ndarray]


class ResidualJudge:
    """The ``EntailmentJudge`` protocol of ``se_ray.judges.entailment`` over ``implication``.

    ``embed`` (optional) maps texts to L2-normalised rows (e.g. MiniLM mean pooling); the
    residuals of a whole batch are embedded in one call, each text once per judge, and
    their dot product is the similarity. Without it the judge needs no model at all.
    """

    def __init__(self, embed: Embedder | None = None, threshold: float = 0.9):
        self.embed = embed
        self.threshold = threshold
        self.model_calls = 0  # texts embedded
        self._cache: dict[str, np.ndarray] = {}

    def _similarity(self, a: str, b: str) -> float:
        return float(self._cache[a] @ self._cache[b])

    def implications(self, queries: Sequence[_Query]) -> list[int]:
        similarity: Similarity | None = None
        if self.embed is not None:
            texts = {
                analyse(q.question, answer).head_text for q in queries for answer in (q.premise, q.hypothesis)
            }
            missing = sorted(t for t in texts if t and t not in self._cache)
            if missing:
                vectors = np.asarray(self.embed(missing), dtype=np.float32)
                self._cache.update(zip(missing, vectors, strict=True))
                self.model_calls += len(missing)
            similarity = self._similarity
        return [implication(q.question, q.premise, q.hypothesis, similarity, self.threshold) for q in queries]

    def reset_cache(self) -> None:
        self._cache.clear()

"""The three entailment verdicts, in a module that imports nothing.

``se_ray.judges.entailment`` defines the same values; they live here too so that the
model-free judge (``se_ray.answers``, ``se_ray.judges.residual``) can use them without importing
the model judges, whose ``build_judge`` imports the residual judge (an import loop otherwise).
"""

from __future__ import annotations

CONTRADICTION, NEUTRAL, ENTAILMENT = 0, 1, 2

"""`se-ray run`: split, label, sweep τ as a Ray Tune grid of trainings, evaluate, report.

``plan`` is the pure part (split, τ plan, trials, choice of τ, seed aggregation), ``stages`` the
resumable stages around the trials, ``trials`` the Tune grid, ``results`` the report data and
summary, ``job`` the recipe.
"""

from se_ray.run.job import run_job

__all__ = ["run_job"]

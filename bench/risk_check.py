"""Check the certified dial's guarantee on a run's own scored questions, without a model call.

For every model folder of an ``se-ray run`` output that holds both a ``validation/`` and a
``test/`` ``results.parquet`` with score columns (``eval.scores``), the two splits' questions
are pooled and re-split at random ``--splits`` times into calibration (``--calibration-share``)
and test. Each split certifies λ on its calibration part (``se_ray.risk``, the run's
``eval.risk_alpha``, ``eval.risk_delta``, ``eval.risk_p_value`` unless overridden) and measures
the risk "answered and wrong" on its test part. Per model and score it prints one JSON line:
the share of splits whose test risk exceeds α and its standard error sqrt(p(1−p)/splits); the
guarantee asks for a share ≤ δ, within that error. The last line sums it up.

What the guarantee covers is the risk on a new question; the test part's measured risk adds
its own sampling noise (sd about sqrt(α(1−α)/test size)), and drawing calibration and test
without replacement from one pool couples them (a lucky calibration leaves an unlucky test
part). So each line also gives ``pool_exceed_share``: the share of splits whose rule exceeds α
on the whole pool, the finite population both parts are drawn from, which is the quantity the
binomial p-value provably bounds (sampling without replacement only tightens its tail). The
verdict (``ok``) is on the test part, as the issue asks. The re-splits share their questions,
so the standard error is that of the resampling, not of a fresh draw of questions.

``--guarantee test_split`` (default: the run's ``eval.risk_guarantee``) certifies the risk on
the test part itself (``se_ray.risk``, hypergeometric p-value at the test part's size), the
quantity this check measures.

    .venv/bin/python bench/risk_check.py --run out/quickstart
    .venv/bin/python bench/risk_check.py --run out/quickstart --guarantee test_split
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from se_ray import risk
from se_ray.scoring import SCORE_COLUMNS, risk_inputs

SPLITS = ("validation", "test")
RESULTS = "results.parquet"


def scored_models(run: Path) -> dict[str, pa.Table]:
    """Model folder (relative to ``run``) -> its validation and test results, concatenated."""
    found: dict[str, pa.Table] = {}
    for validation in sorted(run.rglob(f"validation/{RESULTS}")):
        folder = validation.parent.parent
        test = folder / "test" / RESULTS
        if not test.is_file():
            continue
        tables = [pq.read_table(validation), pq.read_table(test)]
        if not any(s in tables[0].column_names for s in SCORE_COLUMNS):
            continue
        common = [c for c in tables[0].column_names if c in tables[1].column_names]
        found[str(folder.relative_to(run)) or "."] = pa.concat_tables([t.select(common) for t in tables])
    return found


def check_score(
    data: dict[str, list],
    alpha: float,
    delta: float,
    splits: int,
    calibration_share: float,
    seed: int,
    p_value: risk.PValue = "binomial",
    guarantee: risk.Guarantee = "population",
) -> dict[str, Any]:
    """The share of random calibration/test splits whose test risk exceeds α."""
    scores = np.asarray(data["scores"], dtype=float)
    wrong = np.asarray(data["wrong"], dtype=bool)
    gives = np.asarray(data["gives_answer"], dtype=bool)
    n = len(scores)
    n_cal = int(round(n * calibration_share))
    if n_cal < 1 or n - n_cal < 1:
        raise ValueError(f"{n} questions cannot be split {calibration_share:g} into calibration and test")
    test_size = n - n_cal if guarantee == "test_split" else None
    rng = np.random.default_rng(seed)
    exceed = pool_exceed = certified = 0
    engagement = []
    for _ in range(splits):
        order = rng.permutation(n)
        cal, test = order[:n_cal], order[n_cal:]
        cert = risk.certify_threshold(scores[cal], wrong[cal], alpha, delta, gives[cal], p_value, test_size)
        outcome = risk.rule_outcome(scores[test], wrong[test], cert.lam, gives[test])
        exceed += outcome["risk"] > alpha
        pool_exceed += risk.rule_outcome(scores, wrong, cert.lam, gives)["risk"] > alpha
        certified += cert.certified
        engagement.append(outcome["engagement"])
    share, pool_share = exceed / splits, pool_exceed / splits
    se = math.sqrt(share * (1 - share) / splits)
    return {
        "questions": n,
        "calibration": n_cal,
        "test": n - n_cal,
        "splits": splits,
        "alpha": alpha,
        "delta": delta,
        "guarantee": guarantee,
        "exceed_share": share,
        "exceed_se": se,
        "pool_exceed_share": pool_share,
        "pool_exceed_se": math.sqrt(pool_share * (1 - pool_share) / splits),
        "certified_share": certified / splits,
        "test_engagement_mean": float(np.mean(engagement)),
        "ok": share <= delta + 2 * se,
    }


def run_config(run: Path) -> dict[str, Any]:
    path = run / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}).get("eval", {}) if path.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="an se-ray run's output folder")
    parser.add_argument("--splits", type=int, default=500)
    parser.add_argument("--calibration-share", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, help="default: the run's eval.risk_alpha (0.15)")
    parser.add_argument("--delta", type=float, help="default: the run's eval.risk_delta (0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--guarantee",
        choices=["population", "test_split"],
        help="default: the run's eval.risk_guarantee (population)",
    )
    args = parser.parse_args(argv)
    cfg = run_config(args.run)
    alpha = args.alpha if args.alpha is not None else float(cfg.get("risk_alpha", 0.15))
    delta = args.delta if args.delta is not None else float(cfg.get("risk_delta", 0.1))
    p_value = cfg.get("risk_p_value", "binomial")
    guarantee = args.guarantee or cfg.get("risk_guarantee", "population")
    models = scored_models(args.run)
    checked = []
    for model, table in models.items():
        for score in (s for s in SCORE_COLUMNS if s in table.column_names):
            data = risk_inputs(table, score)
            row = check_score(
                data, alpha, delta, args.splits, args.calibration_share, args.seed, p_value, guarantee
            )
            checked.append({"model": model, "score": score, **row})
            print(json.dumps(checked[-1]))
    if not checked:
        print(f"risk_check: FAIL: no model folder under {args.run} has scored validation and test results")
        return 1
    bad = [f"{c['model']}:{c['score']}" for c in checked if not c["ok"]]
    worst = max(checked, key=lambda c: c["exceed_share"])
    verdict = "OK" if not bad else f"FAIL ({', '.join(bad)})"
    print(
        f"risk_check: {verdict} (guarantee {guarantee}): {len(checked) - len(bad)} of {len(checked)} "
        "model/score pairs have "
        f"test risk > α = {alpha:g} in at most δ = {delta:g} of {args.splits} splits (+2 SE); worst "
        f"{worst['exceed_share']:.3f} ± {worst['exceed_se']:.3f} ({worst['model']}:{worst['score']}; "
        f"on the whole pool {worst['pool_exceed_share']:.3f})"
    )
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())

"""The quickstart recipe over several seeds: is the abstention effect more than one lucky draw?

Each seed k runs `se-ray run --config jobs/configs/quickstart.yaml` with the split, the
sampling engine and the training seeded by k (its own train/validation/test questions), one
after the other, each in its own output folder (a rerun reuses every finished stage), with the
OOD sets of ``--ood`` (default: the two shipped ``se_ray/demo/ood_*.jsonl``) as named splits.
Then, for the test split and each OOD set separately, it prints per method (untuned, the tuned
methods, the random abstainer at SE's rate, the teacher where the run has one) the mean over
seeds and a 95% t interval over seeds (clipped to [0, 1] for shares and AED) of AED, the run's
question-level bootstrap interval of AED (per seed: each seed has its own test questions),
accuracy, engagement, correct / incorrect / abstained, the share of the untuned-to-oracle gap
closed; on the test split, of the questions the untuned model got right, the share the tuned
model still answers and still gets right (question by question); the incorrect answers
avoided; abstention on questions about things that do not exist; and whether each method's AED
is never worse than the untuned model's (every seed, and the mean). It appends one JSON line to
bench/results.jsonl.

    .venv/bin/python bench/abstention_study.py --seeds 3 --output out/study
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "quickstart.yaml"
SE_RAY = str(Path(sys.executable).with_name("se-ray"))
# two-sided 95% t quantiles by degrees of freedom (scipy is not a dependency)
DEFAULT_OOD = ("elements=se_ray/demo/ood_elements.jsonl", "us_states=se_ray/demo/ood_us_abbreviations.jsonl")
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def run_seed(seed: int, output: Path, extra: list[str]) -> dict[str, Any]:
    overrides = [f"split.seed={seed}", f"train.seed={seed}", f"sampling.seed={seed}", *extra]
    cmd = [SE_RAY, "run", "--config", str(CONFIG), "--output", str(output)]
    for o in overrides:
        cmd += ["--set", o]
    started = time.perf_counter()
    print(f"seed {seed}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"seed {seed} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1]}")
    summary = json.loads(proc.stdout)
    summary["study_wall_s"] = round(time.perf_counter() - started, 1)
    return summary


def _share_of_untuned_right(method: str, kept: dict[str, dict[str, int]], field: str) -> float:
    """Question by question, of those the untuned model got right: the share ``method`` still
    answers or still gets right (the run's ``knowledge_boundary.retention``); NaN if unknown."""
    if method == "untuned":
        return 1.0
    k = kept.get(method)
    return k[field] / k["untuned_right"] if k and k["untuned_right"] else math.nan


def _study_splits(methods: list[dict[str, Any]]) -> list[str]:
    """test, ood, then each named OOD set (``ood_<name>``), as the untuned model was evaluated on them."""
    untuned = next(m for m in methods if m["method"] == "untuned")["splits"]
    return [s for s in ("test", "ood") if s in untuned] + [s for s in untuned if s.startswith("ood_")]


def _method_scores(t: dict[str, Any], untuned: dict[str, Any], kept: dict[str, Any], method: str) -> dict:
    wrong_untuned = untuned["incorrect_mean"]
    unanswerable = t.get("unanswerable") or 0
    low, high = t.get("aed_ci95") or (None, None)
    return {
        "aed": t["aed_mean"],
        # the run's 95% percentile bootstrap over this seed's questions (inside [0, 1] by construction)
        "aed_boot_low": math.nan if low is None else low,
        "aed_boot_high": math.nan if high is None else high,
        "accuracy": t["accuracy_mean"],
        "engagement": t["engagement_mean"],
        "correct": t["correct_mean"],
        "incorrect": t["incorrect_mean"],
        "abstained": t["abstained_mean"],
        "gap_closed": math.nan if t.get("gap_closed") is None else t["gap_closed"],
        "answered_untuned_right": _share_of_untuned_right(method, kept, "answered"),
        "still_right_untuned_right": _share_of_untuned_right(method, kept, "still_right"),
        "incorrect_avoided": 1 - t["incorrect_mean"] / wrong_untuned if wrong_untuned else math.nan,
        "unanswerable_abstained": (
            t.get("unanswerable_abstained_mean", math.nan) / unanswerable if unanswerable else math.nan
        ),
    }


def split_scores(output: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Per split (test and each OOD set), per method, the numbers of its chosen model (first seed
    of the run). Question-by-question retention is the run's, on the test split only."""
    data = json.loads((output / "report_data.json").read_text())
    methods = data["methods"]
    kept_test = data.get("knowledge_boundary", {}).get("retention", {})
    out: dict[str, dict[str, dict[str, float]]] = {}
    for split in _study_splits(methods):
        untuned = next(m for m in methods if m["method"] == "untuned")["splits"][split]
        kept = kept_test if split == "test" else {}
        out[split] = {
            m["method"]: _method_scores(m["splits"][split], untuned, kept, m["method"])
            for m in methods
            if split in m["splits"]
        }
    return out


# Shares and AED lie in [0, 1]; a t interval over 3 seeds easily reaches past either end.
UNBOUNDED = frozenset({"gap_closed", "correct", "incorrect", "abstained"})


def interval(values: list[float], bounded: bool = True) -> tuple[float, float, float]:
    """Mean and a 95% t interval over seeds (NaN values left out), clipped to [0, 1] when bounded."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    low, high = mean - half, mean + half
    return (mean, max(0.0, low), min(1.0, high)) if bounded else (mean, low, high)


def never_worse(per_seed: list[dict[str, dict[str, dict[str, float]]]], split: str) -> dict[str, Any]:
    """Per method other than the untuned model: is its AED at most the untuned model's on ``split``,
    in every seed and in the mean over seeds?"""
    out = {}
    methods = [m for m in per_seed[0].get(split, {}) if m != "untuned"]
    for method in methods:
        pairs = [
            (s[split][method]["aed"], s[split]["untuned"]["aed"])
            for s in per_seed
            if method in s.get(split, {})
        ]
        out[method] = {
            "every_seed": all(a <= u + 1e-12 for a, u in pairs),
            "mean": statistics.fmean(a for a, _ in pairs) <= statistics.fmean(u for _, u in pairs) + 1e-12,
            "aed_vs_untuned": [[round(a, 4), round(u, 4)] for a, u in pairs],
        }
    return out


def print_split(split: str, per_seed: list[dict[str, dict[str, dict[str, float]]]]) -> dict[str, Any]:
    """The table of one split (mean [95% interval over seeds]) and its never-worse check."""
    methods = list(per_seed[0][split])
    metrics = [k for k in per_seed[0][split][methods[0]] if not k.startswith("aed_boot")]
    rows = {}
    print(f"\n{split}: mean [95% t interval over seeds, clipped to [0, 1] for shares and AED]")
    print("| method | " + " | ".join(metrics) + " | AED bootstrap 95% per seed |")
    print("|---" * (len(metrics) + 2) + "|")
    for method in methods:
        values = {k: [s[split][method][k] for s in per_seed if method in s[split]] for k in metrics}
        cells = {k: interval(v, k not in UNBOUNDED) for k, v in values.items()}
        rows[method] = cells
        boot = [
            (seed[split][method]["aed_boot_low"], seed[split][method]["aed_boot_high"])
            for seed in per_seed
            if method in seed[split]
        ]
        cells_boot = ", ".join(f"[{lo:.3f}, {hi:.3f}]" for lo, hi in boot)
        print(
            f"| {method} | "
            + " | ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in cells.values())
            + f" | {cells_boot} |"
        )
    check = never_worse(per_seed, split)
    for method, c in check.items():
        verdict = "yes" if c["every_seed"] else ("in the mean only" if c["mean"] else "NO")
        print(
            f"never worse than untuned on {split}: {method}: {verdict} "
            f"(AED vs untuned per seed: {c['aed_vs_untuned']})"
        )
    return {"summary": rows, "never_worse": check}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--output", default="out/study")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra config override")
    parser.add_argument(
        "--ood",
        action="append",
        default=None,
        metavar="NAME=FILE",
        help=f"an OOD set to report (split.ood_inputs; repeatable; default: {', '.join(DEFAULT_OOD)}; "
        "--ood none for the config's own)",
    )
    args = parser.parse_args(argv)
    ood = DEFAULT_OOD if args.ood is None else [o for o in args.ood if o != "none"]
    extra = [f"split.ood_inputs.{o}" for o in ood] + args.extra
    root = (REPO / args.output).resolve()
    per_seed, walls = [], []
    for seed in range(args.seeds):
        summary = run_seed(seed, root / f"seed{seed}", extra)
        walls.append(summary["study_wall_s"])
        per_seed.append(split_scores(root / f"seed{seed}"))
    print(f"\n{args.seeds} seeds of {CONFIG.relative_to(REPO)}")
    splits = {split: print_split(split, per_seed) for split in per_seed[0]}
    print(f"wall per seed: {', '.join(f'{w:.0f} s' for w in walls)}")
    record = {
        "bench": "abstention_study",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.processor() or platform.machine(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip(),
        "seeds": args.seeds,
        "overrides": extra,
        "per_seed": per_seed,
        "summary": {split: s["summary"] for split, s in splits.items()},
        "never_worse": {split: s["never_worse"] for split, s in splits.items()},
        "wall_s": walls,
    }
    with open(REPO / "bench" / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

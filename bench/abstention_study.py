"""The quickstart recipe over several seeds: is the abstention effect more than one lucky draw?

Each seed k runs `se-ray run --config jobs/configs/quickstart.yaml` with the split, the
sampling engine and the training seeded by k (its own train/validation/test questions), one
after the other, each in its own output folder (a rerun reuses every finished stage). Then
it prints, per method, the mean and a 95% interval over seeds (t distribution) of the test
AED, accuracy, engagement, the share of the untuned-to-oracle gap closed; of the questions
the untuned model got right, the share the tuned model still answers and the share it still
gets right (question by question); the incorrect answers avoided; and the abstention rate on
questions about things that do not exist. It appends one JSON line to bench/results.jsonl.

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


def test_scores(output: Path) -> dict[str, dict[str, float]]:
    """Per method, the test-split numbers of its chosen model (first seed of the run)."""
    data = json.loads((output / "report_data.json").read_text())
    out = {}
    untuned = next(m for m in data["methods"] if m["method"] == "untuned")["splits"]["test"]
    wrong_untuned = untuned["incorrect_mean"]
    kept = data.get("knowledge_boundary", {}).get("retention", {})
    for m in data["methods"]:
        t = m["splits"]["test"]
        unanswerable = t.get("unanswerable") or 0
        out[m["method"]] = {
            "aed": t["aed_mean"],
            "accuracy": t["accuracy_mean"],
            "engagement": t["engagement_mean"],
            "gap_closed": math.nan if t.get("gap_closed") is None else t["gap_closed"],
            "answered_untuned_right": _share_of_untuned_right(m["method"], kept, "answered"),
            "still_right_untuned_right": _share_of_untuned_right(m["method"], kept, "still_right"),
            "incorrect_avoided": 1 - t["incorrect_mean"] / wrong_untuned if wrong_untuned else math.nan,
            "unanswerable_abstained": (
                t.get("unanswerable_abstained_mean", math.nan) / unanswerable if unanswerable else math.nan
            ),
        }
    return out


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and a 95% t interval over seeds (NaN values left out)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--output", default="out/study")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra config override")
    args = parser.parse_args(argv)
    root = (REPO / args.output).resolve()
    per_seed, walls = [], []
    for seed in range(args.seeds):
        summary = run_seed(seed, root / f"seed{seed}", args.extra)
        walls.append(summary["study_wall_s"])
        per_seed.append(test_scores(root / f"seed{seed}"))
    metrics = list(next(iter(per_seed[0].values())))
    rows = {}
    print(f"\n{args.seeds} seeds of {CONFIG.relative_to(REPO)}; test split; mean [95% interval over seeds]")
    print("| method | " + " | ".join(metrics) + " |")
    print("|---" * (len(metrics) + 1) + "|")
    for method in per_seed[0]:
        cells = {k: interval([s[method][k] for s in per_seed]) for k in metrics}
        rows[method] = cells
        print(
            f"| {method} | "
            + " | ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in cells.values())
            + " |"
        )
    print(f"wall per seed: {', '.join(f'{w:.0f} s' for w in walls)}")
    record = {
        "bench": "abstention_study",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.processor() or platform.machine(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip(),
        "seeds": args.seeds,
        "overrides": args.extra,
        "per_seed": per_seed,
        "summary": rows,
        "wall_s": walls,
    }
    with open(REPO / "bench" / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

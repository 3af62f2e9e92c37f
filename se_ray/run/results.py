"""What a finished run found: the report data (``report_data.json``, rendered by ``se_ray.report``)
and the summary (``summary.json``, the CLI's output)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

from se_ray.config import JobConfig
from se_ray.report import SPLIT_TITLES, MethodData, ReportData, render_report
from se_ray.run.plan import SPLITS, SweepPoint
from se_ray.run.stages import StageLog
from se_ray.storage import Store, is_uri, write_bytes_atomic

REPORT_DATA_FILE = "report_data.json"
SUMMARY_FILE = "summary.json"


@dataclass
class RunOutcome:
    """Everything the report shows, gathered while the run goes."""

    split_sizes: dict[str, int]
    methods: list[MethodData]
    sweep: dict[str, list[SweepPoint]]
    adaptation_split: str
    train_entropies: list[float]
    notes: list[str]


def judge_label(cfg: JobConfig) -> str:
    e = cfg.eval
    if e.judge == "llm":
        return f"llm ({e.judge_model or cfg.sampling.model})"
    if e.judge == "f1":
        return f"f1 (max SQuAD F1 ≥ {e.f1_threshold:g})"
    if e.judge == "contains":
        return "contains (a reference occurs as whole tokens, no hedging)"
    return "exact (normalised match or containment)"


def _setup(cfg: JobConfig, split_sizes: dict[str, int]) -> dict[str, Any]:
    t = cfg.train
    return {
        "model": cfg.sampling.model,
        "answer style": cfg.sampling.answer_style,
        "samples per question (M)": cfg.sampling.num_samples,
        "entailment": f"{cfg.entailment.judge} ({cfg.entailment.model or cfg.sampling.model})",
        "judge": judge_label(cfg),
        "split (train / validation / test / OOD)": " / ".join(str(split_sizes[s]) for s in SPLITS),
        "τ grid": ", ".join(f"{tau:g}" for tau in cfg.sweep.taus),
        "seeds": cfg.sweep.seeds,
        "training": f"{t.method}, {t.epochs} epochs, lr {t.learning_rate:g}, "
        f"{t.num_workers} workers, ZeRO-{t.zero_stage}",
    }


def report_data(cfg: JobConfig, outcome: RunOutcome) -> ReportData:
    return {
        "title": "se-ray run: abstention fine-tuning with semantic entropy",
        "setup": _setup(cfg, outcome.split_sizes),
        "methods": outcome.methods,
        "sweep": {m: [p.to_report() for p in points] for m, points in outcome.sweep.items()},
        "adaptation_split": outcome.adaptation_split,
        "train_scores": {"semantic_entropy": outcome.train_entropies},
        "taus": list(cfg.sweep.taus),
        "chosen_tau": {m["method"]: m["chosen_tau"] for m in outcome.methods if m["chosen_tau"] is not None},
        "notes": outcome.notes,
    }


def split_title(split: str) -> str:
    return SPLIT_TITLES.get(split, split)


def publish_report(data: ReportData, out: Store) -> dict[str, str]:
    """``report.md`` and the PNGs into ``out``; returns their locations by name."""
    if not is_uri(out.location):
        return render_report(data, out.path)
    with tempfile.TemporaryDirectory(prefix="se-ray-report-") as tmp:
        local = render_report(data, tmp)
        paths = {}
        for name, path in local.items():
            with open(path, "rb") as f:
                write_bytes_atomic(out.fs, out.file(os.path.basename(path)), f.read())
            paths[name] = out.uri(os.path.basename(path))
        return paths


def run_summary(
    out: Store, paths: dict[str, str], log: StageLog, methods: list[MethodData], wall_s: float
) -> dict[str, Any]:
    """``summary.json``: where the report is, what each stage did, and each method's AED per split."""
    return {
        "output": out.location,
        "report": paths.get("report"),
        "figures": {k: v for k, v in paths.items() if k != "report"},
        "stages": log.to_dict(),
        "methods": {
            m["method"]: {
                "chosen_tau": m["chosen_tau"],
                "seeds": m["seeds"],
                **{
                    f"{s}_{k}": v[k]
                    for s, v in m["splits"].items()
                    for k in ("aed_mean", "aed_sd", "aed_ci95")
                },
            }
            for m in methods
        },
        "wall_s": round(wall_s, 2),
    }

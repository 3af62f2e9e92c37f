"""What a finished run found: the report data (``report_data.json``, rendered by ``se_ray.report``)
and the summary (``summary.json``, the CLI's output)."""

from __future__ import annotations

import os
import re
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from se_ray import columns as col
from se_ray import metrics
from se_ray.config import JobConfig, TrainConfig
from se_ray.evaluate import AnswerFlags
from se_ray.report import METHOD_LABELS, MethodData, ReportData, render_report
from se_ray.report import split_title as report_split_title
from se_ray.run.plan import SPLITS, UNTUNED, SweepPoint
from se_ray.run.stages import StageLog
from se_ray.scoring import TEACHER  # semantic entropy at inference: the tuned models' reference
from se_ray.storage import Store, is_uri, write_bytes_atomic
from se_ray.train.selection import SELECT_LAST

REPORT_DATA_FILE = "report_data.json"
RANDOM_AT_RATE = "random_at_rate"  # the random abstainer at the SE-tuned model's rate
RATE_OF = "semantic_entropy"  # whose abstention rate the random abstainer takes
BAND = "band"  # optional question field: its popularity band, e.g. "q1 (most popular)"
BOUNDARY_SPLIT = "test"  # the split the knowledge boundary and the judge audit show


@dataclass
class RunOutcome:
    """Everything the report shows, gathered while the run goes."""

    split_sizes: dict[str, int]
    methods: list[MethodData]
    sweep: dict[str, list[SweepPoint]]
    adaptation_split: str
    train_entropies: list[float]
    notes: list[str]
    bands: list[dict[str, Any]] = field(default_factory=list)  # band_table on the test split
    agreement: dict[str, dict[str, Any]] = field(default_factory=dict)  # vs the teacher, on the test split
    retention: dict[str, dict[str, int]] = field(default_factory=dict)  # on the test split
    judge_audit: dict[str, Any] | None = None  # the untuned model's on the test split
    score_diagnostics: dict[str, Any] | None = None  # the label stage's


def unanswerable_scores(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Abstention on questions about things that do not exist, over one method's seeds (evaluation
    summaries): how many there are and the mean number abstained on (None when there are none)."""
    total = summaries[0].get("unanswerable") or 0
    abstained = [s.get("unanswerable_abstained") or 0 for s in summaries]
    return {
        "unanswerable": total,
        "unanswerable_abstained_mean": float(statistics.fmean(abstained)) if total else None,
    }


def gap_closed(untuned_aed: float, method_aed: float, oracle_aed: float) -> float | None:
    """The share of the untuned-to-oracle AED gap a method closes; None when there is no gap."""
    gap = untuned_aed - oracle_aed
    if abs(gap) < 1e-12:
        return None
    return (untuned_aed - method_aed) / gap


def oracle_scores(untuned: Mapping[str, Any]) -> dict[str, Any]:
    """The oracle abstainer of one split (from the untuned model's aggregated scores): it answers
    exactly what the untuned model gets right and abstains on the rest."""
    n = int(untuned["num_questions"])
    correct = round(untuned["correct_mean"])
    return {
        "aed": metrics.oracle_aed(n, correct),
        "accuracy": correct / n,
        "engagement": correct / n,
        "correct": correct,
        "incorrect": 0,
        "abstained": n - correct,
        "num_questions": n,
    }


def with_oracle(methods: list[MethodData]) -> tuple[list[MethodData], dict[str, dict[str, Any]]]:
    """The oracle per split the untuned model was evaluated on, and the methods with ``gap_closed``."""
    untuned = next((m["splits"] for m in methods if m["method"] == UNTUNED), {})
    oracle = {split: oracle_scores(s) for split, s in untuned.items()}
    out: list[MethodData] = []
    for m in methods:
        splits = {
            split: {
                **s,
                "gap_closed": gap_closed(untuned[split]["aed_mean"], s["aed_mean"], oracle[split]["aed"]),
            }
            if split in oracle
            else s
            for split, s in m["splits"].items()
        }
        out.append({**m, "splits": splits})
    return out, oracle


def random_at_rate_scores(untuned: Mapping[str, Any], tuned: Mapping[str, Any]) -> dict[str, Any]:
    """One split's random abstainer: the untuned model's answers (its counts) with as many
    abstentions, drawn at random, as the tuned model's mean; expected counts and AED (exact)."""
    n = int(untuned["num_questions"])
    rate = min(1.0, max(0.0, tuned["abstained_mean"] / n))
    correct, incorrect = round(untuned["correct_mean"]), round(untuned["incorrect_mean"])
    r = metrics.random_abstainer_counts(n, correct, incorrect, rate)
    d = r.to_dict()
    return {
        "num_questions": n,
        **{f"{k}_mean": d[k] for k in ("aed", "accuracy", "engagement", "correct", "incorrect", "abstained")},
        "rate": rate,
        "aed_of_expected_counts": r.aed_of_expected_counts,
    }


def with_random_abstainer(methods: list[MethodData]) -> list[MethodData]:
    """The methods with the random abstainer at the SE-tuned model's rate right after it, on every
    split both it and the untuned model were evaluated on (unchanged when either is missing)."""
    untuned = next((m for m in methods if m["method"] == UNTUNED), None)
    tuned = next((m for m in methods if m["method"] == RATE_OF), None)
    if untuned is None or tuned is None:
        return methods
    splits = {
        split: random_at_rate_scores(untuned["splits"][split], s)
        for split, s in tuned["splits"].items()
        if split in untuned["splits"]
    }
    entry: MethodData = {
        "method": RANDOM_AT_RATE,
        "label": METHOD_LABELS[RANDOM_AT_RATE],
        "chosen_tau": None,
        "seeds": tuned["seeds"],
        "splits": splits,
    }
    at = methods.index(tuned) + 1
    return [*methods[:at], entry, *methods[at:]]


def agreement(flags: Mapping[str, AnswerFlags], reference: str = TEACHER) -> dict[str, dict[str, Any]]:
    """Per method (not the untuned model nor ``reference``): how its abstentions agree with the
    reference's, question by question (every question both answered, unanswerable ones too):
    Cohen's kappa and the 2x2 counts. {} when the reference was not evaluated."""
    ref = flags.get(reference)
    if ref is None:
        return {}
    ref_abstained = dict(zip(ref.ids, ref.abstained, strict=True))
    out = {}
    for method, f in flags.items():
        if method in (UNTUNED, reference):
            continue
        pairs = [
            (bool(a), bool(ref_abstained[i]))
            for i, a in zip(f.ids, f.abstained, strict=True)
            if i in ref_abstained
        ]
        if not pairs:
            continue
        out[method] = {
            "reference": reference,
            "n": len(pairs),
            "kappa": metrics.cohens_kappa([a for a, _ in pairs], [b for _, b in pairs]),
            "both_abstained": sum(a and b for a, b in pairs),
            "only_method_abstained": sum(a and not b for a, b in pairs),
            "only_reference_abstained": sum(b and not a for a, b in pairs),
            "neither_abstained": sum(not a and not b for a, b in pairs),
        }
    return out


def _band_order(band: str) -> list[Any]:
    # Natural order, so "q2" comes before "q10".
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", band)]


def _band_scores(flags: AnswerFlags, band_of: Mapping[str, str], band: str) -> dict[str, Any]:
    picked = [
        (a, c)
        for i, a, c in zip(flags.ids, flags.abstained, flags.correct, strict=True)
        if band_of.get(i) == band
    ]
    n = len(picked)
    correct = sum(bool(c) for _, c in picked)
    abstained = sum(bool(a) for a, _ in picked)
    return {
        "n": n,
        "correct": correct,
        "abstained": abstained,
        "accuracy": correct / n if n else None,
        "abstention": abstained / n if n else None,
    }


def band_table(rows: Sequence[Mapping[str, Any]], flags: Mapping[str, AnswerFlags]) -> list[dict[str, Any]]:
    """Per popularity band of the answerable ``rows`` (bands in natural order: "q1 (most popular)"
    first), each model's counts and shares from its per-question flags; [] when no row has a band."""
    band_of = {r[col.ID]: str(r[BAND]) for r in rows if r.get(BAND) and col.is_answerable(r)}
    bands = sorted(set(band_of.values()), key=_band_order)
    return [
        {
            "band": band,
            "n": sum(b == band for b in band_of.values()),
            "models": {method: _band_scores(f, band_of, band) for method, f in flags.items()},
        }
        for band in bands
    ]


def retention(flags: Mapping[str, AnswerFlags]) -> dict[str, dict[str, int]]:
    """Per tuned method: of the questions the untuned model got right, how many it still
    answers (does not abstain on) and how many it still gets right, question by question."""
    untuned = flags.get(UNTUNED)
    if untuned is None:
        return {}
    right = {i for i, c in zip(untuned.ids, untuned.correct, strict=True) if c}
    out = {}
    for method, f in flags.items():
        if method == UNTUNED:
            continue
        on_right = [(a, c) for i, a, c in zip(f.ids, f.abstained, f.correct, strict=True) if i in right]
        out[method] = {
            "untuned_right": len(right),
            "answered": sum(not a for a, _ in on_right),
            "still_right": sum(bool(c) for _, c in on_right),
        }
    return out


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
        "entailment": cfg.entailment.judge
        if cfg.entailment.judge == "residual"  # model-free
        else f"{cfg.entailment.judge} ({cfg.entailment.model or cfg.sampling.model})",
        "judge": judge_label(cfg),
        "split (train / validation / test / OOD)": " / ".join(str(split_sizes.get(s, 0)) for s in SPLITS),
        **{f"OOD set {s.removeprefix('ood_')}": split_sizes[s] for s in split_sizes if s.startswith("ood_")},
        "τ grid": ", ".join(f"{tau:g}" for tau in cfg.sweep.taus),
        "seeds": cfg.sweep.seeds,
        "training": f"{t.method}, {t.epochs} epochs, lr {t.learning_rate:g}, "
        f"{t.num_workers} workers, ZeRO-{t.zero_stage}" + _selection_setup(t),
    }


def _selection_setup(t: TrainConfig) -> str:
    if t.select_checkpoint == SELECT_LAST:
        return ""
    every = f"every {t.select_every_steps} steps and " if t.select_every_steps else ""
    return (
        f"; exported: the step ({every}each epoch's end) whose validation abstention rate is "
        "closest to the training labels'"
    )


def report_data(cfg: JobConfig, outcome: RunOutcome) -> ReportData:
    methods, oracle = with_oracle(with_random_abstainer(outcome.methods))
    data: ReportData = {
        "title": "se-ray run: abstention fine-tuning with semantic entropy",
        "setup": _setup(cfg, outcome.split_sizes),
        "methods": methods,
        "oracle": oracle,
        "sweep": {m: [p.to_report() for p in points] for m, points in outcome.sweep.items()},
        "adaptation_split": outcome.adaptation_split,
        "train_scores": {"semantic_entropy": outcome.train_entropies},
        "taus": list(cfg.sweep.taus),
        "chosen_tau": {m["method"]: m["chosen_tau"] for m in outcome.methods if m["chosen_tau"] is not None},
        "notes": outcome.notes,
        "judge_audit": outcome.judge_audit,
        "score_diagnostics": outcome.score_diagnostics,
    }
    if outcome.bands or outcome.retention or outcome.agreement:
        data["knowledge_boundary"] = {
            "split": BOUNDARY_SPLIT,
            "bands": outcome.bands,
            "retention": outcome.retention,
        }
        if outcome.agreement:
            data["knowledge_boundary"]["agreement"] = outcome.agreement
    return data


def split_title(split: str) -> str:
    return report_split_title(split)


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


SUMMARY_SPLIT_KEYS = (
    "aed_mean",
    "aed_sd",
    "aed_ci95",
    "gap_closed",
    "unanswerable",
    "unanswerable_abstained_mean",
)


def run_summary(
    out: Store, paths: dict[str, str], log: StageLog, data: ReportData, wall_s: float
) -> dict[str, Any]:
    """``summary.json``: where the report is, what each stage did, each method's AED per split (and
    the share of the oracle gap it closes, its abstention on unanswerable questions), the oracle's
    and the random abstainer's (at SE's rate, expected) AED per split and the labeller diagnostics."""
    return {
        "output": out.location,
        "report": paths.get("report"),
        "figures": {k: v for k, v in paths.items() if k != "report"},
        "stages": log.to_dict(),
        "methods": {
            m["method"]: {
                "chosen_tau": m["chosen_tau"],
                "seeds": m["seeds"],
                **{f"{s}_{k}": v[k] for s, v in m["splits"].items() for k in SUMMARY_SPLIT_KEYS if k in v},
            }
            for m in data.get("methods") or []
            if m["method"] != RANDOM_AT_RATE
        },
        "oracle": {s: o["aed"] for s, o in (data.get("oracle") or {}).items()},
        RANDOM_AT_RATE: {
            s: v["aed_mean"]
            for m in data.get("methods") or []
            if m["method"] == RANDOM_AT_RATE
            for s, v in m["splits"].items()
        },
        "score_diagnostics": data.get("score_diagnostics"),
        "wall_s": round(wall_s, 2),
    }

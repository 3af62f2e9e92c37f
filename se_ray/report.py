"""The run report: ``report.md`` and its PNG figures, rendered from one plain ``ReportData`` dict.

``se-ray run`` assembles it from its stage summaries (``se_ray.run.results.report_data``) and keeps
it as ``report_data.json``; rendering is a pure function of it (matplotlib's Agg canvas, no pyplot
state), so a report can be re-rendered, or tested, from a hand-made dict.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, TypedDict

from se_ray.report_risk import risk_section
from se_ray.report_sections import (
    KNOWLEDGE_PNG,
    ORACLE_NOTE,
    RANDOM_NOTE,
    abstention_by_band_section,
    band_section,
    canvas,
    diagnostics_section,
    judge_audit_section,
    method_table,
    num,
    plot_knowledge_boundary,
    retention_section,
    tau,
)

REPORT_FILE = "report.md"
ADAPTATION_PNG = "adaptation.png"
AED_PNG = "aed_by_method.png"
HISTOGRAM_PNG = "se_histogram.png"

SPLIT_TITLES = {
    "test": "in-distribution test split",
    "ood": "out-of-distribution set",
    "validation": "in-distribution validation split",
}
OOD_PREFIX = "ood_"  # a named OOD set's split: ood_<name> (split.ood_inputs)


def split_title(split: str) -> str:
    """A split's title: "in-distribution test split", "out-of-distribution set `elements`"."""
    if split.startswith(OOD_PREFIX):
        return f"out-of-distribution set `{split.removeprefix(OOD_PREFIX)}`"
    return SPLIT_TITLES.get(split, split)


def report_splits(methods: Sequence[dict[str, Any]]) -> list[str]:
    """The splits the method tables show, in order: test, ood, then each named OOD set."""
    present = list(dict.fromkeys(s for m in methods for s in (m.get("splits") or {})))
    fixed = [s for s in ("test", "ood") if s in present]
    return fixed + [s for s in present if s.startswith(OOD_PREFIX)]


METHOD_LABELS = {
    "untuned": "Untuned",
    "semantic_entropy": "SE",
    "random_at_rate": "Random abstainer at the SE-tuned model's rate",
    "exact_entropy": "R-Tuning-U",
    "r_tuning": "R-Tuning",
    "teacher": "Teacher (SE at inference, the SE method's τ)",
}


class PointScores(TypedDict):
    """One model on one split."""

    aed: float
    correct: int
    incorrect: int
    abstained: int
    num_questions: int


class SweepPointData(TypedDict, total=False):
    """One τ of a method (τ None for R-Tuning and the untuned model); a key per split it was
    evaluated on (``validation``, ``test``, ``ood``) holds its ``PointScores``."""

    tau: float | None
    trial: str
    digest: str
    validation: PointScores
    test: PointScores
    ood: PointScores


class MethodData(TypedDict):
    """A row of the AED tables. ``splits`` maps ``test``/``ood`` to the scores aggregated over the
    seeds: ``num_questions``, ``<score>_mean`` and ``<score>_sd`` (aed, accuracy, engagement,
    correct, incorrect, abstained), ``<metric>_ci95`` ([low, high] of the mean); optionally
    ``gap_closed`` (share of the untuned-to-oracle AED gap, None when there is none),
    ``unanswerable`` (questions about things that do not exist) and ``unanswerable_abstained_mean``."""

    method: str
    label: str
    chosen_tau: float | None
    seeds: int
    splits: dict[str, dict[str, Any]]


class ReportData(TypedDict, total=False):
    title: str
    setup: dict[str, Any]  # shown as key/value pairs at the top
    methods: list[MethodData]  # in table order
    sweep: dict[str, list[SweepPointData]]  # method -> every τ of the grid
    adaptation_split: str  # the split the adaptation plot shows (the paper: out of distribution)
    train_scores: dict[str, list[float]]  # score name -> the training set's values (histogram)
    taus: list[float]
    chosen_tau: dict[str, float]  # method -> chosen τ, marked on the histogram
    notes: list[str]
    # split -> the oracle abstainer: aed, accuracy, engagement, correct, incorrect, abstained, num_questions
    oracle: dict[str, dict[str, Any]]
    # {"split", "bands": [{"band", "n", "models": {method: {n, correct, abstained, accuracy, abstention}}}],
    #  "retention": {method: {untuned_right, answered, still_right}}}
    knowledge_boundary: dict[str, Any]
    judge_audit: dict[str, Any] | None  # the untuned model's on the test split (evaluate's judge_audit)
    risk: dict[str, Any]  # the certified dials (se_ray.run.dial; with eval.scores)
    score_diagnostics: dict[str, Any] | None  # the label stage's: AUROC/AURAC of each score


_COLORS = {
    "semantic_entropy": "tab:blue",
    "exact_entropy": "tab:orange",
    "r_tuning": "tab:green",
    "untuned": "black",
}


def _sweep_table(sweep: dict[str, list[dict[str, Any]]], labels: dict[str, str], split: str) -> list[str]:
    points = [p for ps in sweep.values() for p in ps]
    present = list(dict.fromkeys(k for p in points for k in p))
    splits = [s for s in ("validation", "test", "ood") if s in present]
    splits += [s for s in present if s.startswith(OOD_PREFIX)]
    short = {"validation": "validation", "test": "test", "ood": "OOD"}
    short |= {s: f"OOD {s.removeprefix(OOD_PREFIX)}" for s in splits if s.startswith(OOD_PREFIX)}
    lines = [
        f"### Every τ (first seed): AED per split; counts on the {split_title(split)}",
        "",
        "| method | τ | "
        + " | ".join(f"AED {short[s]}" for s in splits)
        + " | correct | incorrect | abstained "
        "| trial |",
        "|---|---|" + "---|" * len(splits) + "---|---|---|---|",
    ]
    for method, ps in sweep.items():
        for p in ps:
            counts = p.get(split) or {}
            lines.append(
                f"| {labels.get(method, method)} | {tau(p.get('tau'))} | "
                + " | ".join(num((p.get(s) or {}).get("aed")) for s in splits)
                + f" | {num(counts.get('correct'))} | {num(counts.get('incorrect'))} | "
                f"{num(counts.get('abstained'))} | {p.get('trial') or '–'} |"
            )
    return [*lines, ""]


def plot_adaptation(
    sweep: dict[str, list[dict[str, Any]]], labels: dict[str, str], split: str, path: str
) -> None:
    """Incorrect (x) vs correct (y) answers, one point per τ per method (the paper's Fig. 3)."""
    fig = canvas(6.5, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    total = None
    for method, all_points in sweep.items():
        points = [p for p in all_points if p.get(split)]
        if not points:
            continue
        total = total or points[0][split].get("num_questions")
        xs = [p[split]["incorrect"] for p in points]
        ys = [p[split]["correct"] for p in points]
        color = _COLORS.get(method)
        marker = "*" if method == "untuned" else ("s" if method == "r_tuning" else "o")
        size = 14 if marker == "*" else 7
        line = "-" if len(points) > 1 else "none"
        ax.plot(
            xs,
            ys,
            marker=marker,
            markersize=size,
            linestyle=line,
            alpha=0.8,
            color=color,
            label=labels.get(method, method),
        )
        for p, x, y in zip(points, xs, ys, strict=True):
            if p.get("tau") is not None:
                ax.annotate(f"τ={p['tau']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if total:
        ax.plot(
            [0],
            [total],
            marker="P",
            markersize=10,
            color="gold",
            markeredgecolor="black",
            linestyle="none",
            label="ideal (0 incorrect, all correct)",
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("incorrect answers (I)")
    ax.set_ylabel("correct answers (C)")
    ax.set_title(f"Adaptation: one point per τ ({split_title(split)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_aed_by_method(methods: list[dict[str, Any]], path: str) -> None:
    """AED per method (mean over seeds) with its 95% bootstrap interval, one bar per split."""
    import numpy as np

    splits = report_splits(methods)
    fig = canvas(max(5.0, 1.4 * len(methods) + 2), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(splits))
    x = np.arange(len(methods))
    for k, split in enumerate(splits):
        means, lows, highs = [], [], []
        for m in methods:
            s = (m.get("splits") or {}).get(split) or {}
            mean = s.get("aed_mean")
            ci = s.get("aed_ci95") or [None, None]
            means.append(np.nan if mean is None else mean)
            ok = mean is not None and None not in ci and not any(math.isnan(c) for c in ci)
            lows.append(max(0.0, mean - ci[0]) if ok else 0.0)
            highs.append(max(0.0, ci[1] - mean) if ok else 0.0)
        ax.bar(
            x + (k - (len(splits) - 1) / 2) * width,
            means,
            width,
            yerr=[lows, highs],
            capsize=4,
            label=split_title(split),
            alpha=0.85,
        )
    ax.axhline(1 / math.sqrt(2), color="grey", linestyle=":", linewidth=1, label="always abstain (0.707)")
    ax.set_xticks(x, [m["label"] for m in methods])
    ax.set_ylabel("AED (lower is better)")
    ax.set_title("AED by method (mean over seeds, 95% bootstrap CI)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_histogram(
    values: Sequence[float],
    taus: Sequence[float],
    chosen: float | None,
    path: str,
    score: str = "semantic entropy",
) -> None:
    """The training set's scores, the τ grid (dotted) and the chosen τ (solid)."""
    import numpy as np

    fig = canvas(6.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    data = np.asarray([v for v in values if v is not None], dtype=float)
    top = max([2.31, *taus, *(data.tolist() or [0.0])]) + 0.05
    ax.hist(data, bins=np.linspace(0.0, top, 32), color="tab:blue", alpha=0.8, edgecolor="white")
    for t in taus:
        ax.axvline(t, color="grey", linestyle=":", linewidth=1)
    if chosen is not None:
        ax.axvline(chosen, color="tab:red", linewidth=2, label=f"chosen τ = {chosen:g}")
        ax.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"{score} (nats); abstain when > τ")
    ax.set_ylabel("training questions")
    ax.set_title(f"Training-set {score} ({len(data)} questions)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _header(data: ReportData) -> list[str]:
    lines = [f"# {data.get('title', 'se-ray run')}", ""]
    setup = data.get("setup") or {}
    if setup:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in setup.items()]
        lines.append("")
    lines += [
        "AED = sqrt((I² + (|D| − C)²) / (2·|D|²)) (Tjandra et al. 2024): 1 − accuracy for a model that "
        "never abstains, 0.707 for one that always abstains. Accuracy = C/|D|, engagement = answered/|D|. "
        "Intervals: 95% percentile bootstrap over questions (of the mean over seeds).",
        "",
    ]
    if data.get("oracle"):
        lines += [ORACLE_NOTE, ""]
    if any(m.get("method") == "random_at_rate" for m in data.get("methods") or []):
        lines += [RANDOM_NOTE, ""]
    return lines


def _headline(data: ReportData, labels: dict[str, str], folder: str, paths: dict[str, str]) -> list[str]:
    """The method tables, the chosen τ and the knowledge boundary (table and figure)."""
    methods = data.get("methods") or []
    oracle = data.get("oracle") or {}
    lines: list[str] = []
    for s in report_splits(methods):
        lines += method_table(methods, s, split_title(s), oracle.get(s))
    chosen = {m["method"]: m.get("chosen_tau") for m in methods if m.get("chosen_tau") is not None}
    if chosen:
        lines += [
            "Chosen τ (lowest validation AED): "
            + ", ".join(f"{labels.get(k, k)} τ = {v:g}" for k, v in chosen.items()),
            "",
        ]
    boundary = data.get("knowledge_boundary") or {}
    title = SPLIT_TITLES.get(boundary.get("split", "test"), "test")
    lines += retention_section(boundary, labels, title)
    lines += abstention_by_band_section(boundary, labels, title)
    if boundary.get("bands"):
        lines += band_section(boundary, labels, title)
        paths["knowledge_boundary"] = os.path.join(folder, KNOWLEDGE_PNG)
        plot_knowledge_boundary(boundary["bands"], labels, title, paths["knowledge_boundary"])
    return lines


def render_report(data: ReportData, folder: str) -> dict[str, str]:
    """Write ``report.md`` and the PNGs into the local ``folder``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    methods = data.get("methods") or []
    sweep = data.get("sweep") or {}
    labels = {**METHOD_LABELS, **{m["method"]: m["label"] for m in methods}}
    split = data.get("adaptation_split", "validation")
    paths = {"report": os.path.join(folder, REPORT_FILE)}
    lines = _header(data) + _headline(data, labels, folder, paths)
    if any(sweep.values()):
        lines += _sweep_table(sweep, labels, split)
        paths["adaptation"] = os.path.join(folder, ADAPTATION_PNG)
        plot_adaptation(sweep, labels, split, paths["adaptation"])
        lines += [f"![adaptation plot]({ADAPTATION_PNG})", ""]
    if any(m.get("splits") for m in methods):
        paths["aed"] = os.path.join(folder, AED_PNG)
        plot_aed_by_method(methods, paths["aed"])
        lines += [f"![AED by method]({AED_PNG})", ""]
    scores = (data.get("train_scores") or {}).get("semantic_entropy")
    if scores:
        paths["histogram"] = os.path.join(folder, HISTOGRAM_PNG)
        plot_histogram(
            scores,
            data.get("taus") or [],
            (data.get("chosen_tau") or {}).get("semantic_entropy"),
            paths["histogram"],
        )
        lines += [f"![semantic entropy of the training set]({HISTOGRAM_PNG})", ""]
    lines += risk_section(data.get("risk"), labels, folder)
    lines += diagnostics_section(data.get("score_diagnostics"))
    lines += judge_audit_section(data.get("judge_audit"), SPLIT_TITLES["test"])
    notes = data.get("notes") or []
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    with open(paths["report"], "w") as f:
        f.write("\n".join(lines))
    return paths


__all__ = [
    "METHOD_LABELS",
    "SPLIT_TITLES",
    "report_splits",
    "split_title",
    "MethodData",
    "PointScores",
    "ReportData",
    "SweepPointData",
    "plot_adaptation",
    "plot_aed_by_method",
    "plot_histogram",
    "plot_knowledge_boundary",
    "render_report",
]

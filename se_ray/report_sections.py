"""Sections of the run report beyond the sweep and its plots: the method table (with the oracle
abstainer, the share of the untuned-to-oracle gap each method closes, and abstention on questions
about things that do not exist), accuracy and abstention by popularity band (with its figure), the
judge audit and the labeller diagnostics.

Each takes the plain dicts of ``report_data.json`` and returns Markdown lines; ``se_ray.report``
assembles them. Nothing here imports ``se_ray.report``: it imports the formatting helpers from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

ORACLE_LABEL = "Oracle (abstains where untuned is wrong)"
KNOWLEDGE_PNG = "knowledge_boundary.png"
SCORE_LABELS = {
    "semantic_entropy": "discrete semantic entropy (SE's labels)",
    "regular_semantic_entropy": "regular semantic entropy (token probabilities)",
    "exact_entropy": "exact-string entropy (R-Tuning-U's labels)",
}
JUDGE_LABELS = {
    "contains": "contains (a reference occurs as whole tokens)",
    "f1": "f1 (max SQuAD F1 ≥ threshold)",
    "exact": "exact (normalised match)",
}


def missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def num(value: Any, digits: int = 3) -> str:
    if missing(value):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def share(value: float | None) -> str:
    return "–" if missing(value) else f"{value:.0%}"


def tau(value: Any) -> str:
    return "–" if value is None else f"{value:g}"


def cell(value: Any, limit: int = 160) -> str:
    """A Markdown table cell: no pipes or line breaks, long text cut."""
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def mean_sd(scores: dict[str, Any], name: str, digits: int = 3) -> str:
    mean, sd = scores.get(f"{name}_mean"), scores.get(f"{name}_sd")
    if missing(sd):
        return num(mean, digits)
    return f"{num(mean, digits)} ± {num(sd, digits)}"


def interval(ci: Sequence[float] | None) -> str:
    if not ci or any(missing(c) for c in ci):
        return "–"
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def canvas(width: float, height: float):
    """A matplotlib figure on the Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _gap(s: dict[str, Any]) -> str:
    if "gap_closed" not in s:
        return "–"
    return "n/a" if s["gap_closed"] is None else share(s["gap_closed"])


def _unanswerable(s: dict[str, Any]) -> str:
    total, mean = s.get("unanswerable") or 0, s.get("unanswerable_abstained_mean")
    if not total or missing(mean):
        return "–"
    return f"{num(mean, 0 if float(mean).is_integer() else 1)} of {total}"


def _oracle_row(oracle: dict[str, Any], extra: list[str]) -> str:
    return (
        f"| {ORACLE_LABEL} | – | – | {num(oracle['aed'])} | – | {num(oracle['accuracy'])} | "
        f"{num(oracle['engagement'])} | {oracle['correct']} | 0 | {oracle['abstained']} | "
        + " | ".join(extra)
        + " |"
    )


def method_table(
    methods: list[dict[str, Any]], split: str, title: str, oracle: dict[str, Any] | None = None
) -> list[str]:
    """AED and counts per method on one split; the oracle's row and the gap column when the
    untuned model's oracle is known, the unanswerable column when the split holds such questions."""
    rows = [m for m in methods if split in (m.get("splits") or {})]
    if not rows:
        return []
    n = rows[0]["splits"][split].get("num_questions")
    unanswerable = max(m["splits"][split].get("unanswerable") or 0 for m in rows)
    gap = oracle is not None or any("gap_closed" in m["splits"][split] for m in rows)
    extra_heads = (["gap closed"] if gap else []) + (["abstained on unanswerable"] if unanswerable else [])
    lines = [
        f"### AED on the {title} ({n} questions; lower is better)",
        "",
        "| method | τ | seeds | AED (mean ± s.d.) | AED 95% CI | accuracy | engagement "
        "| correct | incorrect | abstained |" + "".join(f" {h} |" for h in extra_heads),
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra_heads),
    ]
    for m in rows:
        s = m["splits"][split]
        extra = ([_gap(s)] if gap else []) + ([_unanswerable(s)] if unanswerable else [])
        lines.append(
            f"| {m['label']} | {tau(m.get('chosen_tau'))} | {m.get('seeds', 1)} | {mean_sd(s, 'aed')} | "
            f"{interval(s.get('aed_ci95'))} | {mean_sd(s, 'accuracy')} | {mean_sd(s, 'engagement')} | "
            f"{num(s.get('correct_mean'), 1)} | {num(s.get('incorrect_mean'), 1)} | "
            f"{num(s.get('abstained_mean'), 1)} |" + "".join(f" {c} |" for c in extra)
        )
    if oracle is not None:
        lines.append(_oracle_row(oracle, (["100%"] if gap else []) + (["–"] if unanswerable else [])))
    lines.append("")
    if unanswerable:
        lines += [
            f"Abstained on unanswerable: of the {unanswerable} questions about things that do not exist, "
            "how many the model abstained on (mean over seeds); AED leaves them out.",
            "",
        ]
    return lines


ORACLE_NOTE = (
    "Oracle: abstains exactly where the untuned model is wrong and answers the rest as it does: "
    "AED = (1 − untuned accuracy)/√2. Gap closed = (AED untuned − AED method) / (AED untuned − AED "
    "oracle): 0% is no better than the untuned model, 100% as good as the oracle (n/a when the untuned "
    "model makes no mistake)."
)


def band_section(boundary: dict[str, Any], labels: dict[str, str], title: str) -> list[str]:
    """Accuracy and abstention per popularity band, for the untuned model and each method."""
    bands = boundary.get("bands") or []
    if not bands:
        return []
    models = list(dict.fromkeys(m for b in bands for m in b["models"]))
    heads = [f"{labels.get(m, m)} {what}" for m in models for what in ("correct", "abstained")]
    lines = [
        f"### Accuracy and abstention by popularity band ({title}; first seed of each method)",
        "",
        "| band | n | " + " | ".join(heads) + " |",
        "|---|---|" + "---|" * len(heads),
    ]
    for b in bands:
        cells = []
        for m in models:
            s = b["models"].get(m) or {}
            cells += [
                f"{share(s.get('accuracy'))} ({num(s.get('correct'))})",
                f"{share(s.get('abstention'))} ({num(s.get('abstained'))})",
            ]
        lines.append(f"| {cell(b['band'])} | {b['n']} | " + " | ".join(cells) + " |")
    return [*lines, "", f"![knowledge boundary]({KNOWLEDGE_PNG})", ""]


RANDOM_NOTE = (
    "Random abstainer at the SE-tuned model's rate: the untuned model's answers with k = round(r·|D|) of "
    "them, drawn uniformly at random, replaced by abstentions (r: the SE-tuned model's abstention rate, "
    "mean over seeds). Its counts and AED are expectations over the draw, computed exactly, not sampled "
    "(so no interval); a method that abstains *where* it does not know beats it at the same rate."
)


def _kappa_line(agreement: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    lines = []
    for method, a in agreement.items():
        reference = labels.get(a["reference"], a["reference"])
        lines.append(
            f"{labels.get(method, method)} vs {reference}, abstention question by question ({a['n']} "
            f"questions): Cohen's κ = {num(a['kappa'], 2)}; both abstained {a['both_abstained']}, only "
            f"{labels.get(method, method)} {a['only_method_abstained']}, only {reference} "
            f"{a['only_reference_abstained']}, neither {a['neither_abstained']}."
        )
    return [*lines, ""] if lines else []


def abstention_by_band_section(boundary: dict[str, Any], labels: dict[str, str], title: str) -> list[str]:
    """Per band: the untuned model's accuracy beside each other model's abstention (the tuned
    models', the teacher's where it was evaluated), and the agreement with the teacher (κ)."""
    bands = boundary.get("bands") or []
    models = [m for m in dict.fromkeys(m for b in bands for m in b["models"]) if m != "untuned"]
    lines: list[str] = []
    if bands and models:
        heads = [f"{labels.get(m, m)} abstained" for m in models]
        lines += [
            f"### Does abstention follow what the untuned model knows? ({title}; first seed)",
            "",
            "| band | n | untuned correct | " + " | ".join(heads) + " |",
            "|---|---|---|" + "---|" * len(heads),
        ]
        for b in bands:
            u = b["models"].get("untuned") or {}
            cells = [share((b["models"].get(m) or {}).get("abstention")) for m in models]
            first = f"| {cell(b['band'])} | {b['n']} | {share(u.get('accuracy'))} | "
            lines.append(first + " | ".join(cells) + " |")
        lines.append("")
    return lines + _kappa_line(boundary.get("agreement") or {}, labels)


def retention_section(boundary: dict[str, Any], labels: dict[str, str], title: str) -> list[str]:
    """Question by question: of what the untuned model got right, what each method still answers."""
    kept = boundary.get("retention") or {}
    if not kept:
        return []
    lines = [
        f"### What each method kept of the untuned model's right answers ({title}; first seed)",
        "",
        "| method | untuned right | still answered | still right |",
        "|---|---|---|---|",
    ]
    for method, k in kept.items():
        n = k["untuned_right"]
        lines.append(
            f"| {labels.get(method, method)} | {n} | {share(k['answered'] / n if n else None)} "
            f"({k['answered']}) | {share(k['still_right'] / n if n else None)} ({k['still_right']}) |"
        )
    return [*lines, ""]


def boundary_method(bands: list[dict[str, Any]]) -> str | None:
    """The tuned method the figure shows: SE, else the first tuned one there is."""
    models = list(dict.fromkeys(m for b in bands for m in b["models"] if m != "untuned"))
    return "semantic_entropy" if "semantic_entropy" in models else (models[0] if models else None)


def plot_knowledge_boundary(
    bands: list[dict[str, Any]], labels: dict[str, str], title: str, path: str
) -> None:
    """Per band (most to least popular): untuned correct, the method's correct and abstained shares."""
    import numpy as np

    method = boundary_method(bands)
    series = [("untuned", "accuracy", "correct", "0.45", None)]
    if method:
        series += [
            (method, "accuracy", "correct", "tab:blue", None),
            (method, "abstention", "abstained", "lightskyblue", "//"),
        ]
    fig = canvas(max(6.5, 1.3 * len(bands) + 2.5), 4.4)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    x = np.arange(len(bands))
    for k, (model, key, what, color, hatch) in enumerate(series):
        ys = [(b["models"].get(model) or {}).get(key) for b in bands]
        ax.bar(
            x + (k - (len(series) - 1) / 2) * width,
            [np.nan if missing(y) else y for y in ys],
            width,
            color=color,
            hatch=hatch,
            edgecolor="white" if hatch is None else "tab:blue",
            label=f"{labels.get(model, model)} {what}",
        )
    ax.set_xticks(x, [f"{b['band']}\nn = {b['n']}" for b in bands], fontsize=8)
    ax.set_ylim(0, 1.15)  # headroom: the legend sits above the bars
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xlabel("popularity band (most → least popular)")
    ax.set_ylabel("share of the band's questions")
    ax.set_title(f"Knowledge boundary ({title})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=len(series))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _verdict(value: Any) -> str:
    return "–" if value is None else ("yes" if value else "no")


def _example_row(example: dict[str, Any], judges: list[str]) -> str:
    references = cell("; ".join(example.get("references") or []))
    verdicts = " | ".join(_verdict(example.get(j)) for j in judges)
    return f"| {cell(example['question'])} | {cell(example['answer'])} | {references} | {verdicts} |"


def judge_audit_section(audit: dict[str, Any] | None, title: str) -> list[str]:
    """How many of the untuned model's answers each model-free judge calls correct, and examples
    of answers they disagree on."""
    if not audit or not audit.get("answered"):
        return []
    answered, correct = audit["answered"], audit.get("correct") or {}
    lines = [
        f"## Judge audit (untuned model, {title})",
        "",
        f"Of the {answered} answers the untuned model gave (abstentions aside), each model-free judge "
        "calls correct:",
        "",
        "| judge | called correct | share |",
        "|---|---|---|",
        *[f"| {JUDGE_LABELS.get(j, j)} | {n} | {share(n / answered)} |" for j, n in correct.items()],
        "",
        f"They disagree on {audit.get('disagreements', 0)} answers.",
        "",
    ]
    examples = audit.get("examples") or []
    if examples:
        judges = list(correct)
        lines += [
            "| question | answer | references | " + " | ".join(judges) + " |",
            "|---|---|---|" + "---|" * len(judges),
            *[_example_row(e, judges) for e in examples[:3]],
            "",
        ]
    return lines


def diagnostics_section(diagnostics: dict[str, Any] | None) -> list[str]:
    """The label stage's check: how well each score predicts that the training target is wrong."""
    if not diagnostics or not diagnostics.get("judged"):
        return []
    judged, wrong = diagnostics["judged"], diagnostics.get("standard_wrong", 0)
    lines = [
        "## Does the entropy predict wrong answers?",
        "",
        f"Before any training: on the {judged} training questions with references, the "
        f"`{diagnostics.get('judge')}` judge finds the standard answer (T = 0.1, the training target "
        f"when the model is confident) wrong on {wrong} ({share(wrong / judged)}). AUROC: the chance that "
        "a wrong answer scores higher than a right one (0.5 is chance, 1 perfect). AURAC: the area under "
        "the accuracy of the answers kept as those above the q-quantile of the score are rejected (q from "
        "0.1 to 1, as the reference code computes it); higher is better.",
        "",
        "| score | AUROC | AURAC |",
        "|---|---|---|",
    ]
    for score, label in SCORE_LABELS.items():
        s = diagnostics.get(score)
        if isinstance(s, dict):
            lines.append(f"| {label} | {num(s.get('auroc'))} | {num(s.get('aurac'))} |")
    return [*lines, ""]

"""The report's certified-dial section: per scored model and score, the λ certified on the
validation split at (α, δ) and, on the test split, its measured risk, engagement and AED beside
the uncertified λ (lowest validation AED) and the oracle λ chosen on test; the τ sweep's
certified τ; one PNG per dial of risk and engagement against λ with α marked.

Takes the plain dict ``report_data.json`` holds under ``risk`` (``se_ray.run.dial``).
"""

from __future__ import annotations

import os
from typing import Any

from se_ray.report_sections import canvas, cell, num, share

SCORE_TITLES = {
    "se_score": "semantic entropy of the model's samples",
    "abstain_logprob": "log-probability of the abstention text",
}
GUARANTEE = (
    "Guarantee: with probability ≥ 1 − δ over the draw of the calibration (validation) questions, "
    "the share of *all* questions answered wrongly by the certified rule is ≤ α on new questions "
    "exchangeable with them (marginal over questions, not per question; abstentions cost nothing). "
    "Not guaranteed: anything on questions of another kind (OOD), the accuracy of the answered ones, "
    "or the measured risk of one finite test split."
)
GUARANTEE_TEST_SPLIT = (
    "Guarantee (eval.risk_guarantee = test_split): with probability ≥ 1 − δ over the random split "
    "of one pool into the calibration (validation) and test questions, the share of the *test* "
    "questions answered wrongly by the certified rule is ≤ α (abstentions cost nothing). Not "
    "guaranteed: anything on other questions (new ones, OOD), or the accuracy of the answered ones."
)


def risk_png(dial: dict[str, Any]) -> str:
    return f"risk_{dial['model']}_{dial['score']}.png"


def _outcome(o: dict[str, Any] | None) -> str:
    if not o:
        return "– | – | –"
    return f"{num(o.get('risk'))} | {share(o.get('engagement'))} | {num(o.get('aed'))}"


def _lam(value: Any) -> str:
    return "none (abstain on all)" if value is None else f"{value:.4g}"


def _dial_rows(dials: list[dict[str, Any]], labels: dict[str, str]) -> list[str]:
    lines = [
        "| model | score | n | certified λ | engagement (validation) | test risk | test engagement "
        "| test AED | uncertified λ | its test risk | engagement | AED "
        "| oracle λ | its test risk | engagement | AED |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in dials:
        unc, oracle = d.get("uncertified") or {}, d.get("oracle") or {}
        model, score = (
            cell(labels.get(d["model"], d["model"])),
            cell(SCORE_TITLES.get(d["score"], d["score"])),
        )
        lines.append(
            f"| {model} | {score} | {d['n']} | {_lam(d['lam'])} | {share(d['engagement'])} "
            f"| {_outcome(d.get('test'))} | {_lam(unc.get('lambda'))} | {_outcome(unc)} "
            f"| {_lam(oracle.get('lambda'))} | {_outcome(oracle)} |"
        )
    return lines


def _sweep_rows(sweep: dict[str, Any]) -> list[str]:
    lines = [
        f"The τ sweep (SE-tuned models, first seed; {sweep['correction']} over {len(sweep['models'])} "
        f"models): {cell(sweep['message'])}.",
        "",
        "| model | validation risk | validation engagement | p-value | certified | test risk "
        "| test engagement |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in sweep["models"]:
        t = m.get("test") or {}
        lines.append(
            f"| {cell(m['name'])} | {num(m['risk'])} | {share(m['engagement'])} | {num(m['p_value'], 4)} "
            f"| {'yes' if m['certified'] else 'no'} | {num(t.get('risk'))} | {share(t.get('engagement'))} |"
        )
    return lines


def risk_section(risk: dict[str, Any] | None, labels: dict[str, str], folder: str) -> list[str]:
    """Markdown lines (and the PNGs, written into ``folder``); nothing without dials."""
    if not risk or not (risk.get("scores") or risk.get("sweep")):
        return []
    alpha, delta = risk["alpha"], risk["delta"]
    test_split = risk.get("guarantee") == "test_split"
    p_value = "hypergeometric (test split)" if test_split else risk.get("p_value", "binomial")
    lines = [
        "## Certified dial: at most α of the questions answered wrongly, with confidence 1 − δ",
        "",
        f"α = {alpha:g}, δ = {delta:g}, p-value: {p_value}; calibration: the "
        "validation split; answer iff score ≤ λ, λ by Learn-then-Test (fixed sequence from the most "
        "abstaining λ). Risk: the share of all questions answered and wrong.",
        "",
        GUARANTEE_TEST_SPLIT if test_split else GUARANTEE,
        "",
    ]
    dials = risk.get("scores") or []
    if dials:
        lines += _dial_rows(dials, labels) + [""]
        lines += [
            f"- {cell(labels.get(d['model'], d['model']))}, {d['score']}: {cell(d['message'])}" for d in dials
        ]
        lines.append("")
        for d in dials:
            if d.get("test_curve"):
                plot_risk(d, alpha, os.path.join(folder, risk_png(d)))
                lines += [f"![risk and engagement against λ: {d['model']}, {d['score']}]({risk_png(d)})", ""]
    if risk.get("sweep"):
        lines += _sweep_rows(risk["sweep"]) + [""]
    return lines


def plot_risk(dial: dict[str, Any], alpha: float, path: str) -> None:
    """Risk and engagement against λ, on validation and test, α and the chosen λ marked."""
    fig = canvas(6.4, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for name, curve, style in (
        ("validation", dial.get("calibration_curve"), "--"),
        ("test", dial.get("test_curve"), "-"),
    ):
        if curve and curve["lambdas"]:
            ax.step(
                curve["lambdas"], curve["risk"], style, where="post", color="tab:red", label=f"risk ({name})"
            )
            ax.step(
                curve["lambdas"], curve["engagement"], style, where="post", color="tab:blue",
                label=f"engagement ({name})",
            )  # fmt: skip
    ax.axhline(alpha, color="black", linewidth=0.8, linestyle=":", label=f"α = {alpha:g}")
    if dial.get("lam") is not None:
        ax.axvline(dial["lam"], color="tab:green", linewidth=1.0, label=f"certified λ = {dial['lam']:.3g}")
    ax.set_xlabel(f"λ (answer iff {dial['score']} ≤ λ)")
    ax.set_ylabel("share of questions")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="center right")
    ax.set_title(f"{dial['model']}: {SCORE_TITLES.get(dial['score'], dial['score'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)

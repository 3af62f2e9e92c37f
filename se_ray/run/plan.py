"""The pure half of `se-ray run`: the split, the τ plan and the trials it implies, choosing τ, and
aggregating seeds. No model work and no cluster."""

from __future__ import annotations

import hashlib
import json
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from se_ray import columns as col
from se_ray import metrics
from se_ray.config import ConfigError, JobConfig, SplitConfig, SweepConfig, results_key
from se_ray.labeling import SCORE_COLUMNS, abstain_by_judgement, abstain_by_score, partition_digest
from se_ray.storage import Store

SPLITS = ("train", "validation", "test", "ood")
R_TUNING = "r_tuning"
UNTUNED = "untuned"
# What the sweep table and the adaptation plot show of one model on one split.
SCORE_KEYS = ("aed", "correct", "incorrect", "abstained", "num_questions")
SEED_METRICS = ("aed", "accuracy", "engagement", "correct", "incorrect", "abstained")


def config_key(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def eval_key(cfg: JobConfig) -> dict[str, Any]:
    """What an evaluation's outcome depends on, beyond the model and the questions."""
    return {
        "eval": results_key(cfg.eval),
        "answer_style": cfg.sampling.answer_style,
        "stop": cfg.sampling.stop,
        "max_tokens": cfg.eval.max_tokens or cfg.sampling.max_tokens,
        "abstention_text": cfg.labeling.abstention_text,
        "model": cfg.sampling.model,
    }


def seeded_order(rows: Sequence[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The order the splits draw their questions from."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    return order


def split_rows(rows: Sequence[dict[str, Any]], cfg: SplitConfig) -> dict[str, list[dict[str, Any]]]:
    """Seeded shuffle; validation then test from the questions evaluation can score (with
    references, or marked unanswerable), train from the rest."""
    order = seeded_order(rows, cfg.seed)
    with_refs = [r for r in order if col.is_scorable(r)]
    held_n = cfg.validation + cfg.test
    if len(with_refs) < held_n:
        raise ConfigError(
            f"split.validation={cfg.validation} + split.test={cfg.test} need {held_n} questions with "
            f"references (or marked unanswerable); the input has {len(with_refs)}"
        )
    held = with_refs[:held_n]
    held_ids = {r[col.ID] for r in held}
    rest = [r for r in order if r[col.ID] not in held_ids]
    if len(rest) < cfg.train:
        raise ConfigError(
            f"split.train={cfg.train}: only {len(rest)} questions are left after validation and test"
        )
    return {"train": rest[: cfg.train], "validation": held[: cfg.validation], "test": held[cfg.validation :]}


@dataclass(frozen=True)
class Rule:
    """How a training set is labelled: an entropy method at τ, or R-Tuning (τ None)."""

    method: str
    tau: float | None = None
    margin: float = 0.0

    def abstain(self, table: pa.Table, judged: Mapping[str, bool | None] | None) -> list[bool | None]:
        """Per row of the labels table; None drops the row (R-Tuning without a verdict)."""
        if self.method == R_TUNING:
            judged = judged or {}
            return abstain_by_judgement([judged.get(i) for i in table.column(col.ID).to_pylist()])
        if self.tau is None:
            raise ValueError(f"{self.method} needs a τ")
        return abstain_by_score(table.column(SCORE_COLUMNS[self.method]).to_pylist(), self.tau, self.margin)


@dataclass
class TauGroup:
    """τ values of the grid that give one and the same training partition."""

    digest: str
    taus: list[float] = field(default_factory=list)
    abstained: int = 0
    rows: int = 0


def group_taus(
    ids: Sequence[str], scores: Sequence[float], taus: Sequence[float], margin: float = 0.0
) -> list[TauGroup]:
    """The grid's distinct partitions, in grid order."""
    groups: dict[str, TauGroup] = {}
    for tau in taus:
        abstain = abstain_by_score(scores, tau, margin)
        digest = partition_digest(ids, abstain)
        kept = [a for a in abstain if a is not None]
        groups.setdefault(digest, TauGroup(digest, [], sum(kept), len(kept))).taus.append(tau)
    return list(groups.values())


@dataclass(frozen=True)
class Partition:
    """One distinct training set: the rule that first gave it, its rows and how many abstain."""

    rule: Rule
    rows: int
    abstained: int


@dataclass(frozen=True)
class PlanPoint:
    tau: float | None
    digest: str


@dataclass
class SweepPlan:
    """Per method, its τ points and the partition each gives; the distinct partitions by digest."""

    methods: dict[str, list[PlanPoint]]
    partitions: dict[str, Partition]

    def digests(self) -> list[str]:
        """One per trial of the sweep, in method then grid order."""
        return list(dict.fromkeys(p.digest for points in self.methods.values() for p in points))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_sweep(sweep: SweepConfig, table: pa.Table, judged: Mapping[str, bool | None] | None) -> SweepPlan:
    """Relabelling is a pure function of the labels, so the whole grid is planned before any training."""
    ids = table.column(col.ID).to_pylist()
    plan = SweepPlan({}, {})
    for method in sweep.methods:
        if method == R_TUNING:
            rule = Rule(R_TUNING)
            abstain = rule.abstain(table, judged)
            kept = [bool(a) for a in abstain if a is not None]
            digest = partition_digest(ids, abstain)
            plan.partitions.setdefault(digest, Partition(rule, len(kept), sum(kept)))
            plan.methods[method] = [PlanPoint(None, digest)]
            continue
        scores = table.column(SCORE_COLUMNS[method]).to_pylist()
        points = []
        for group in group_taus(ids, scores, sweep.taus, sweep.tau_margin):
            if group.rows == 0:
                raise ConfigError(
                    f"sweep.tau_margin={sweep.tau_margin:g} leaves no training question for {method} at "
                    f"τ = {group.taus[0]:g}: every score lies within the margin"
                )
            rule = Rule(method, group.taus[0], sweep.tau_margin)
            plan.partitions.setdefault(group.digest, Partition(rule, group.rows, group.abstained))
            points += [PlanPoint(t, group.digest) for t in group.taus]
        plan.methods[method] = sorted(points, key=lambda p: sweep.taus.index(p.tau))
    return plan


@dataclass(frozen=True)
class TrialSpec:
    """One trial: a partition trained with one seed. Its folder carries its key in the name, so
    an adapter path never holds other weights (the long-lived engine caches adapters by path)."""

    name: str
    digest: str
    seed: int
    rule: Rule
    key: str
    store: Store


def trial_spec(
    cfg: JobConfig, trials: Store, label_key: str, split_key: str, digest: str, rule: Rule, seed: int
) -> TrialSpec:
    train = cfg.train.model_copy(update={"seed": seed})
    key = config_key("trial", label_key, split_key, digest, results_key(train), eval_key(cfg))
    name = f"p{digest[:10]}-seed{seed}"
    return TrialSpec(name, digest, seed, rule, key, trials.child(f"{name}-{key[:8]}"))


@dataclass
class SweepPoint:
    """One τ of one method after the sweep: the trial that trained it and its scores per split."""

    tau: float | None
    trial: str
    digest: str | None
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def aed(self) -> float:
        """Validation AED, by which τ is chosen."""
        return self.scores["validation"]["aed"]

    def to_report(self) -> dict[str, Any]:
        head = {"tau": self.tau, "trial": self.trial}
        return {**head, **({"digest": self.digest} if self.digest else {}), **self.scores}


def point_scores(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in SCORE_KEYS}


def choose_point(points: Sequence[SweepPoint]) -> SweepPoint:
    """The lowest validation AED; ties go to the first point (the lowest τ of the grid)."""
    if not points:
        raise ValueError("no sweep points to choose from")
    best = points[0]
    for p in points[1:]:
        if p.aed < best.aed - 1e-12:
            best = p
    return best


def _mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    mean = float(statistics.fmean(values))
    return mean, (float(statistics.stdev(values)) if len(values) > 1 else None)


def aggregate_seeds(
    per_seed: Sequence[Mapping[str, Any]],
    abstained: Sequence[Sequence[bool]],
    correct: Sequence[Sequence[bool]],
    bootstrap_samples: int,
) -> dict[str, Any]:
    """Mean ± s.d. over seeds of each score, and the bootstrap interval of the mean of each metric."""
    out: dict[str, Any] = {"num_questions": per_seed[0]["num_questions"], "seeds": len(per_seed)}
    for name in SEED_METRICS:
        out[f"{name}_mean"], out[f"{name}_sd"] = _mean_sd([m[name] for m in per_seed])
    for name in metrics.METRICS:
        interval = metrics.bootstrap_interval(
            [list(a) for a in abstained], [list(c) for c in correct], name, bootstrap_samples
        )
        out[f"{name}_ci95"] = list(interval)
    out["aed_per_seed"] = [m["aed"] for m in per_seed]
    return out

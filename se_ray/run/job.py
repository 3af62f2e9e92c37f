"""`se-ray run`: the whole job, as a recipe of resumable stages.

::

    load ─► split ─► label (train split) ─► plan ─► τ sweep ─► choose τ ─► seeds ─► evaluate ─► report
                                            (Ray Tune grid: relabel ─► train ─► validate)

The τ values (of any method) that give the same training partition share one trial. τ is chosen
per method by the lowest validation AED (ties: the first τ of the grid); each chosen partition
is then retrained with ``sweep.seeds`` seeds in all. The untuned model and every trained model
are evaluated on the test split and the OOD set.

The driver holds one vLLM engine with LoRA serving for the whole run: labeling (when its engine
settings match), every trial's validation (the trials look it up by name) and the final
evaluation share it. With ``train.use_gpu`` the trainers need the GPUs the engine holds, so the
driver releases it before the trials and each trial starts its own for validation.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from se_ray import columns as col
from se_ray.config import JobConfig
from se_ray.engine import Engines
from se_ray.evaluate import AnswerFlags
from se_ray.report import METHOD_LABELS, MethodData
from se_ray.run.dial import report_fields
from se_ray.run.plan import (
    R_TUNING,
    SPLITS,
    UNTUNED,
    SweepPlan,
    SweepPoint,
    TrialSpec,
    aggregate_seeds,
    choose_point,
    config_key,
    eval_key,
    plan_sweep,
    point_scores,
    trial_spec,
)
from se_ray.run.results import (
    BOUNDARY_SPLIT,
    REPORT_DATA_FILE,
    RunOutcome,
    agreement,
    band_table,
    publish_report,
    report_data,
    retention,
    run_summary,
    split_title,
    unanswerable_scores,
)
from se_ray.run.stages import (
    Evaluation,
    RunFolders,
    Splits,
    Stage,
    StageLog,
    TrialCounts,
    evaluate_model,
    generation_config,
    label_stage,
    r_tuning_stage,
    run_labels,
    split_stage,
)
from se_ray.run.trials import TrialResult, export_chosen_models, run_trials, selection_note
from se_ray.storage import Store

logger = logging.getLogger(__name__)


def _absolute_model(ref: str) -> str:
    path = os.path.expanduser(ref)
    return os.path.abspath(path) if ref and os.path.isdir(path) else ref


def prepared_config(cfg: JobConfig) -> JobConfig:
    """The run's config: model folders made absolute (Tune trials run in their own working
    directory), early stopping off (its SEs are exact only at one τ; the sweep needs them all)."""
    if cfg.sampling.early_stop:
        logger.warning("sampling.early_stop is ignored by `se-ray run`: the τ sweep needs exact entropies")
    return cfg.model_copy(
        update={
            "sampling": cfg.sampling.model_copy(
                update={"model": _absolute_model(cfg.sampling.model), "early_stop": False}
            ),
            "eval": cfg.eval.model_copy(update={"judge_model": _absolute_model(cfg.eval.judge_model)}),
            "labeling": cfg.labeling.model_copy(update={"method": "semantic_entropy"}),
        },
        deep=True,
    )


class _Run:
    """The state one ``run_job`` call threads through its stages."""

    def __init__(self, cfg: JobConfig, output: str):
        self.cfg = cfg
        self.folders = RunFolders(Store(output, cfg.storage))
        self.log = StageLog()
        self.notes: list[str] = []
        self.engines = Engines(cfg, generation_config(cfg))
        self.seeds = [cfg.train.seed + k for k in range(cfg.sweep.seeds)]
        self.splits = Splits({name: [] for name in SPLITS}, "")
        self.label_key = ""
        self.plan = SweepPlan({}, {})
        self.trials: dict[str, TrialResult] = {}
        self.boundary_flags: dict[str, AnswerFlags] = {}  # method -> first seed's flags on the test split
        self.judge_audit: dict[str, Any] | None = None

    def spec(self, digest: str, seed: int) -> TrialSpec:
        rule = self.plan.partitions[digest].rule
        return trial_spec(self.cfg, self.folders.trials, self.label_key, self.splits.key, digest, rule, seed)

    def plan_trials(self) -> list[float]:
        """Label, judge for R-Tuning, plan the sweep; returns the training set's entropies."""
        cfg = self.cfg
        self.label_key = label_stage(cfg, self.folders, self.splits.key, self.engines, self.log)
        table = run_labels(self.folders, [col.ID, col.SEMANTIC_ENTROPY, col.EXACT_ENTROPY])
        judged = None
        if R_TUNING in cfg.sweep.methods:
            judged = r_tuning_stage(cfg, self.folders, self.label_key, self.engines, self.log)
            unjudged = sum(v is None for v in judged.values())
            if unjudged:
                self.notes.append(f"R-Tuning dropped {unjudged} training questions without references.")
        self.plan = plan_sweep(cfg.sweep, table, judged)
        if cfg.sweep.tau_margin > 0:
            for part in self.plan.partitions.values():
                if part.rule.method != R_TUNING:
                    dropped = table.num_rows - part.rows
                    self.notes.append(
                        f"{part.rule.method} at τ = {part.rule.tau:g}: sweep.tau_margin = "
                        f"{cfg.sweep.tau_margin:g} dropped {dropped} of {table.num_rows} training questions."
                    )
        self.folders.sweep.write_json("plan.json", self.plan.to_dict())
        return [float(v) for v in table.column(col.SEMANTIC_ENTROPY).to_pylist()]

    def sweep(self) -> tuple[dict[str, list[SweepPoint]], dict[str, SweepPoint]]:
        """The τ sweep (first seed, one trial per distinct partition) and the chosen point per method."""
        specs = [self.spec(d, self.seeds[0]) for d in self.plan.digests()]
        trials, ran = run_trials(self.cfg, specs, self.folders, self.engines, "sweep")
        self.log.sweep_trials = TrialCounts(ran, len(specs) - ran)
        self.trials.update(trials)
        by_digest = {t.digest: t for t in trials.values()}
        points: dict[str, list[SweepPoint]] = {}
        chosen: dict[str, SweepPoint] = {}
        for method, plan_points in self.plan.methods.items():
            points[method] = [
                SweepPoint(
                    p.tau,
                    by_digest[p.digest].trial,
                    p.digest,
                    {"validation": point_scores(by_digest[p.digest].validation)},
                )
                for p in plan_points
            ]
            chosen[method] = choose_point(points[method])
            shared = [p.tau for p in plan_points if p.digest == chosen[method].digest]
            if method != R_TUNING and len(shared) > 1:
                self.notes.append(
                    f"{METHOD_LABELS[method]}: τ = {', '.join(f'{t:g}' for t in shared)} give the same "
                    "training set (one trained model)."
                )
            trial = by_digest.get(chosen[method].digest)
            note = selection_note(METHOD_LABELS[method], trial.train) if trial else None
            if note:
                self.notes.append(note)
        merged = export_chosen_models(  # train.export_merged: once per chosen model, not per trial
            self.cfg,
            self.engines,
            [
                self.spec(d, self.seeds[0])
                for d in dict.fromkeys(c.digest for c in chosen.values() if c.digest)
            ],
        )
        self.folders.sweep.write_json(
            "selection.json",
            {
                m: {"tau": c.tau, "digest": c.digest, "aed": c.aed, "merged": merged.get(c.trial)}
                for m, c in chosen.items()
            },
        )
        return points, chosen

    def seed_runs(self, chosen: dict[str, SweepPoint]) -> None:
        """Retrain each chosen partition (R-Tuning's included) with the other seeds."""
        digests = dict.fromkeys(c.digest for c in chosen.values() if c.digest)
        specs = {s.name: s for d in digests for s in (self.spec(d, k) for k in self.seeds[1:])}
        ran = 0
        if specs:
            trials, ran = run_trials(self.cfg, list(specs.values()), self.folders, self.engines, "seeds")
            self.trials.update(trials)
        self.log.seed_trials = TrialCounts(ran, len(specs) - ran)

    def evaluate(self, split: str, member: TrialResult | None, method: str) -> Evaluation:
        """One model (None: untuned) on one split."""
        if member is None:
            out = self.folders.untuned.child(split)
            key, model = config_key(UNTUNED, self.splits.key, eval_key(self.cfg), split), None
        else:
            spec = self.spec(member.digest, member.seed)
            out, key, model = spec.store.child(split), config_key(spec.key, split), member.model
        info = {"split": split, "method": method}
        evaluation = evaluate_model(self.cfg, self.engines, self.splits[split], out, key, model, info)
        self.log.evaluations_ran += evaluation.ran
        return evaluation

    def all_thresholds(self, sweep_points: dict[str, list[SweepPoint]]) -> None:
        """Every sweep model (one per τ, first seed) and the untuned one on test and OOD
        (the paper's all-threshold evaluation, behind the adaptation plot)."""
        for method, points in sweep_points.items():
            for p in points:
                member = None if method == UNTUNED else self.trials[p.trial]
                for split in self.splits.evaluated:
                    p.scores[split] = point_scores(self.evaluate(split, member, method).summary)

    def method_entry(self, method: str, tau: float | None, members: list[TrialResult | None]) -> MethodData:
        """One row of the AED tables: the method's models (one per seed) on each evaluated split."""
        entry: MethodData = {
            "method": method,
            "label": METHOD_LABELS[method],
            "chosen_tau": tau,
            "seeds": len(members),
            "splits": {},
        }
        for split in self.splits.evaluated:
            evaluations = [self.evaluate(split, member, method) for member in members]
            flags = [e.flags.answerable_only() for e in evaluations]
            entry["splits"][split] = aggregate_seeds(
                [e.summary for e in evaluations],
                [abstained for abstained, _ in flags],
                [correct for _, correct in flags],
                self.cfg.eval.bootstrap_samples,
            )
            entry["splits"][split].update(unanswerable_scores([e.summary for e in evaluations]))
            if split == BOUNDARY_SPLIT:
                self.boundary_flags[method] = evaluations[0].flags
                if method == UNTUNED:
                    self.judge_audit = evaluations[0].summary.get("judge_audit")
        return entry

    def final(self, chosen: dict[str, SweepPoint]) -> list[MethodData]:
        """The untuned model and every method's chosen models (all seeds) on test and OOD."""
        methods = [self.method_entry(UNTUNED, None, [None])]
        for method in self.cfg.sweep.methods:
            c = chosen[method]
            members: list[TrialResult | None] = [
                self.trials[self.spec(str(c.digest), k).name] for k in self.seeds
            ]
            methods.append(self.method_entry(method, c.tau, members))
        return methods

    def execute(self) -> RunOutcome:
        """Every stage after the split, holding the run's engines."""
        train_entropies = self.plan_trials()
        sweep_points, chosen = self.sweep()
        self.seed_runs(chosen)
        untuned = self.evaluate("validation", None, UNTUNED)
        sweep_points[UNTUNED] = [
            SweepPoint(None, UNTUNED, None, {"validation": point_scores(untuned.summary)})
        ]
        self.all_thresholds(sweep_points)
        methods = self.final(chosen)
        sizes = {name: len(rows) for name, rows in self.splits.rows.items()}
        label_summary = Stage(self.folders.label, self.label_key).cached() or {}
        return RunOutcome(
            sizes,
            methods,
            sweep_points,
            self.splits.adaptation,
            train_entropies,
            self.notes,
            judge_audit=self.judge_audit,
            score_diagnostics=label_summary.get("score_diagnostics"),
        )


def run_job(cfg: JobConfig, input: str, output: str) -> dict[str, Any]:
    """The whole job: split, label, sweep τ (Ray Tune), baselines, evaluate, report."""
    started = time.perf_counter()
    cfg = prepared_config(cfg)
    run = _Run(cfg, output)
    root = run.folders.root
    root.makedirs()
    root.write_text("config.yaml", cfg.to_yaml())
    run.splits = split_stage(cfg, input, run.folders, run.log)
    with run.engines:
        outcome = run.execute()
    if not run.splits["test"]:
        outcome.notes.append("split.test=0: no in-distribution test evaluation.")
    outcome.notes.append(
        f"τ is chosen on the validation split; the adaptation plot shows every τ's model on the "
        f"{split_title(outcome.adaptation_split)}."
    )
    dial = report_fields(run, outcome.methods)  # the certified dial, the teacher's row (eval.scores)
    outcome.bands = band_table(run.splits[BOUNDARY_SPLIT], run.boundary_flags)  # with the teacher's
    outcome.retention = retention(run.boundary_flags)
    outcome.agreement = agreement(run.boundary_flags)
    data = report_data(cfg, outcome)
    data.update(dial)
    root.write_json(REPORT_DATA_FILE, data)
    paths = publish_report(data, root)
    summary = run_summary(root, paths, run.log, data, time.perf_counter() - started)
    logger.info("run done in %.1f s: %s", summary["wall_s"], json.dumps(summary["methods"]))
    return summary

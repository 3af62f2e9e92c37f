"""The trials of `se-ray run`: relabel, train, validate; run as one Ray Tune grid of function
trainables, each launching Ray Train inside."""

from __future__ import annotations

import contextlib
import logging
import posixpath
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from se_ray import columns as col
from se_ray.config import JobConfig, TrainConfig
from se_ray.engine import Engines
from se_ray.labeling import partition_digest, relabel
from se_ray.lease import LeaseClaim, adopted, check_leases, held_claims
from se_ray.run.plan import R_TUNING, Rule, TrialSpec, config_key
from se_ray.run.stages import (
    RunFolders,
    Stage,
    evaluate_model,
    generation_config,
    read_judged,
    run_labels,
)
from se_ray.storage import before_commit, is_uri
from se_ray.train.export import ADAPTER_DIR

logger = logging.getLogger(__name__)

TRAIN_SUMMARY_FILE = "train_summary.json"
MERGED_EXPORT_FILE = "merged_export.json"  # a chosen LoRA trial's merged/ is complete
# What a trial's training set keeps of the labels: what training reads (question, context,
# target) and what says how it was labelled.
TRIAL_LABEL_COLUMNS = (col.ID, col.QUESTION, col.CONTEXT, col.TARGET, col.ABSTAIN, col.TAU, col.LABEL_METHOD)
TRAIN_SUMMARY_KEYS = ("final_loss", "steps", "tokens_per_s", "wall_s", "selected_step", "selection")
TUNE_METRICS = ("aed", "accuracy", "engagement", "correct", "incorrect", "abstained")


@dataclass(frozen=True)
class TrialResult:
    """A finished trial, as its ``_stage.json`` summary holds it."""

    trial: str
    digest: str
    seed: int
    rule: Rule
    rows: int
    abstained: int
    model: str
    train: dict[str, Any]
    validation: dict[str, Any]
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialResult:
        return cls(**{**d, "rule": Rule(**d["rule"])})


def selection_note(method: str, train: dict[str, Any]) -> str | None:
    """What ``train.select_checkpoint: label_rate`` exported for a trial, as a report note."""
    selection = train.get("selection")
    if not selection:
        return None
    return (
        f"{method}: the exported model is step {train['selected_step']} of {train['steps']}, whose greedy "
        f"answers abstained on {selection['selected_rate']:.0%} of {selection['questions']} validation "
        f"questions (training labels: {selection['target_rate']:.0%} abstain)."
    )


def trial_labels(cfg: JobConfig, spec: TrialSpec, folders: RunFolders) -> pa.Table:
    """The training set of the spec's rule, checked against the partition the sweep planned."""
    table = run_labels(folders)
    judged = read_judged(folders) if spec.rule.method == R_TUNING else None
    abstain = spec.rule.abstain(table, judged)
    if partition_digest(table.column(col.ID).to_pylist(), abstain) != spec.digest:
        raise RuntimeError(f"trial {spec.name}: the labels changed since the sweep was planned")
    labels = relabel(table, abstain, cfg.labeling.abstention_text, spec.rule.method, spec.rule.tau)
    schema = col.label_schema()
    return col.conform(labels, pa.schema([schema.field(name) for name in TRIAL_LABEL_COLUMNS]))


def _trained_model(train_summary: dict[str, Any]) -> str:
    model = train_summary.get("adapter") or train_summary.get("merged")
    if not model:
        raise RuntimeError(f"training exported neither an adapter nor a merged model: {train_summary}")
    return model


def trial_train_config(cfg: JobConfig, seed: int) -> TrainConfig:
    """A trial's training settings: its seed, and no merged/ for LoRA (validation serves the
    adapter; the chosen model's merged/ is exported once, by ``export_chosen_models``)."""
    return cfg.train.model_copy(update={"seed": seed, "export_merged": cfg.train.method == "full"})


def export_chosen_models(cfg: JobConfig, engines: Engines, chosen: list[TrialSpec]) -> dict[str, str]:
    """``train.export_merged`` of a LoRA run: merged/ of each chosen trial, exported once (trial
    name -> its URI), by a Ray task with a training worker's resources. Reused when already there."""
    if cfg.train.method != "lora" or not cfg.train.export_merged or not chosen:
        return {}
    from se_ray.train.export import MERGED_DIR, merge_on_training_resources

    if cfg.train.use_gpu:
        engines.release()  # the merge task asks for a training worker's GPU, which the engines may hold
    merged = {}
    for spec in chosen:
        done = spec.store.read_json(MERGED_EXPORT_FILE)
        if done is None:
            before_commit()
            merge_on_training_resources(cfg, spec.store.uri("train"), ADAPTER_DIR, MERGED_DIR)
            done = {"merged": posixpath.join(spec.store.uri("train"), MERGED_DIR)}
            spec.store.write_json(MERGED_EXPORT_FILE, done)
        merged[spec.name] = done["merged"]
    return merged


def _train(cfg: JobConfig, spec: TrialSpec, validation: list[dict[str, Any]]) -> dict[str, Any]:
    from se_ray.train import train_job

    summary = spec.store.read_json(TRAIN_SUMMARY_FILE)
    if summary is None:
        trial_cfg = cfg.model_copy(update={"train": trial_train_config(cfg, spec.seed)})
        summary = train_job(
            trial_cfg,
            labels=spec.store.uri("labels"),
            output=spec.store.uri("train"),
            resume=True,
            selection_questions=validation,
        )
        spec.store.write_json(TRAIN_SUMMARY_FILE, summary)
    return summary


def run_trial(cfg: JobConfig, spec: TrialSpec, folders: RunFolders) -> TrialResult:
    """One trial: relabel the training set by the spec's rule, train, evaluate on validation."""
    stage = Stage(spec.store, spec.key)
    cached = stage.cached()
    if cached is not None:
        return TrialResult.from_dict(cached)
    stage.begin()
    started = time.perf_counter()
    labels = trial_labels(cfg, spec, folders)
    spec.store.child("labels").write_parquet("part-0.parquet", labels)
    questions = folders.split.read_jsonl("validation.jsonl")
    train_summary = _train(cfg, spec, questions)
    model = _trained_model(train_summary)
    with Engines(cfg, generation_config(cfg)) as engines:
        validation = evaluate_model(
            cfg,
            engines,
            questions,
            spec.store.child("validation"),
            config_key(spec.key, "validation"),
            model,
            {"split": "validation", "trial": spec.name},
        )
    result = TrialResult(
        trial=spec.name,
        digest=spec.digest,
        seed=spec.seed,
        rule=spec.rule,
        rows=labels.num_rows,
        abstained=sum(labels.column(col.ABSTAIN).to_pylist()),
        model=model,
        train={k: train_summary.get(k) for k in TRAIN_SUMMARY_KEYS},
        validation=validation.summary,
        wall_s=round(time.perf_counter() - started, 2),
    )
    stage.finish(result.to_dict())
    return result


def _tune_trial(
    config: dict[str, Any],
    job: dict[str, Any],
    specs: dict[str, TrialSpec],
    folders: RunFolders,
    leases: Sequence[LeaseClaim] = (),
) -> None:
    """The Ray Tune function trainable: one trial, its validation scores reported to Tune.
    Its commits check the driver's ``leases`` first, as the driver's own do."""
    from ray import tune

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with adopted(leases):
        result = run_trial(JobConfig.model_validate(job), specs[config["trial"]], folders)
    tune.report({k: result.validation[k] for k in TUNE_METRICS})


def run_tune(cfg: JobConfig, specs: list[TrialSpec], folders: RunFolders, name: str) -> None:
    """The trials as one Ray Tune grid (a function trainable launching Ray Train inside)."""
    from ray import tune

    root = folders.tune
    stale = root.child(name)
    before_commit()  # Tune writes its own state here: a run that lost its lease starts no grid
    if stale.exists():  # reuse is through the trial folders' markers, not Tune's restore
        stale.fs.delete_dir(stale.path)
    root.makedirs()
    trainable = tune.with_parameters(
        _tune_trial,
        job=cfg.model_dump(mode="json"),
        specs={s.name: s for s in specs},
        folders=folders,
        leases=held_claims(),
    )
    # The trial function launches the trainer, waits, then validates through the engines. With a
    # CPU it cannot land on a head that offers no CPUs for work (num_cpus=0). Tune refuses an
    # empty resource request, so "no CPU" is a request for one byte of memory.
    resources = {"cpu": cfg.sweep.trial_num_cpus} if cfg.sweep.trial_num_cpus > 0 else {"memory": 1}
    remote = is_uri(root.location)
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={"trial": tune.grid_search([s.name for s in specs])},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.sweep.max_concurrent_trials),
        run_config=tune.RunConfig(
            name=name,
            storage_path=root.path if remote else root.location,
            storage_filesystem=root.fs if remote else None,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables: stdout is the CLI's JSON summary
        grid = tuner.fit()
    if grid.errors:
        check_leases()  # a trial that stopped on a lost lease: that is the error to report
        raise RuntimeError(
            f"{len(grid.errors)} of {len(specs)} Tune trials ({name}) failed; first: {grid.errors[0]}"
        )


def run_trials(
    cfg: JobConfig, specs: list[TrialSpec], folders: RunFolders, engines: Engines, name: str
) -> tuple[dict[str, TrialResult], int]:
    """The trials' results by name, the unfinished ones run as a Tune grid first; and how many ran."""
    todo = [s for s in specs if Stage(s.store, s.key).cached() is None]
    if todo:
        if cfg.train.use_gpu:
            # Trainers need the GPUs the engines hold: each trial starts (and stops) its own
            # engine for validation, and the driver's come back for the final evaluation.
            engines.release()
        else:
            # CPU: logical CPUs are shared, so one warm engine serves every trial (found by name).
            engines.generation()
            engines.correctness_judge_pool()
        logger.info(
            "%s: %d trial(s) to run as a Ray Tune grid, %d reused", name, len(todo), len(specs) - len(todo)
        )
        run_tune(cfg, todo, folders, name)
    out = {}
    for spec in specs:
        summary = Stage(spec.store, spec.key).cached()
        if summary is None:
            raise RuntimeError(f"trial {spec.name} reported no result")
        out[spec.name] = TrialResult.from_dict(summary)
    return out, len(todo)

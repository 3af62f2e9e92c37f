"""The resumable stages of `se-ray run` before and after the trials: split, label, the R-Tuning
judge, and one model's evaluation on one split.

Every stage writes ``_stage.json`` in its folder with a key hashed from the config sections and
upstream stages it depends on: a rerun with the same config reuses every finished stage, and a
changed section reruns only what depends on it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from se_ray import columns as col
from se_ray.config import ConfigError, DataConfig, JobConfig, SamplingConfig, results_key
from se_ray.engine import Engines, engine_digest
from se_ray.evaluate import AnswerFlags, evaluate_rows, lora_engine_config, resolve_eval_model
from se_ray.judges.correctness import Judge, build_judge
from se_ray.label import LABELS_DIR, label_job, read_labels
from se_ray.lease import OutputError
from se_ray.run.plan import SPLITS, config_key, eval_key, split_rows
from se_ray.scoring import Scorer
from se_ray.storage import Store

logger = logging.getLogger(__name__)

STAGE_FILE = "_stage.json"
JUDGED_FILE = "standard_judged.parquet"
JUDGED = "standard_correct"  # R-Tuning: the eval judge's verdict on each standard answer
FLAGS = "flags"  # an evaluation's per-question flags, kept in its stage summary


class StageStateError(OutputError):
    """A stage's ``_stage.json`` is there but is no stage record: the stage is not absent, so
    nothing is rerun or deleted until a person looks (one line)."""


class Stage:
    """``_stage.json`` in a stage's folder: ``{"key", "done", "summary"}``.

    Only a missing file means "no state"; any other storage error (permission, throttling)
    propagates, and a file that does not parse raises ``StageStateError``: neither ever leads
    ``begin()`` to clear the folder."""

    def __init__(self, store: Store, key: str):
        self.store, self.key = store, key

    def _state(self) -> dict[str, Any] | None:
        if not self.store.exists(STAGE_FILE):
            return None
        try:
            text = self.store.read_text(STAGE_FILE)
        except FileNotFoundError:  # removed since: absent
            return None
        try:
            state = json.loads(text)
        except ValueError as e:
            raise self._unreadable(f"does not parse as JSON ({e})") from None
        if not isinstance(state, dict):
            raise self._unreadable(f"holds a JSON {type(state).__name__}, not a stage record")
        return state

    def _unreadable(self, why: str) -> StageStateError:
        return StageStateError(
            f"stage state {self.store.uri(STAGE_FILE)} {why}; nothing was deleted: "
            "fix or remove that file to rerun the stage"
        )

    def cached(self) -> dict[str, Any] | None:
        state = self._state()
        if state and state.get("key") == self.key and state.get("done"):
            return state.get("summary") or {}
        return None

    def begin(self) -> None:
        """Start (or resume) the stage; a folder left by another config is emptied first."""
        state = self._state()
        if self.store.exists() and (state is None or state.get("key") != self.key):
            self.store.clear()
        self.store.makedirs()
        self.store.write_json(STAGE_FILE, {"key": self.key, "done": False})

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        self.store.write_json(STAGE_FILE, {"key": self.key, "done": True, "summary": summary})
        return summary


def _folder(name: str) -> property:
    return property(lambda self: self.root.child(name), doc=f"``{name}/`` of the run.")


@dataclass(frozen=True)
class RunFolders:
    """The layout of a run's output folder."""

    root: Store
    split = _folder("split")
    label = _folder("label")
    r_tuning = _folder("r_tuning")
    sweep = _folder("sweep")
    trials = _folder("trials")
    untuned = _folder("untuned")
    tune = _folder("tune")

    @property
    def labels(self) -> Store:
        return self.label.child(LABELS_DIR)


@dataclass(frozen=True)
class TrialCounts:
    ran: int
    reused: int


@dataclass
class StageLog:
    """What each stage of one run did ("ran" or "reused"); ``stages`` in ``summary.json``."""

    split: str = ""
    label: str = ""
    r_tuning_judge: str | None = None
    sweep_trials: TrialCounts | None = None
    seed_trials: TrialCounts | None = None
    evaluations_ran: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Splits:
    """The questions of each split, by name (``SPLITS``), and the split stage's key."""

    rows: dict[str, list[dict[str, Any]]]
    key: str

    def __getitem__(self, name: str) -> list[dict[str, Any]]:
        return self.rows[name]

    @property
    def evaluated(self) -> list[str]:
        """The splits the final evaluation scores: test, then every OOD set (``ood``, ``ood_<name>``)."""
        return [s for s, rows in self.rows.items() if rows and (s in ("test", "ood") or s.startswith("ood_"))]

    @property
    def adaptation(self) -> str:
        """The split the adaptation plot shows: the most out-of-distribution one there is."""
        return "ood" if self.rows["ood"] else ("test" if self.rows["test"] else "validation")


def generation_config(cfg: JobConfig) -> SamplingConfig:
    """The run's one generation engine: LoRA serving on when trials export adapters."""
    if cfg.train.method == "lora":
        return lora_engine_config(cfg.sampling, cfg.train.lora_r)
    return cfg.sampling


def correctness_judge(cfg: JobConfig, engines: Engines) -> Judge:
    return build_judge(cfg.eval, engines.correctness_judge_pool(), cfg.sampling.batch_size)


def _split_questions(
    cfg: JobConfig, input: str, store: Store
) -> tuple[dict[str, list[dict[str, Any]]], list[dict]]:
    from se_ray.data import load_questions, require_questions
    from se_ray.evaluate import split_references

    loaded = load_questions(input, cfg.data, cfg.storage)
    if not loaded.rows:
        store.write_jsonl("rejects.jsonl", loaded.rejects)
        require_questions(loaded, store.uri("rejects.jsonl"))
    parts = split_rows(loaded.rows, cfg.split)
    origin = {r[col.ID]: input for rows in parts.values() for r in rows}
    rejects = list(loaded.rejects)
    for name, path in cfg.split.ood_splits.items():
        ood = load_questions(path, DataConfig(limit=cfg.split.ood_limit), cfg.storage)
        parts[name], no_refs = split_references(ood.rows, path)
        rejects += ood.rejects + no_refs
        if not parts[name]:
            raise ConfigError(f"OOD set {name} ({path}): no questions with references")
        origin |= dict.fromkeys((r[col.ID] for r in parts[name]), path)
    for name, path in cfg.split.train_inputs.items():
        extra = load_questions(path, DataConfig(), cfg.storage)
        if not extra.rows:
            raise ConfigError(f"split.train_inputs.{name} ({path}): no valid questions")
        for row in extra.rows:
            qid = row[col.ID]
            if qid in origin:
                raise ConfigError(f"split.train_inputs.{name}: id {qid!r} of {path} is also in {origin[qid]}")
            origin[qid] = path
        parts["train"] += extra.rows
        rejects += extra.rejects
    return parts, rejects


def split_stage(cfg: JobConfig, input: str, folders: RunFolders, log: StageLog) -> Splits:
    store = folders.split
    split_fields = results_key(cfg.split)
    if not split_fields["train_inputs"]:  # runs from before the key keep their split (and labels)
        del split_fields["train_inputs"]
    key = config_key("split", input, results_key(cfg.data), split_fields)
    stage = Stage(store, key)
    if stage.cached() is None:
        stage.begin()
        parts, rejects = _split_questions(cfg, input, store)
        for name, rows in parts.items():
            store.write_jsonl(f"{name}.jsonl", rows)
        store.write_jsonl("rejects.jsonl", rejects)
        stage.finish({name: len(rows) for name, rows in parts.items()} | {"rejected": len(rejects)})
        log.split = "ran"
    else:
        log.split = "reused"
    names = dict.fromkeys([*SPLITS, *cfg.split.ood_splits])
    splits = Splits({name: store.read_jsonl(f"{name}.jsonl") for name in names}, key)
    logger.info("split: %s", ", ".join(f"{k} {len(v)}" for k, v in splits.rows.items()))
    return splits


def label_stage(cfg: JobConfig, folders: RunFolders, split_key: str, engines: Engines, log: StageLog) -> str:
    """``label_job`` on the training split; returns the stage's key."""
    key = config_key("label", split_key, results_key(cfg.sampling), results_key(cfg.entailment))
    stage = Stage(folders.label, key)
    if stage.cached() is not None:
        log.label = "reused"
        return key
    stage.begin()
    label_cfg = cfg.model_copy(update={"data": DataConfig(format="jsonl")})
    if engine_digest(label_cfg.sampling) == engine_digest(engines.generation_cfg):
        engines.generation()  # held by this run: labeling reuses it and leaves it running
    summary = label_job(label_cfg, input=folders.split.uri("train.jsonl"), output=folders.label.location)
    log.label = "ran"
    stage.finish(summary)
    return key


def run_labels(folders: RunFolders, columns: list[str] | None = None) -> pa.Table:
    """The label stage's table, one row per id, sorted by id."""
    table = read_labels(folders.labels, columns)
    if table is None:
        raise RuntimeError(f"no labels in {folders.labels.location}")
    return table


def read_judged(folders: RunFolders) -> dict[str, bool | None]:
    table = folders.r_tuning.read_parquet(JUDGED_FILE, [col.ID, JUDGED])
    return dict(zip(table.column(col.ID).to_pylist(), table.column(JUDGED).to_pylist(), strict=True))


def r_tuning_stage(
    cfg: JobConfig, folders: RunFolders, label_key: str, engines: Engines, log: StageLog
) -> dict[str, bool | None]:
    """The eval judge on every training question's standard answer (None without references)."""
    stage = Stage(folders.r_tuning, config_key("r_tuning", label_key, eval_key(cfg)))
    if stage.cached() is not None:
        log.r_tuning_judge = "reused"
        return read_judged(folders)
    stage.begin()
    rows = run_labels(folders, [col.ID, col.QUESTION, col.REFERENCES, col.STANDARD_ANSWER]).to_pylist()
    todo = [r for r in rows if r[col.REFERENCES]]
    verdicts = correctness_judge(cfg, engines).judge(
        [r[col.QUESTION] for r in todo],
        [r[col.STANDARD_ANSWER] or "" for r in todo],
        [r[col.REFERENCES] for r in todo],
    )
    by_id = {r[col.ID]: bool(v) for r, v in zip(todo, verdicts, strict=True)}
    correct = [by_id.get(r[col.ID]) for r in rows]
    judged = pa.table({col.ID: [r[col.ID] for r in rows], JUDGED: pa.array(correct, pa.bool_())})
    folders.r_tuning.write_parquet(JUDGED_FILE, judged)
    log.r_tuning_judge = "ran"
    stage.finish({"judged": len(todo), "correct": sum(by_id.values()), "unjudged": len(rows) - len(todo)})
    return read_judged(folders)


@dataclass(frozen=True)
class Evaluation:
    """One model on one split: its scores, its per-question flags, and whether it ran just now."""

    summary: dict[str, Any]
    flags: AnswerFlags
    ran: bool = field(default=False, compare=False)


def cached_evaluation(out: Store, key: str) -> Evaluation | None:
    cached = Stage(out, key).cached()
    if cached is None or FLAGS not in cached:
        return None
    flags = AnswerFlags(**cached.pop(FLAGS))
    return Evaluation(cached, flags)


def evaluate_model(
    cfg: JobConfig,
    engines: Engines,
    rows: Sequence[dict[str, Any]],
    out: Store,
    key: str,
    model: str | None,
    info: dict[str, Any],
) -> Evaluation:
    """One model on one split, as a cached stage. ``model``: None (the base model, served by the
    run's LoRA engine), a LoRA adapter folder (same engine) or a merged model folder (its own
    engine, stopped afterwards), as a path on a shared filesystem or a storage URI."""
    cached = cached_evaluation(out, key)
    if cached is not None:
        return cached
    stage = Stage(out, key)
    stage.begin()
    if model is None:
        engine_cfg, adapter, kind = engines.generation_cfg, None, "base"
    else:
        target = resolve_eval_model(cfg, model)  # a URI stays one: the engine's node copies it
        engine_cfg, adapter, kind = target.engine, target.adapter, target.kind
    summary, flags = evaluate_rows(
        cfg,
        rows,
        engines.pool(engine_cfg),
        correctness_judge(cfg, engines),
        out,
        adapter=adapter,
        info={"model": model or cfg.sampling.model, "model_kind": kind, **info},
        scorer=Scorer(cfg, engines.entailment_judge_pool()) if cfg.eval.scores else None,
    )
    if kind == "model":
        engines.release_one(engine_cfg)  # a merged model's own engine: not needed again
    stage.finish({**summary, FLAGS: flags.to_dict()})
    return Evaluation(summary, flags, ran=True)

"""`se-ray run`: the whole job, as a recipe of resumable stages.

::

    load ─► split ─► label (train split) ─► plan ─► τ sweep ─► choose τ ─► seeds ─► evaluate ─► report
                                            (Ray Tune grid: relabel ─► train ─► validate)

1. **split**: the valid questions, shuffled with ``split.seed``: ``split.validation`` and
   ``split.test`` questions with references, then ``split.train`` of the rest; the optional
   ``split.ood_input`` file is the out-of-distribution test set.
2. **label**: ``label_job`` on the training split (sampling, clustering, entropies). The
   validation and test splits need no labels.
3. **plan**: every method's labeling rule is a pure function of the labels table, so
   relabeling needs no model work. SE and R-Tuning-U (``exact_entropy``) abstain where their
   score is > τ, on the ``sweep.taus`` grid; R-Tuning abstains where the evaluation judge
   grades the standard answer wrong (training questions without references are dropped).
   The τ values (of any method) that give the same training partition share one trial.
4. **sweep**: one Ray Tune trial per distinct partition, a function trainable that relabels,
   runs ``train_job`` (Ray Train V2 launched inside the trial) and evaluates the adapter on
   the validation split; ``sweep.max_concurrent_trials`` at once.
5. **choose τ** per method by the lowest validation AED (ties: the first τ of the grid),
   then **seeds**: a second Tune grid retrains each chosen partition (and R-Tuning's) with
   ``sweep.seeds`` seeds in all.
6. **evaluate** the untuned model and every trained model on the test split and the OOD set
   (every τ's model: the adaptation plot; the chosen ones, all seeds: the AED tables).
7. **report**: ``report.md`` and PNGs (``se_ray.report``); ``summary.json``.

Every stage writes ``_stage.json`` in its folder with a key hashed from the config sections
and upstream stages it depends on; a rerun with the same config reuses every finished stage
(no model work at all), and a changed section reruns only what depends on it. Trial folders
carry their key in their name, so an adapter path is never reused for different weights
(the long-lived vLLM engine caches adapters by path).

The driver holds one vLLM engine with LoRA serving for the whole run: labeling (when its
engine settings match), every trial's validation (the trials look it up by name) and the
final evaluation share it. With ``train.use_gpu`` the trainers need the GPUs the engine holds,
so the driver releases it before the trials and each trial starts its own for validation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from se_ray import columns as col
from se_ray.config import ConfigError, DataConfig, JobConfig, SamplingConfig, SplitConfig
from se_ray.storage import exists, filesystem, join, read_text, write_json, write_text_atomic

logger = logging.getLogger(__name__)

STAGE_FILE = "_stage.json"
SUMMARY_FILE = "summary.json"
SPLITS = ("train", "validation", "test", "ood")
METHOD_LABELS = {
    "untuned": "Untuned",
    "semantic_entropy": "SE",
    "exact_entropy": "R-Tuning-U",
    "r_tuning": "R-Tuning",
}
SCORE_OF = {"semantic_entropy": col.SEMANTIC_ENTROPY, "exact_entropy": col.EXACT_ENTROPY}
JUDGED = "standard_correct"  # R-Tuning: the eval judge's verdict on each standard answer


# ---------------------------------------------------------------------------- pure pieces


def config_key(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def split_rows(rows: Sequence[dict[str, Any]], cfg: SplitConfig) -> dict[str, list[dict[str, Any]]]:
    """Seeded shuffle; validation then test from the questions with references, train from the rest."""
    order = list(rows)
    random.Random(cfg.seed).shuffle(order)
    with_refs = [r for r in order if r.get(col.REFERENCES)]
    held_n = cfg.validation + cfg.test
    if len(with_refs) < held_n:
        raise ConfigError(
            f"split.validation={cfg.validation} + split.test={cfg.test} need {held_n} questions with "
            f"references; the input has {len(with_refs)}"
        )
    held = with_refs[:held_n]
    held_ids = {r[col.ID] for r in held}
    rest = [r for r in order if r[col.ID] not in held_ids]
    if len(rest) < cfg.train:
        raise ConfigError(
            f"split.train={cfg.train}: only {len(rest)} questions are left after validation and test"
        )
    return {"train": rest[: cfg.train], "validation": held[: cfg.validation], "test": held[cfg.validation :]}


def entropy_rule(scores: Sequence[float], tau: float) -> list[bool]:
    """SE / R-Tuning-U: abstain where the score is strictly above τ."""
    return [float(s) > tau for s in scores]


def r_tuning_rule(correct: Sequence[bool | None]) -> list[bool | None]:
    """R-Tuning as Tjandra et al. ran it: abstain where the standard answer was judged wrong;
    None (no references, cannot be judged) drops the question from the training set."""
    return [None if c is None else not c for c in correct]


def partition_digest(ids: Sequence[str], abstain: Sequence[bool | None]) -> str:
    """Identity of a training set: which questions it holds and which of them abstain."""
    pairs = sorted((i, bool(a)) for i, a in zip(ids, abstain, strict=True) if a is not None)
    return hashlib.sha1(json.dumps(pairs).encode()).hexdigest()


def group_taus(ids: Sequence[str], scores: Sequence[float], taus: Sequence[float]) -> list[dict[str, Any]]:
    """The grid's distinct partitions in grid order: ``{"digest", "taus", "abstained"}`` each."""
    groups: dict[str, dict[str, Any]] = {}
    for tau in taus:
        abstain = entropy_rule(scores, tau)
        digest = partition_digest(ids, abstain)
        group = groups.setdefault(digest, {"digest": digest, "taus": [], "abstained": sum(abstain)})
        group["taus"].append(tau)
    return list(groups.values())


def relabel(table, abstain: Sequence[bool | None], abstention_text: str, method: str, tau: float | None):
    """The labels table with ``abstain``/``target``/``tau``/``label_method`` recomputed;
    rows whose flag is None are dropped."""
    import pyarrow as pa

    keep = [a is not None for a in abstain]
    table = table.filter(pa.array(keep))
    flags = [bool(a) for a in abstain if a is not None]
    standard = table.column(col.STANDARD_ANSWER).to_pylist()
    targets = [abstention_text if a else s for a, s in zip(flags, standard, strict=True)]
    n = table.num_rows
    new = {
        col.TAU: pa.array([tau] * n, pa.float64()),
        col.ABSTAIN: pa.array(flags, pa.bool_()),
        col.TARGET: pa.array(targets, pa.string()),
        col.LABEL_METHOD: pa.array([method] * n, pa.string()),
    }
    for name, array in new.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    return table


def choose_point(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The lowest validation AED; ties go to the first point (the lowest τ of the grid)."""
    if not points:
        raise ValueError("no sweep points to choose from")
    best = points[0]
    for p in points[1:]:
        if p["aed"] < best["aed"] - 1e-12:
            best = p
    return best


def _mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    mean = float(statistics.fmean(values))
    return mean, (float(statistics.stdev(values)) if len(values) > 1 else None)


def aggregate_seeds(
    per_seed: Sequence[dict[str, Any]],
    abstained: Sequence[Sequence[bool]],
    correct: Sequence[Sequence[bool]],
    bootstrap_samples: int,
) -> dict[str, Any]:
    """Mean ± s.d. over seeds of each score, and the bootstrap interval of the mean AED."""
    from se_ray.evaluate import bootstrap_mean_interval

    out: dict[str, Any] = {"num_questions": per_seed[0]["num_questions"], "seeds": len(per_seed)}
    for name in ("aed", "accuracy", "engagement", "correct", "incorrect", "abstained"):
        out[f"{name}_mean"], out[f"{name}_sd"] = _mean_sd([m[name] for m in per_seed])
    for name in ("aed", "accuracy", "engagement"):
        out[f"{name}_ci95"] = list(bootstrap_mean_interval(abstained, correct, name, bootstrap_samples))
    out["aed_per_seed"] = [m["aed"] for m in per_seed]
    return out


# ---------------------------------------------------------------------------- stage markers


class Stage:
    """``_stage.json`` in a stage's folder: ``{"key", "done", "summary"}``."""

    def __init__(self, fs: Any, folder: str, key: str):
        self.fs, self.folder, self.key = fs, folder, key
        self.path = join(folder, STAGE_FILE)

    def _state(self) -> dict[str, Any] | None:
        if not exists(self.fs, self.path):
            return None
        try:
            return json.loads(read_text(self.fs, self.path))
        except (OSError, ValueError):
            return None

    def cached(self) -> dict[str, Any] | None:
        state = self._state()
        if state and state.get("key") == self.key and state.get("done"):
            return state.get("summary") or {}
        return None

    def begin(self) -> None:
        """Start (or resume) the stage; a folder left by another config is emptied first."""
        state = self._state()
        if exists(self.fs, self.folder) and (state is None or state.get("key") != self.key):
            self.fs.delete_dir_contents(self.folder, missing_dir_ok=True)
        self.fs.create_dir(self.folder, recursive=True)
        write_json(self.fs, self.path, {"key": self.key, "done": False})

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        write_json(self.fs, self.path, {"key": self.key, "done": True, "summary": summary})
        return summary


# ---------------------------------------------------------------------------- helpers


def _write_jsonl(fs: Any, path: str, rows: Sequence[dict[str, Any]]) -> None:
    write_text_atomic(fs, path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _read_jsonl(cfg: JobConfig, location: str) -> list[dict[str, Any]]:
    fs, path = filesystem(location, cfg.storage)
    if not exists(fs, path):
        return []
    return [json.loads(x) for x in read_text(fs, path).splitlines() if x.strip()]


def _read_labels(cfg: JobConfig, labels_location: str, columns: list[str] | None = None):
    from se_ray.storage import read_parquet_folder

    fs, path = filesystem(join(labels_location, "labels"), cfg.storage)
    table = read_parquet_folder(fs, path, columns=columns)
    if table is None:
        raise RuntimeError(f"no labels in {labels_location}/labels")
    return table.sort_by(col.ID)


def _absolute_model(ref: str) -> str:
    path = os.path.expanduser(ref)
    return os.path.abspath(path) if ref and os.path.isdir(path) else ref


def _prepared(cfg: JobConfig) -> JobConfig:
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


def _eval_engine_config(cfg: JobConfig) -> SamplingConfig:
    from se_ray.evaluate import lora_engine_config

    if cfg.train.method == "lora":
        return lora_engine_config(cfg.sampling, cfg.train.lora_r)
    return cfg.sampling


class Engines:
    """vLLM engine pools acquired on first use and released together (only those started here)."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.generation_cfg = _eval_engine_config(cfg)
        self._pools: dict[str, Any] = {}

    def pool(self, engine_cfg: SamplingConfig):
        from se_ray.engine import acquire_engines, engine_digest
        from se_ray.runtime import ensure_ray

        digest = engine_digest(engine_cfg)
        if digest not in self._pools:
            ensure_ray(self.cfg.ray)
            self._pools[digest] = acquire_engines(engine_cfg, self.cfg.ray)
        return self._pools[digest]

    def generation(self):
        return self.pool(self.generation_cfg)

    def judge_pool(self, generation_cfg: SamplingConfig | None = None):
        from se_ray.evaluate import judge_engine_config

        if self.cfg.eval.judge != "llm":
            return None
        return self.pool(judge_engine_config(self.cfg, generation_cfg or self.generation_cfg))

    def judge(self, generation_cfg: SamplingConfig | None = None):
        from se_ray.evaluate import build_judge

        return build_judge(self.cfg, self.judge_pool(generation_cfg))

    def release_one(self, engine_cfg: SamplingConfig) -> None:
        from se_ray.engine import engine_digest

        if engine_digest(engine_cfg) != engine_digest(self.generation_cfg):
            pool = self._pools.pop(engine_digest(engine_cfg), None)
            if pool is not None:
                pool.release()

    def release(self) -> None:
        for pool in self._pools.values():
            pool.release()
        self._pools.clear()


def _local_folder(cfg: JobConfig, location: str) -> str:
    """A local path vLLM can read: the folder itself, or a cached copy of a URI folder."""
    from se_ray.storage import is_uri

    if not is_uri(location):
        return location
    import pyarrow.fs as pafs

    from se_ray.models import cache_dir

    fs, path = filesystem(location, cfg.storage)
    local = cache_dir() / "remote" / hashlib.sha1(location.encode()).hexdigest()[:16]
    if not (local / "adapter_config.json").exists() and not (local / "config.json").exists():
        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return str(local)


def evaluate_model(
    cfg: JobConfig,
    engines: Engines,
    rows: Sequence[dict[str, Any]],
    output: str,
    key: str,
    model: str | None,
    info: dict[str, Any],
) -> dict[str, Any]:
    """One model on one split, as a cached stage. ``model``: None (the base model, served by
    the run's LoRA engine), a LoRA adapter folder (same engine) or a merged model folder (its
    own engine, stopped afterwards)."""
    from se_ray.evaluate import evaluate_rows, resolve_eval_model

    fs, folder = filesystem(output, cfg.storage)
    stage = Stage(fs, folder, key)
    cached = stage.cached()
    if cached is not None:
        return cached
    stage.begin()
    if model is None:
        engine_cfg, adapter, kind = engines.generation_cfg, None, "base"
    else:
        target = resolve_eval_model(cfg, _local_folder(cfg, model))
        engine_cfg, adapter, kind = target.engine, target.adapter, target.kind
    summary = evaluate_rows(
        cfg,
        rows,
        engines.pool(engine_cfg),
        engines.judge(),
        output,
        adapter=adapter,
        info={"model": model or cfg.sampling.model, "model_kind": kind, **info},
    )
    if kind == "model":
        engines.release_one(engine_cfg)  # a merged model's own engine: not needed again
    return stage.finish(summary)


# ---------------------------------------------------------------------------- trials


def _trial_model(train_summary: dict[str, Any]) -> str:
    model = train_summary.get("adapter") or train_summary.get("merged")
    if not model:
        raise RuntimeError(f"training exported neither an adapter nor a merged model: {train_summary}")
    return model


def run_trial(cfg: JobConfig, spec: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """One trial: relabel the training set by the spec's rule, train, evaluate on validation."""

    from se_ray.label import label_schema
    from se_ray.storage import write_parquet_atomic
    from se_ray.train import train_job

    fs, folder = filesystem(spec["folder"], cfg.storage)
    stage = Stage(fs, folder, spec["key"])
    cached = stage.cached()
    if cached is not None:
        return cached
    stage.begin()
    started = time.perf_counter()

    rule = spec["rule"]
    table = _read_labels(cfg, ctx["labels"])
    ids = table.column(col.ID).to_pylist()
    if rule["method"] == "r_tuning":
        judged = _read_judged(cfg, ctx["r_tuning"])
        abstain = r_tuning_rule([judged.get(i) for i in ids])
    else:
        abstain = entropy_rule(table.column(SCORE_OF[rule["method"]]).to_pylist(), rule["tau"])
    if partition_digest(ids, abstain) != spec["digest"]:
        raise RuntimeError(f"trial {spec['name']}: the labels changed since the sweep was planned")
    labels = relabel(table, abstain, cfg.labeling.abstention_text, rule["method"], rule.get("tau"))
    labels = labels.select(label_schema().names).cast(label_schema())
    labels_location = join(spec["folder"], "labels")
    write_parquet_atomic(fs, join(folder, "labels", "part-0.parquet"), labels)

    train_file = join(folder, "train_summary.json")
    if exists(fs, train_file):
        train_summary = json.loads(read_text(fs, train_file))
    else:
        trial_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": spec["seed"]})})
        train_summary = train_job(
            trial_cfg, labels=labels_location, output=join(spec["folder"], "train"), resume=True
        )
        write_json(fs, train_file, train_summary)

    engines = Engines(cfg)
    try:
        validation = evaluate_model(
            cfg,
            engines,
            _read_jsonl(cfg, ctx["validation"]),
            join(spec["folder"], "validation"),
            config_key(spec["key"], "validation"),
            _trial_model(train_summary),
            {"split": "validation", "trial": spec["name"]},
        )
    finally:
        engines.release()
    summary = {
        "trial": spec["name"],
        "digest": spec["digest"],
        "seed": spec["seed"],
        "rule": rule,
        "rows": labels.num_rows,
        "abstained": int(sum(bool(a) for a in abstain if a is not None)),
        "model": _trial_model(train_summary),
        "train": {k: train_summary.get(k) for k in ("final_loss", "steps", "tokens_per_s", "wall_s")},
        "validation": validation,
        "wall_s": round(time.perf_counter() - started, 2),
    }
    return stage.finish(summary)


def _tune_trial(
    config: dict[str, Any], job: dict[str, Any], specs: dict[str, Any], ctx: dict[str, Any]
) -> None:
    """The Ray Tune function trainable: one trial, its validation scores reported to Tune."""
    from ray import tune

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run_trial(JobConfig.model_validate(job), specs[config["trial"]], ctx)
    v = summary["validation"]
    tune.report({k: v[k] for k in ("aed", "accuracy", "engagement", "correct", "incorrect", "abstained")})


def _run_tune(cfg: JobConfig, specs: list[dict[str, Any]], ctx: dict[str, Any], name: str) -> None:
    """The trials as one Ray Tune grid (a function trainable launching Ray Train inside)."""
    from ray import tune

    from se_ray.storage import is_uri

    root = join(ctx["output"], "tune")
    fs, root_path = filesystem(root, cfg.storage)
    stale = join(root_path, name)
    if exists(fs, stale):  # reuse is through the trial folders' markers, not Tune's restore
        fs.delete_dir(stale)
    fs.create_dir(root_path, recursive=True)
    trainable = tune.with_parameters(
        _tune_trial, job=cfg.model_dump(mode="json"), specs={s["name"]: s for s in specs}, ctx=ctx
    )
    # The trial function only launches the trainer and waits. Tune refuses an empty resource
    # request, so "no CPU" is a request for one byte of memory.
    resources = {"cpu": cfg.sweep.trial_num_cpus} if cfg.sweep.trial_num_cpus > 0 else {"memory": 1}
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={"trial": tune.grid_search([s["name"] for s in specs])},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.sweep.max_concurrent_trials),
        run_config=tune.RunConfig(
            name=name,
            storage_path=root_path if is_uri(root) else root,
            storage_filesystem=fs if is_uri(root) else None,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables: stdout is the CLI's JSON summary
        grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(
            f"{len(grid.errors)} of {len(specs)} Tune trials ({name}) failed; first: {grid.errors[0]}"
        )


def run_trials(
    cfg: JobConfig, specs: list[dict[str, Any]], ctx: dict[str, Any], engines: Engines, name: str
) -> tuple[dict[str, dict[str, Any]], int]:
    """Summaries of the trials, by name; the unfinished ones run as a Tune grid. Returns (summaries, ran)."""
    todo = []
    for spec in specs:
        fs, folder = filesystem(spec["folder"], cfg.storage)
        if Stage(fs, folder, spec["key"]).cached() is None:
            todo.append(spec)
    if todo:
        if cfg.train.use_gpu:
            # Trainers need the GPUs the engines hold: each trial starts (and stops) its own
            # engine for validation, and the driver's come back for the final evaluation.
            engines.release()
        else:
            # CPU: logical CPUs are shared, so one warm engine serves every trial (found by name).
            engines.generation()
            engines.judge_pool()
        logger.info(
            "%s: %d trial(s) to run as a Ray Tune grid, %d reused", name, len(todo), len(specs) - len(todo)
        )
        _run_tune(cfg, todo, ctx, name)
    out = {}
    for spec in specs:
        fs, folder = filesystem(spec["folder"], cfg.storage)
        summary = Stage(fs, folder, spec["key"]).cached()
        if summary is None:
            raise RuntimeError(f"trial {spec['name']} reported no result")
        out[spec["name"]] = summary
    return out, len(todo)


# ---------------------------------------------------------------------------- stages


def _split_stage(cfg: JobConfig, input: str, output: str, log: dict[str, Any]) -> tuple[dict[str, list], str]:
    from se_ray.data import load_questions

    location = join(output, "split")
    fs, folder = filesystem(location, cfg.storage)
    key = config_key("split", input, cfg.data.model_dump(), cfg.split.model_dump())
    stage = Stage(fs, folder, key)
    if stage.cached() is None:
        stage.begin()
        loaded = load_questions(input, cfg.data, cfg.storage)
        parts: dict[str, list] = split_rows(loaded.rows, cfg.split)
        rejects = list(loaded.rejects)
        if cfg.split.ood_input:
            from se_ray.evaluate import split_references

            ood = load_questions(cfg.split.ood_input, DataConfig(limit=cfg.split.ood_limit), cfg.storage)
            parts["ood"], no_refs = split_references(ood.rows, cfg.split.ood_input)
            rejects += ood.rejects + no_refs
            if not parts["ood"]:
                raise ConfigError(f"split.ood_input={cfg.split.ood_input}: no questions with references")
        for name, rows in parts.items():
            _write_jsonl(fs, join(folder, f"{name}.jsonl"), rows)
        _write_jsonl(fs, join(folder, "rejects.jsonl"), rejects)
        stage.finish({name: len(rows) for name, rows in parts.items()} | {"rejected": len(rejects)})
        log["split"] = "ran"
    else:
        log["split"] = "reused"
    splits = {name: _read_jsonl(cfg, join(location, f"{name}.jsonl")) for name in SPLITS}
    logger.info("split: %s", ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    return splits, key


def _label_stage(
    cfg: JobConfig, output: str, split_key: str, engines: Engines, log: dict[str, Any]
) -> tuple[str, str]:
    from se_ray.engine import engine_digest
    from se_ray.label import label_job

    location = join(output, "label")
    fs, folder = filesystem(location, cfg.storage)
    operational = {"batch_size", "num_engines", "num_cpus_per_engine", "num_gpus_per_engine", "env"}
    key = config_key(
        "label",
        split_key,
        cfg.sampling.model_dump(exclude=operational),
        cfg.entailment.model_dump(
            exclude={"batch_size", "model_batch_size", "num_actors", "max_actors", "num_cpus", "num_gpus"}
        ),
    )
    stage = Stage(fs, folder, key)
    if stage.cached() is not None:
        log["label"] = "reused"
        return location, key
    stage.begin()
    label_cfg = cfg.model_copy(update={"data": DataConfig(format="jsonl")})
    if engine_digest(label_cfg.sampling) == engine_digest(engines.generation_cfg):
        engines.generation()  # held by this run: labeling reuses it and leaves it running
    summary = label_job(label_cfg, input=join(output, "split", "train.jsonl"), output=location)
    log["label"] = "ran"
    stage.finish(summary)
    return location, key


def _read_judged(cfg: JobConfig, location: str) -> dict[str, bool | None]:
    import pyarrow.parquet as pq

    fs, path = filesystem(location, cfg.storage)
    table = pq.read_table(path, filesystem=fs)
    return dict(zip(table.column(col.ID).to_pylist(), table.column(JUDGED).to_pylist(), strict=True))


def _eval_key(cfg: JobConfig) -> dict[str, Any]:
    """What an evaluation's outcome depends on, beyond the model and the questions."""
    return {
        "eval": cfg.eval.model_dump(exclude={"judge_tensor_parallel_size"}),
        "answer_style": cfg.sampling.answer_style,
        "stop": cfg.sampling.stop,
        "max_tokens": cfg.eval.max_tokens or cfg.sampling.max_tokens,
        "abstention_text": cfg.labeling.abstention_text,
        "model": cfg.sampling.model,
    }


def _r_tuning_stage(
    cfg: JobConfig, output: str, label_location: str, label_key: str, engines: Engines, log: dict[str, Any]
) -> str:
    """The eval judge on every training question's standard answer (None without references)."""
    import pyarrow as pa

    from se_ray.storage import write_parquet_atomic

    location = join(output, "r_tuning")
    file = join(location, "standard_judged.parquet")
    fs, folder = filesystem(location, cfg.storage)
    stage = Stage(fs, folder, config_key("r_tuning", label_key, _eval_key(cfg)))
    if stage.cached() is not None:
        log["r_tuning_judge"] = "reused"
        return file
    stage.begin()
    table = _read_labels(cfg, label_location, [col.ID, col.QUESTION, col.REFERENCES, col.STANDARD_ANSWER])
    rows = table.to_pylist()
    todo = [r for r in rows if r[col.REFERENCES]]
    verdicts = engines.judge().judge(
        [r[col.QUESTION] for r in todo],
        [r[col.STANDARD_ANSWER] or "" for r in todo],
        [r[col.REFERENCES] for r in todo],
    )
    by_id = {r[col.ID]: bool(v) for r, v in zip(todo, verdicts, strict=True)}
    correct = [by_id.get(r[col.ID]) for r in rows]
    _, path = filesystem(file, cfg.storage)
    write_parquet_atomic(
        fs, path, pa.table({col.ID: [r[col.ID] for r in rows], JUDGED: pa.array(correct, pa.bool_())})
    )
    log["r_tuning_judge"] = "ran"
    stage.finish({"judged": len(todo), "correct": sum(by_id.values()), "unjudged": len(rows) - len(todo)})
    return file


def plan_sweep(cfg: JobConfig, table, judged: dict[str, bool | None] | None) -> dict[str, Any]:
    """Per method, the τ points and the partition each gives; the distinct partitions (trials)."""
    ids = table.column(col.ID).to_pylist()
    methods: dict[str, list[dict[str, Any]]] = {}
    partitions: dict[str, dict[str, Any]] = {}
    for method in cfg.sweep.methods:
        if method == "r_tuning":
            abstain = r_tuning_rule([judged.get(i) for i in ids] if judged else [None] * len(ids))
            digest = partition_digest(ids, abstain)
            partitions.setdefault(
                digest,
                {
                    "rule": {"method": "r_tuning", "tau": None},
                    "rows": sum(a is not None for a in abstain),
                    "abstained": sum(bool(a) for a in abstain if a is not None),
                },
            )
            methods[method] = [{"tau": None, "digest": digest}]
            continue
        scores = table.column(SCORE_OF[method]).to_pylist()
        points = []
        for group in group_taus(ids, scores, cfg.sweep.taus):
            partitions.setdefault(
                group["digest"],
                {
                    "rule": {"method": method, "tau": group["taus"][0]},
                    "rows": len(ids),
                    "abstained": group["abstained"],
                },
            )
            points += [{"tau": t, "digest": group["digest"]} for t in group["taus"]]
        methods[method] = sorted(points, key=lambda p: cfg.sweep.taus.index(p["tau"]))
    return {"methods": methods, "partitions": partitions}


def _trial_spec(
    cfg: JobConfig,
    output: str,
    label_key: str,
    split_key: str,
    digest: str,
    partition: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    key = config_key(
        "trial", label_key, split_key, digest, seed, cfg.train.model_dump(exclude={"seed"}), _eval_key(cfg)
    )
    name = f"p{digest[:10]}-seed{seed}"
    return {
        "name": name,
        "digest": digest,
        "seed": seed,
        "rule": partition["rule"],
        "key": key,
        "folder": join(output, "trials", f"{name}-{key[:8]}"),
    }


def _results_flags(cfg: JobConfig, eval_location: str, ids: Sequence[str]) -> tuple[list[bool], list[bool]]:
    from se_ray.evaluate import ABSTAINED, CORRECT, read_results

    fs, folder = filesystem(eval_location, cfg.storage)
    table = read_results(fs, folder)
    by_id = dict(
        zip(
            table.column(col.ID).to_pylist(),
            zip(table.column(ABSTAINED).to_pylist(), table.column(CORRECT).to_pylist(), strict=True),
            strict=True,
        )
    )
    return [bool(by_id[i][0]) for i in ids], [bool(by_id[i][1]) for i in ids]


def report_split_title(split: str) -> str:
    from se_ray.report import SPLIT_TITLES

    return SPLIT_TITLES.get(split, split)


def _judge_label(cfg: JobConfig) -> str:
    if cfg.eval.judge == "llm":
        return f"llm ({cfg.eval.judge_model or cfg.sampling.model})"
    if cfg.eval.judge == "f1":
        return f"f1 (max SQuAD F1 ≥ {cfg.eval.f1_threshold:g})"
    return "exact (normalised match or containment)"


def report_data(cfg: JobConfig, ctx: dict[str, Any]) -> dict[str, Any]:
    """The ``se_ray.report`` dict of a finished run."""
    setup = {
        "model": cfg.sampling.model,
        "answer style": cfg.sampling.answer_style,
        "samples per question (M)": cfg.sampling.num_samples,
        "entailment": f"{cfg.entailment.judge} ({cfg.entailment.model or cfg.sampling.model})",
        "judge": _judge_label(cfg),
        "split (train / validation / test / OOD)": " / ".join(str(len(ctx["splits"][s])) for s in SPLITS),
        "τ grid": ", ".join(f"{t:g}" for t in cfg.sweep.taus),
        "seeds": cfg.sweep.seeds,
        "training": f"{cfg.train.method}, {cfg.train.epochs} epochs, lr {cfg.train.learning_rate:g}, "
        f"{cfg.train.num_workers} workers, ZeRO-{cfg.train.zero_stage}",
    }
    return {
        "title": "se-ray run: abstention fine-tuning with semantic entropy",
        "setup": setup,
        "methods": ctx["methods"],
        "sweep": ctx["sweep_points"],
        "adaptation_split": ctx["adaptation_split"],
        "train_scores": ctx["train_scores"],
        "taus": list(cfg.sweep.taus),
        "chosen_tau": {
            m["method"]: m["chosen_tau"] for m in ctx["methods"] if m.get("chosen_tau") is not None
        },
        "notes": ctx["notes"],
    }


def _publish_report(cfg: JobConfig, data: dict[str, Any], output: str) -> dict[str, str]:
    from se_ray.report import render_report
    from se_ray.storage import is_uri, write_bytes_atomic

    fs, out = filesystem(output, cfg.storage)
    if not is_uri(output):
        return render_report(data, out)
    with tempfile.TemporaryDirectory(prefix="se-ray-report-") as tmp:
        local = render_report(data, tmp)
        paths = {}
        for name, path in local.items():
            with open(path, "rb") as f:
                write_bytes_atomic(fs, join(out, os.path.basename(path)), f.read())
            paths[name] = join(output, os.path.basename(path))
        return paths


SCORE_KEYS = ("aed", "correct", "incorrect", "abstained", "num_questions")


class _Run:
    """The state one ``run_job`` call threads through its stages."""

    def __init__(self, cfg: JobConfig, output: str):
        self.cfg = cfg
        self.output = output
        self.fs, self.out = filesystem(output, cfg.storage)
        self.log: dict[str, Any] = {}
        self.notes: list[str] = []
        self.engines = Engines(cfg)
        self.seeds = [cfg.train.seed + k for k in range(cfg.sweep.seeds)]

    def spec(self, digest: str, seed: int) -> dict[str, Any]:
        return _trial_spec(
            self.cfg,
            self.output,
            self.label_key,
            self.split_key,
            digest,
            self.plan["partitions"][digest],
            seed,
        )

    def sweep(self) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
        """The τ sweep (first seed, one trial per distinct partition) and the chosen point per method."""
        plan = self.plan
        digests = list(dict.fromkeys(p["digest"] for points in plan["methods"].values() for p in points))
        specs = [self.spec(d, self.seeds[0]) for d in digests]
        trials, ran = run_trials(self.cfg, specs, self.ctx, self.engines, "sweep")
        self.log["sweep_trials"] = {"ran": ran, "reused": len(specs) - ran}
        by_digest = {t["digest"]: t for t in trials.values()}
        sweep_points: dict[str, list[dict[str, Any]]] = {}
        chosen: dict[str, dict[str, Any]] = {}
        for method, points in plan["methods"].items():
            sweep_points[method] = [
                {
                    "tau": p["tau"],
                    "trial": by_digest[p["digest"]]["trial"],
                    "digest": p["digest"],
                    "validation": {k: by_digest[p["digest"]]["validation"][k] for k in SCORE_KEYS},
                }
                for p in points
            ]
            chosen[method] = choose_point(
                [{**p, "aed": p["validation"]["aed"]} for p in sweep_points[method]]
            )
            shared = [p["tau"] for p in points if p["digest"] == chosen[method]["digest"]]
            if method != "r_tuning" and len(shared) > 1:
                self.notes.append(
                    f"{METHOD_LABELS[method]}: τ = {', '.join(f'{t:g}' for t in shared)} give the same "
                    "training set (one trained model)."
                )
        write_json(
            self.fs,
            join(self.out, "sweep", "selection.json"),
            {m: {"tau": c["tau"], "digest": c["digest"], "aed": c["aed"]} for m, c in chosen.items()},
        )
        self.trials = trials
        return sweep_points, chosen

    def seed_runs(self, chosen: dict[str, dict[str, Any]]) -> None:
        """Retrain each chosen partition (R-Tuning's included) with the other seeds."""
        specs = {
            s["name"]: s
            for digest in dict.fromkeys(c["digest"] for c in chosen.values())
            for s in (self.spec(digest, k) for k in self.seeds[1:])
        }
        ran = 0
        if specs:
            trials, ran = run_trials(self.cfg, list(specs.values()), self.ctx, self.engines, "seeds")
            self.trials.update(trials)
        self.log["seed_trials"] = {"ran": ran, "reused": len(specs) - ran}

    def evaluate(self, split: str, member: dict[str, Any] | None, method: str) -> tuple[str, dict[str, Any]]:
        """One model (None: untuned) on one split; returns (its folder, its scores)."""
        if member is None:
            location = join(self.output, "untuned", split)
            key, model = config_key("untuned", self.split_key, _eval_key(self.cfg), split), None
        else:
            spec = self.spec(member["digest"], member["seed"])
            location, key, model = (
                join(spec["folder"], split),
                config_key(spec["key"], split),
                member["model"],
            )
        fs, folder = filesystem(location, self.cfg.storage)
        self.log.setdefault("evaluations_ran", 0)
        if Stage(fs, folder, key).cached() is None:
            self.log["evaluations_ran"] += 1
        scores = evaluate_model(
            self.cfg,
            self.engines,
            self.splits[split],
            location,
            key,
            model,
            {"split": split, "method": method},
        )
        return location, scores

    def all_thresholds(self, sweep_points: dict[str, list[dict[str, Any]]]) -> None:
        """Every sweep model (one per τ, first seed) and the untuned one on test and OOD
        (the paper's all-threshold evaluation, behind the adaptation plot)."""
        for method, points in sweep_points.items():
            for p in points:
                member = None if method == "untuned" else self.trials[p["trial"]]
                for split in self.eval_splits:
                    _, scores = self.evaluate(split, member, method)
                    p[split] = {k: scores[k] for k in SCORE_KEYS}

    def final(self, chosen: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """The untuned model and every method's chosen models (all seeds) on test and OOD."""
        models: list[tuple[str, Any, list[dict[str, Any] | None]]] = [("untuned", None, [None])]
        for method in self.cfg.sweep.methods:
            c = chosen[method]
            members = [self.trials[self.spec(c["digest"], k)["name"]] for k in self.seeds]
            models.append((method, c["tau"], members))
        out = []
        for method, tau, members in models:
            entry = {
                "method": method,
                "label": METHOD_LABELS[method],
                "chosen_tau": tau,
                "seeds": len(members),
                "splits": {},
            }
            for split in self.eval_splits:
                ids = [r[col.ID] for r in self.splits[split]]
                per_seed, abstained, correct = [], [], []
                for member in members:
                    location, scores = self.evaluate(split, member, method)
                    a, c = _results_flags(self.cfg, location, ids)
                    per_seed.append(scores)
                    abstained.append(a)
                    correct.append(c)
                entry["splits"][split] = aggregate_seeds(
                    per_seed, abstained, correct, self.cfg.eval.bootstrap_samples
                )
            out.append(entry)
        return out


def run_job(cfg: JobConfig, input: str, output: str) -> dict[str, Any]:
    """The whole job: split, label, sweep τ (Ray Tune), baselines, evaluate, report."""
    from se_ray.storage import is_uri

    started = time.perf_counter()
    cfg = _prepared(cfg)
    output = output if is_uri(output) else os.path.abspath(os.path.expanduser(output))
    run = _Run(cfg, output)
    run.fs.create_dir(run.out, recursive=True)
    write_text_atomic(run.fs, join(run.out, "config.yaml"), cfg.to_yaml())

    run.splits, run.split_key = _split_stage(cfg, input, output, run.log)
    run.eval_splits = [s for s in ("test", "ood") if run.splits[s]]
    adaptation = "ood" if run.splits["ood"] else ("test" if run.splits["test"] else "validation")
    try:
        label_location, run.label_key = _label_stage(cfg, output, run.split_key, run.engines, run.log)
        table = _read_labels(cfg, label_location, [col.ID, col.SEMANTIC_ENTROPY, col.EXACT_ENTROPY])
        run.ctx = {
            "output": output,
            "labels": label_location,
            "validation": join(output, "split", "validation.jsonl"),
            "r_tuning": None,
        }
        judged = None
        if "r_tuning" in cfg.sweep.methods:
            run.ctx["r_tuning"] = _r_tuning_stage(
                cfg, output, label_location, run.label_key, run.engines, run.log
            )
            judged = _read_judged(cfg, run.ctx["r_tuning"])
            unjudged = sum(v is None for v in judged.values())
            if unjudged:
                run.notes.append(f"R-Tuning dropped {unjudged} training questions without references.")
        run.plan = plan_sweep(cfg, table, judged)
        write_json(run.fs, join(run.out, "sweep", "plan.json"), run.plan)
        sweep_points, chosen = run.sweep()
        run.seed_runs(chosen)
        _, untuned = run.evaluate("validation", None, "untuned")
        sweep_points["untuned"] = [
            {"tau": None, "trial": "untuned", "validation": {k: untuned[k] for k in SCORE_KEYS}}
        ]
        run.all_thresholds(sweep_points)
        methods = run.final(chosen)
    finally:
        run.engines.release()

    if not run.splits["test"]:
        run.notes.append("split.test=0: no in-distribution test evaluation.")
    run.notes.append(
        f"τ is chosen on the validation split; the adaptation plot shows every τ's model on the "
        f"{report_split_title(adaptation)}."
    )
    run.ctx.update(
        adaptation_split=adaptation,
        splits=run.splits,
        methods=methods,
        sweep_points=sweep_points,
        train_scores={"semantic_entropy": [float(v) for v in table.column(col.SEMANTIC_ENTROPY).to_pylist()]},
        notes=run.notes,
    )
    data = report_data(cfg, run.ctx)
    write_json(run.fs, join(run.out, "report_data.json"), data)
    paths = _publish_report(cfg, data, output)
    wall = time.perf_counter() - started
    summary = {
        "output": output,
        "report": paths.get("report"),
        "figures": {k: v for k, v in paths.items() if k != "report"},
        "stages": run.log,
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
        "wall_s": round(wall, 2),
    }
    write_json(run.fs, join(run.out, SUMMARY_FILE), summary)
    logger.info("run done in %.1f s: %s", wall, json.dumps(summary["methods"]))
    return summary


__all__ = [
    "Engines",
    "Stage",
    "aggregate_seeds",
    "choose_point",
    "config_key",
    "entropy_rule",
    "evaluate_model",
    "group_taus",
    "partition_digest",
    "plan_sweep",
    "r_tuning_rule",
    "relabel",
    "run_job",
    "run_trial",
    "split_rows",
]

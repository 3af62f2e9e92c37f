"""`se-ray label`: questions -> sampled answers -> meaning clusters and entropies -> labels.

One streaming Ray Data pipeline (sample actors, then entailment actors, then the
labeling rule); the driver commits each finished batch as one Parquet part under a
name derived from its ids, written atomically. A rerun skips ids already committed, so
a crash or Ctrl-C loses at most the batches in flight and never duplicates a row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import pyarrow as pa

from se_ray import columns as col
from se_ray.config import JobConfig, LabelingConfig
from se_ray.data import LoadedQuestions, load_questions
from se_ray.entropy import label_with_threshold
from se_ray.models import resolve_model
from se_ray.sample import with_columns
from se_ray.storage import (
    filesystem,
    join,
    read_parquet_folder,
    write_json,
    write_parquet_atomic,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

LABELS_DIR = "labels"
REJECTS_FILE = "rejects.jsonl"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "label_summary.json"

SCORE_COLUMNS = {
    "semantic_entropy": col.SEMANTIC_ENTROPY,
    "regular_semantic_entropy": col.REGULAR_SEMANTIC_ENTROPY,
    "exact_entropy": col.EXACT_ENTROPY,
}


def label_schema():
    import pyarrow as pa

    floats, ints, strings = pa.list_(pa.float64()), pa.list_(pa.int64()), pa.list_(pa.string())
    return pa.schema(
        [
            (col.ID, pa.string()),
            (col.QUESTION, pa.string()),
            (col.REFERENCES, strings),
            (col.CONTEXT, pa.string()),
            (col.SAMPLES, strings),
            (col.SAMPLE_LOGPROBS, floats),
            (col.SAMPLE_LOGPROB_SUMS, floats),
            (col.SAMPLE_TOKEN_COUNTS, ints),
            (col.STANDARD_ANSWER, pa.string()),
            (col.STANDARD_LOGPROB, pa.float64()),
            (col.NUM_GENERATED, pa.int64()),
            (col.CLUSTER_IDS, ints),
            (col.SEMANTIC_ENTROPY, pa.float64()),
            (col.REGULAR_SEMANTIC_ENTROPY, pa.float64()),
            (col.EXACT_ENTROPY, pa.float64()),
            (col.ENTAILMENT_CALLS, pa.float64()),
            (col.TAU, pa.float64()),
            (col.ABSTAIN, pa.bool_()),
            (col.TARGET, pa.string()),
            (col.LABEL_METHOD, pa.string()),
        ]
    )


def label_targets(
    scores: list[float], standard_answers: list[str], cfg: LabelingConfig
) -> tuple[list[bool], list[str]]:
    abstain = [label_with_threshold(s, cfg.tau) for s in scores]
    targets = [cfg.abstention_text if a else s for a, s in zip(abstain, standard_answers, strict=True)]
    return abstain, targets


def apply_labels(batch: pa.Table, cfg: LabelingConfig) -> pa.Table:
    """Entropy-threshold rule: score > tau -> the abstention text, else the standard answer."""
    if cfg.method not in SCORE_COLUMNS:
        raise ValueError(f"labeling.method={cfg.method!r} needs references and a judge; use `se-ray run`")
    scores = batch.column(SCORE_COLUMNS[cfg.method]).to_pylist()
    abstain, targets = label_targets(scores, batch.column(col.STANDARD_ANSWER).to_pylist(), cfg)
    n = len(scores)
    return with_columns(
        batch,
        {
            col.TAU: ([cfg.tau] * n, pa.float64()),
            col.ABSTAIN: (abstain, pa.bool_()),
            col.TARGET: (targets, pa.string()),
            col.LABEL_METHOD: ([cfg.method] * n, pa.string()),
        },
    )


def part_name(ids: list[str]) -> str:
    """Deterministic in the ids it holds: a re-committed batch overwrites itself."""
    return "part-" + hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:24] + ".parquet"


def finished_ids(fs, labels_path: str) -> set[str]:
    table = read_parquet_folder(fs, labels_path, columns=[col.ID])
    return set() if table is None else set(table.column(col.ID).to_pylist())


def write_rejects(fs, path: str, loaded: LoadedQuestions) -> None:
    write_text_atomic(fs, path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in loaded.rejects))


def _conform(table):
    """Cast a stage batch to the label schema (all-null columns arrive typed as null)."""
    import pyarrow as pa

    schema = label_schema()
    arrays = []
    for f in schema:
        if f.name in table.column_names:
            arrays.append(table.column(f.name).cast(f.type))
        else:
            arrays.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _run_pipeline(cfg: JobConfig, todo: list[dict[str, Any]], fs, labels_path: str) -> dict[str, Any]:
    import pyarrow as pa
    import ray

    from se_ray.data import question_schema
    from se_ray.engine import acquire_engines
    from se_ray.entailment import add_entropy_stage, judge_engine_config
    from se_ray.runtime import ensure_ray
    from se_ray.sample import add_sample_stage

    ensure_ray(cfg.ray)
    # Engines start without waiting: Ray Data starts its actors (the entailment model loads)
    # meanwhile, and the first batch reaches the engine the moment it is ready.
    engines = acquire_engines(cfg.sampling, cfg.ray, wait=False)
    pools = [engines]
    judge_engines = None
    if cfg.entailment.judge == "llm":
        judge_cfg = judge_engine_config(cfg.entailment, cfg.sampling)
        if judge_cfg is cfg.sampling:
            judge_engines = engines
        else:
            judge_engines = acquire_engines(judge_cfg, cfg.ray, wait=False)
            pools.append(judge_engines)
    try:
        size = cfg.sampling.batch_size
        table = pa.Table.from_pylist(todo, schema=question_schema())
        blocks = [table.slice(i, size) for i in range(0, table.num_rows, size)]
        ds = ray.data.from_arrow(blocks)
        ds = add_sample_stage(
            ds,
            cfg.sampling,
            engines,
            entailment=cfg.entailment,
            tau=cfg.labeling.tau,
            judge_engines=judge_engines,
        )
        ds = add_entropy_stage(ds, cfg.entailment, judge_engines)
        ds = ds.map_batches(
            apply_labels,
            fn_kwargs={"cfg": cfg.labeling},
            batch_format="pyarrow",
            num_cpus=0.1,
            batch_size=None,
        )
        done, calls, started = 0, 0.0, time.perf_counter()
        first_row_s = None
        try:
            for batch in ds.iter_batches(batch_size=cfg.labeling.write_batch_size, batch_format="pyarrow"):
                part = _conform(batch)
                ids = part.column(col.ID).to_pylist()
                write_parquet_atomic(fs, join(labels_path, part_name(ids)), part)
                done += part.num_rows
                calls += sum(part.column(col.ENTAILMENT_CALLS).to_pylist())
                elapsed = time.perf_counter() - started
                first_row_s = first_row_s or elapsed
                logger.info(
                    "labeled %d/%d questions (%.2f q/s, %d abstain in this part)",
                    done,
                    len(todo),
                    done / elapsed,
                    sum(part.column(col.ABSTAIN).to_pylist()),
                )
        except Exception:
            for pool in pools:
                pool.wait_ready()  # an engine that failed to start is the error to report
            raise
        engine_ready_s = max(pool.ready_after_s() for pool in pools)
    finally:
        for pool in pools:
            pool.release()
    return {
        "engine_ready_s": round(engine_ready_s, 2),
        "entailment_calls_per_question": round(calls / done, 2) if done else 0.0,
        "first_part_s": round(first_row_s or 0.0, 2),
    }


def check_models(cfg: JobConfig) -> None:
    """Fail before any cluster work on a model folder that does not exist (hub ids load later)."""
    resolve_model(cfg.sampling.model)
    if cfg.entailment.judge != "llm" or cfg.entailment.model:
        resolve_model(cfg.entailment.model)


def label_job(cfg: JobConfig, input: str, output: str) -> dict[str, Any]:
    """Label every valid question of ``input`` into ``output/labels/``; returns the summary."""
    started = time.perf_counter()
    check_models(cfg)
    fs, out = filesystem(output, cfg.storage)
    labels_path = join(out, LABELS_DIR)
    fs.create_dir(out, recursive=True)
    loaded = load_questions(input, cfg.data, cfg.storage)
    write_rejects(fs, join(out, REJECTS_FILE), loaded)
    write_text_atomic(fs, join(out, CONFIG_FILE), cfg.to_yaml())
    for r in loaded.rejects:
        logger.warning("rejected %s line %s id %s: %s", r["source"], r["line"], r["id"], r["reason"])

    done_before = finished_ids(fs, labels_path)
    todo = [r for r in loaded.rows if r[col.ID] not in done_before]
    logger.info(
        "%d questions: %d already labeled, %d to label",
        len(loaded.rows),
        len(loaded.rows) - len(todo),
        len(todo),
    )
    stats: dict[str, Any] = {}
    if todo:
        stats = _run_pipeline(cfg, todo, fs, labels_path)
    labels = read_parquet_folder(fs, labels_path, columns=[col.ID, col.ABSTAIN])
    wanted = {r[col.ID] for r in loaded.rows}
    ids = labels.column(col.ID).to_pylist() if labels is not None else []
    abstained = sum(
        a
        for i, a in zip(ids, labels.column(col.ABSTAIN).to_pylist() if labels else [], strict=True)
        if i in wanted
    )
    wall = time.perf_counter() - started
    summary = {
        "input": input,
        "output": output,
        "questions": len(loaded.rows),
        "labeled_now": len(todo),
        "already_labeled": len(loaded.rows) - len(todo),
        "rejected": len(loaded.rejects),
        "abstained": int(abstained),
        "tau": cfg.labeling.tau,
        "method": cfg.labeling.method,
        "wall_s": round(wall, 2),
        "questions_per_s": round(len(todo) / wall, 3) if todo else 0.0,
        **stats,
    }
    write_json(fs, join(out, SUMMARY_FILE), summary)
    return summary

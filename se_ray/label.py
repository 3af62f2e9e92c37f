"""`se-ray label`: questions -> sampled answers -> meaning clusters and entropies -> labels.

One streaming Ray Data pipeline (sample actors, then entailment actors, then the
labeling rule); the driver commits each finished batch as one Parquet part under a
name derived from its ids, written atomically. A rerun skips ids already committed, so
a crash or Ctrl-C loses at most the batches in flight and never duplicates a row.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from se_ray import columns as col
from se_ray.config import JobConfig, LabelingConfig
from se_ray.data import load_questions, require_questions
from se_ray.judges.correctness import diagnostic_judge
from se_ray.labeling import SCORE_COLUMNS, label_by_score, score_diagnostics
from se_ray.models import check_model
from se_ray.storage import Store, read_parquet_folder

logger = logging.getLogger(__name__)

LABELS_DIR = "labels"
REJECTS_FILE = "rejects.jsonl"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "label_summary.json"


def apply_labels(batch: pa.Table, cfg: LabelingConfig) -> pa.Table:
    """The pipeline's last step: the configured rule at the configured τ."""
    return label_by_score(batch, cfg.method, cfg.tau, cfg.abstention_text)


def part_name(ids: list[str]) -> str:
    """Deterministic in the ids it holds: a re-committed batch overwrites itself."""
    return "part-" + hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:24] + ".parquet"


def read_labels(labels: Store, columns: list[str] | None = None) -> pa.Table | None:
    """The committed labels, one row per id (the part committed first wins), sorted by id."""
    table = read_parquet_folder(labels.fs, labels.path, columns=columns, unique_by=col.ID)
    return None if table is None else table.sort_by(col.ID)


@dataclass
class _Committed:
    rows: int = 0
    rejected: int = 0
    entailment_calls: float = 0.0
    first_part_s: float | None = None


def _reject_rows(out: Store, batch: pa.Table, source: str) -> pa.Table:
    """Move the rows the engine would not take to ``rejects.jsonl``; returns the others."""
    if col.REJECTED not in batch.column_names:
        return batch
    reasons = batch.column(col.REJECTED).to_pylist()
    if not any(reasons):
        return batch
    ids = batch.column(col.ID).to_pylist()
    new = [
        {"source": source, "line": None, "id": i, "reason": r} for i, r in zip(ids, reasons, strict=True) if r
    ]
    for r in new:
        logger.warning("rejected id %s: %s", r["id"], r["reason"])
    out.write_jsonl(REJECTS_FILE, out.read_jsonl(REJECTS_FILE) + new)
    return batch.filter(pa.array([r is None for r in reasons], pa.bool_()))


def _commit_parts(ds, out: Store, source: str, write_batch_size: int, total: int) -> _Committed:
    """Write each finished batch as one atomic part (its rejected rows to ``rejects.jsonl``)."""
    labels, done, started = out.child(LABELS_DIR), _Committed(), time.perf_counter()
    for batch in ds.iter_batches(batch_size=write_batch_size, batch_format="pyarrow"):
        kept = _reject_rows(out, batch, source)
        done.rejected += batch.num_rows - kept.num_rows
        if kept.num_rows:
            part = col.conform(kept, col.label_schema())
            labels.write_parquet(part_name(part.column(col.ID).to_pylist()), part)
            done.rows += part.num_rows
            done.entailment_calls += sum(part.column(col.ENTAILMENT_CALLS).to_pylist())
        elapsed = time.perf_counter() - started
        done.first_part_s = done.first_part_s or elapsed
        logger.info(
            "labeled %d/%d questions (%.2f q/s), %d rejected by the engine",
            done.rows,
            total,
            done.rows / elapsed,
            done.rejected,
        )
    return done


def _run_pipeline(cfg: JobConfig, todo: list[dict[str, Any]], out: Store, source: str) -> dict[str, Any]:
    import ray

    from se_ray.engine import Engines
    from se_ray.stages.entropy import add_entropy_stage
    from se_ray.stages.sample import add_sample_stage

    with Engines(cfg) as engines:
        # Engines start without waiting: Ray Data starts its actors (the entailment model loads)
        # meanwhile, and the first batch reaches the engine the moment it is ready.
        generation = engines.generation(wait=False)
        judge_engines = engines.entailment_judge_pool(wait=False)
        size = cfg.sampling.batch_size
        table = pa.Table.from_pylist(todo, schema=col.question_schema())
        ds = ray.data.from_arrow([table.slice(i, size) for i in range(0, table.num_rows, size)])
        ds = add_sample_stage(
            ds,
            cfg.sampling,
            generation,
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
        try:
            done = _commit_parts(ds, out, source, cfg.labeling.write_batch_size, len(todo))
        except Exception:
            engines.wait_ready()  # an engine that failed to start is the error to report
            raise
        engine_ready_s = engines.ready_after_s()
    return {
        "engine_ready_s": round(engine_ready_s, 2),
        "entailment_calls_per_question": round(done.entailment_calls / done.rows, 2) if done.rows else 0.0,
        "first_part_s": round(done.first_part_s or 0.0, 2),
        "labeled": done.rows,
        "rejected_by_engine": done.rejected,
    }


def check_models(cfg: JobConfig) -> None:
    """Fail before any cluster work on a model folder that does not exist (hub ids load later;
    a URI is checked where it is, not copied here)."""
    check_model(cfg.sampling.model, cfg.storage)
    if cfg.entailment.judge in ("embedding", "nli") or (
        cfg.entailment.judge == "llm" and cfg.entailment.model
    ):
        check_model(cfg.entailment.model, cfg.storage)


def label_job(cfg: JobConfig, input: str, output: str) -> dict[str, Any]:
    """Label every valid question of ``input`` into ``output/labels/``; returns the summary."""
    started = time.perf_counter()
    check_models(cfg)
    out = Store(output, cfg.storage)
    labels = out.child(LABELS_DIR)
    out.makedirs()
    loaded = load_questions(input, cfg.data, cfg.storage)
    out.write_jsonl(REJECTS_FILE, loaded.rejects)
    require_questions(loaded, out.uri(REJECTS_FILE))
    out.write_text(CONFIG_FILE, cfg.to_yaml())
    for r in loaded.rejects:
        logger.warning("rejected %s line %s id %s: %s", r["source"], r["line"], r["id"], r["reason"])

    committed = read_labels(labels, [col.ID, col.ABSTAIN])
    done_before = set() if committed is None else set(committed.column(col.ID).to_pylist())
    todo = [r for r in loaded.rows if r[col.ID] not in done_before]
    logger.info(
        "%d questions: %d already labeled, %d to label",
        len(loaded.rows),
        len(loaded.rows) - len(todo),
        len(todo),
    )
    stats = _run_pipeline(cfg, todo, out, input) if todo else {}
    labeled_now = stats.pop("labeled", 0)  # rows the engine rejected are in rejects.jsonl, not here
    committed = read_labels(labels)
    wanted = {r[col.ID] for r in loaded.rows}
    abstained, diagnostics = 0, None
    if committed is not None:
        committed = committed.filter(pa.array([i in wanted for i in committed.column(col.ID).to_pylist()]))
        abstained = sum(bool(a) for a in committed.column(col.ABSTAIN).to_pylist())
        diagnostics = score_diagnostics(committed, diagnostic_judge(cfg.eval))
    if diagnostics:
        logger.info(
            "how well each score predicts a wrong standard answer (%d of %d wrong, %s judge): %s",
            diagnostics["standard_wrong"],
            diagnostics["judged"],
            diagnostics["judge"],
            ", ".join(f"{m} AUROC {diagnostics[m]['auroc']:.3f}" for m in SCORE_COLUMNS),
        )
    wall = time.perf_counter() - started
    summary = {
        "input": input,
        "output": output,
        "questions": len(loaded.rows),
        "labeled_now": labeled_now,
        "already_labeled": len(loaded.rows) - len(todo),
        "rejected": len(loaded.rejects),
        "abstained": int(abstained),
        "tau": cfg.labeling.tau,
        "method": cfg.labeling.method,
        "wall_s": round(wall, 2),
        "questions_per_s": round(len(todo) / wall, 3) if todo else 0.0,
        "score_diagnostics": diagnostics,
        **stats,
    }
    out.write_json(SUMMARY_FILE, summary)
    return summary

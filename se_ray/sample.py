"""Sample stage: M high-temperature answers plus one standard answer per question.

A thin Ray Data UDF in front of the engine actors (``se_ray.engine``). Not
``ray.data.llm``'s vLLM processor: it keeps only the first completion of each request
(``outputs[0]``), so M samples would cost M rows per question and a regroup, and its
per-token log-prob dicts would need summing; here one ``generate`` call per batch
carries both sampling-parameter sets, n=M shares one prompt prefill, and vLLM's
cumulative log-prob comes back directly.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import pyarrow as pa

from se_ray import columns as col
from se_ray.config import SamplingConfig
from se_ray.engine import EnginePool
from se_ray.prompts import question_messages

logger = logging.getLogger(__name__)


def sampling_params(cfg: SamplingConfig, n: int, temperature: float) -> dict[str, Any]:
    return dict(
        n=n,
        temperature=temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_tokens=cfg.max_tokens,
        stop=list(cfg.stop),
    )


def with_columns(batch: pa.Table, columns: dict[str, tuple[list[Any], pa.DataType]]) -> pa.Table:
    """``batch`` plus (or with replaced) typed columns."""
    for name, (values, dtype) in columns.items():
        array = pa.array(values, type=dtype)
        if name in batch.column_names:
            batch = batch.set_column(batch.column_names.index(name), name, array)
        else:
            batch = batch.append_column(name, array)
    return batch


def require_columns(batch: pa.Table, stage: str, names: tuple[str, ...]) -> None:
    missing = [n for n in names if n not in batch.column_names]
    if missing:
        raise KeyError(f"{stage} stage needs columns {missing}, got {batch.column_names}")


class SampleStage:
    """``__call__(batch)`` needs ``question`` (and ``context`` if present); adds the sample columns."""

    def __init__(self, cfg: SamplingConfig, engines: EnginePool):
        self.cfg = cfg
        self.engines = engines.handles()
        self._next = random.randrange(len(self.engines))  # spread stage replicas over engines

    def _engine(self):
        engine = self.engines[self._next % len(self.engines)]
        self._next += 1
        return engine

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        require_columns(batch, "sample", (col.QUESTION,))
        questions = batch.column(col.QUESTION).to_pylist()
        contexts = (
            batch.column(col.CONTEXT).to_pylist()
            if col.CONTEXT in batch.column_names
            else [None] * len(questions)
        )
        conversations = [
            question_messages(q, self.cfg.answer_style, c) for q, c in zip(questions, contexts, strict=True)
        ]
        m = self.cfg.num_samples
        params = [sampling_params(self.cfg, m, self.cfg.temperature)] * len(questions) + [
            sampling_params(self.cfg, 1, self.cfg.standard_temperature)
        ] * len(questions)
        results = ray.get(self._engine().chat.remote(conversations + conversations, params))
        high, standard = results[: len(questions)], results[len(questions) :]
        floats, ints, strings = pa.list_(pa.float64()), pa.list_(pa.int64()), pa.list_(pa.string())
        return with_columns(
            batch,
            {
                col.SAMPLES: ([[c.text for c in cs] for cs in high], strings),
                col.SAMPLE_LOGPROBS: ([[c.mean_logprob for c in cs] for cs in high], floats),
                col.SAMPLE_LOGPROB_SUMS: ([[c.logprob_sum for c in cs] for cs in high], floats),
                col.SAMPLE_TOKEN_COUNTS: ([[c.num_tokens for c in cs] for cs in high], ints),
                col.STANDARD_ANSWER: ([cs[0].text for cs in standard], pa.string()),
                col.STANDARD_LOGPROB: ([cs[0].mean_logprob for cs in standard], pa.float64()),
                col.NUM_GENERATED: ([len(cs) + 1 for cs in high], pa.int64()),
            },
        )


def add_sample_stage(ds, cfg: SamplingConfig, engines: EnginePool):
    """Wire the stage: one UDF replica per engine; it only waits on its engine, so no CPU of its own."""
    return ds.map_batches(
        SampleStage,
        fn_constructor_kwargs={"cfg": cfg, "engines": engines},
        batch_size=cfg.batch_size,
        concurrency=len(engines.names),
        num_cpus=0,
        batch_format="pyarrow",
    )

"""Sample stage: M high-temperature answers plus one standard answer per question.

A thin Ray Data UDF in front of the engine actors (``se_ray.engine``). Not
``ray.data.llm``'s vLLM processor: it keeps only the first completion of each request
(``outputs[0]``), so M samples would cost M rows per question and a regroup, and its
per-token log-prob dicts would need summing; here one ``generate`` call per batch
carries both sampling-parameter sets, n=M shares one prompt prefill, and vLLM's
cumulative log-prob comes back directly. With ``sampling.early_stop`` the stage samples in
rounds instead (``se_ray.stages.early_stop``).
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from se_ray import columns as col
from se_ray.config import EntailmentConfig, SamplingConfig
from se_ray.engine import Completion, EnginePool, Rejected, request_params
from se_ray.prompts import question_messages

logger = logging.getLogger(__name__)


NO_ANSWER = Completion("", 0.0, 0)


def sampling_params(cfg: SamplingConfig, n: int, temperature: float) -> dict[str, Any]:
    return request_params(n, temperature, cfg.max_tokens, cfg.stop, cfg.top_p, cfg.top_k)


class SampleStage:
    """``__call__(batch)`` needs ``question`` (and ``context`` if present); adds the sample columns.

    With ``cfg.early_stop`` it needs ``entailment`` (the judge to cluster with) and ``tau``, and
    also adds ``cluster_ids`` and ``entailment_calls`` (the entropy stage keeps them).
    """

    def __init__(
        self,
        cfg: SamplingConfig,
        engines: EnginePool,
        entailment: EntailmentConfig | None = None,
        tau: float | None = None,
        judge_engines: EnginePool | None = None,
    ):
        self.cfg = cfg
        self.engines = engines
        self.judge = None
        if cfg.early_stop:
            if entailment is None or tau is None:
                raise ValueError(
                    "sampling.early_stop=true: the sample stage needs the entailment config and "
                    "labeling.tau (add_sample_stage(..., entailment=cfg.entailment, tau=cfg.labeling.tau))"
                )
            from se_ray.judges.entailment import build_judge

            self.entailment, self.tau = entailment, tau
            self.judge = build_judge(entailment, judge_engines or engines)

    def __call__(self, batch: pa.Table) -> pa.Table:
        col.require_columns(batch, "sample stage", (col.QUESTION,))
        questions = batch.column(col.QUESTION).to_pylist()
        contexts = (
            batch.column(col.CONTEXT).to_pylist()
            if col.CONTEXT in batch.column_names
            else [None] * len(questions)
        )
        conversations = [
            question_messages(q, self.cfg.answer_style, c) for q, c in zip(questions, contexts, strict=True)
        ]
        if self.judge is not None:
            from se_ray.stages.early_stop import sample_until_decided

            found = sample_until_decided(
                self.engines.one(),
                self.judge,
                self.cfg,
                self.entailment.strict,
                self.tau,
                questions,
                conversations,
            )
            extra = {
                col.CLUSTER_IDS: (found.clusters, pa.list_(pa.int64())),
                col.ENTAILMENT_CALLS: ([found.calls / len(questions)] * len(questions), pa.float64()),
            }
            return self._columns(batch, found.high, found.standard, found.rejected, extra)
        m, n = self.cfg.num_samples, len(questions)
        params = [sampling_params(self.cfg, m, self.cfg.temperature)] * n + [
            sampling_params(self.cfg, 1, self.cfg.standard_temperature)
        ] * n
        results = self.engines.chat(conversations + conversations, params)
        rejected = [
            next((r.reason for r in (results[i], results[n + i]) if isinstance(r, Rejected)), None)
            for i in range(n)
        ]
        high = [[] if why else results[i] for i, why in enumerate(rejected)]
        standard = [NO_ANSWER if why else results[n + i][0] for i, why in enumerate(rejected)]
        return self._columns(batch, high, standard, rejected, {})

    @staticmethod
    def _columns(
        batch: pa.Table,
        high: list[list[Completion]],
        standard: list[Completion],
        rejected: list[str | None],
        extra: dict[str, tuple[list[Any], pa.DataType]],
    ) -> pa.Table:
        """The sample columns; a rejected row (its reason in ``rejected``) has no samples."""
        floats, ints, strings = pa.list_(pa.float64()), pa.list_(pa.int64()), pa.list_(pa.string())
        return col.with_columns(
            batch,
            {
                col.REJECTED: (rejected, pa.string()),
                col.SAMPLES: ([[c.text for c in cs] for cs in high], strings),
                col.SAMPLE_LOGPROBS: ([[c.mean_logprob for c in cs] for cs in high], floats),
                col.SAMPLE_LOGPROB_SUMS: ([[c.logprob_sum for c in cs] for cs in high], floats),
                col.SAMPLE_TOKEN_COUNTS: ([[c.num_tokens for c in cs] for cs in high], ints),
                col.STANDARD_ANSWER: ([c.text for c in standard], pa.string()),
                col.STANDARD_LOGPROB: ([c.mean_logprob for c in standard], pa.float64()),
                col.NUM_GENERATED: ([len(cs) + 1 for cs in high], pa.int64()),
                **extra,
            },
        )


def add_sample_stage(
    ds,
    cfg: SamplingConfig,
    engines: EnginePool,
    entailment: EntailmentConfig | None = None,
    tau: float | None = None,
    judge_engines: EnginePool | None = None,
):
    """Wire the stage: one UDF replica per engine; it only waits on its engine, so no CPU of its own.

    ``entailment``, ``tau`` (and ``judge_engines`` for an LLM judge on another model) are
    needed with ``cfg.early_stop``; they are ignored otherwise. Early stop clusters between
    its rounds, so it runs two replicas per engine: one's rounds fill the other's clustering.
    """
    kwargs: dict[str, Any] = {"cfg": cfg, "engines": engines}
    replicas_per_engine = 1
    if cfg.early_stop:
        kwargs.update(entailment=entailment, tau=tau, judge_engines=judge_engines)
        replicas_per_engine = 2
    return ds.map_batches(
        SampleStage,
        fn_constructor_kwargs=kwargs,
        batch_size=cfg.batch_size,
        concurrency=len(engines.names) * replicas_per_engine,
        num_cpus=0,
        batch_format="pyarrow",
    )

"""Sample stage: M high-temperature answers plus one standard answer per question.

A thin Ray Data UDF in front of the engine actors (``se_ray.engine``). Not
``ray.data.llm``'s vLLM processor: it keeps only the first completion of each request
(``outputs[0]``), so M samples would cost M rows per question and a regroup, and its
per-token log-prob dicts would need summing; here one ``generate`` call per batch
carries both sampling-parameter sets, n=M shares one prompt prefill, and vLLM's
cumulative log-prob comes back directly.

With ``sampling.early_stop`` the stage samples in rounds and clusters as it goes (it loads
the entailment judge): after each round, a question whose label at τ can no longer change
(``entropy.label_is_decided``) stops, so it may hold fewer than M samples
(``num_generated`` counts what was generated, the standard answer included). Its
``semantic_entropy`` is then the discrete SE of the samples it has, which can differ from
the SE that M samples would have given; the label (SE > τ) is the one every continuation to
M samples would give. The greedy clustering only looks forward, so the cluster ids of the
first k samples do not change when more arrive.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import pyarrow as pa

from se_ray import columns as col
from se_ray import entropy
from se_ray.config import EntailmentConfig, SamplingConfig
from se_ray.engine import Completion, EnginePool
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


def samples_to_decide(counts: list[int], remaining: int, tau: float) -> int:
    """Fewest further samples after which the label could be decided, given the class sizes so far.

    Tries the two extreme continuations: every new sample joins the largest class (the
    likeliest way to decide "answer") and every new sample opens a class of its own (the
    likeliest way to decide "abstain"). Only schedules rounds: stopping is decided by
    ``entropy.label_is_decided`` on the samples actually drawn.
    """
    if remaining <= 0:
        return 0
    sizes = sorted(counts, reverse=True)
    for r in range(1, remaining + 1):
        left = remaining - r
        if left == 0:
            return r
        joined = [sizes[0] + r, *sizes[1:]] if sizes else [r]
        if entropy.label_is_decided(joined, left, tau) is False:
            return r
        if entropy.label_is_decided([*sizes, *[1] * r], left, tau) is True:
            return r
    return remaining


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
        self.engines = engines.handles()
        self._next = random.randrange(len(self.engines))  # spread stage replicas over engines
        self.judge = None
        if cfg.early_stop:
            if entailment is None or tau is None:
                raise ValueError(
                    "sampling.early_stop=true: the sample stage needs the entailment config and "
                    "labeling.tau (add_sample_stage(..., entailment=cfg.entailment, tau=cfg.labeling.tau))"
                )
            from se_ray.entailment import build_judge

            self.entailment, self.tau = entailment, tau
            self.judge = build_judge(entailment, judge_engines or engines)

    def _engine(self):
        engine = self.engines[self._next % len(self.engines)]
        self._next += 1
        return engine

    @staticmethod
    def _chat(engine, conversations: list[Any], params: list[dict[str, Any]]) -> list[list[Completion]]:
        import ray

        return ray.get(engine.chat.remote(conversations, params))

    def __call__(self, batch: pa.Table) -> pa.Table:
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
        if self.judge is not None:
            return self._early_stop(batch, questions, conversations)
        m = self.cfg.num_samples
        params = [sampling_params(self.cfg, m, self.cfg.temperature)] * len(questions) + [
            sampling_params(self.cfg, 1, self.cfg.standard_temperature)
        ] * len(questions)
        results = self._chat(self._engine(), conversations + conversations, params)
        high, standard = results[: len(questions)], results[len(questions) :]
        return self._columns(batch, high, [cs[0] for cs in standard], {})

    def _early_stop(self, batch: pa.Table, questions: list[str], conversations: list[Any]) -> pa.Table:
        """Rounds of one engine call each, for the undecided questions of the batch only."""
        from se_ray.entailment import EmbeddingJudge, cluster_questions

        cfg, m, n = self.cfg, self.cfg.num_samples, len(questions)
        engine = self._engine()  # one engine for all rounds: its prefix cache holds these prompts
        high: list[list[Completion]] = [[] for _ in range(n)]
        clusters: list[list[int]] = [[] for _ in range(n)]
        verdicts: list[dict[tuple[str, str], bool]] = [{} for _ in range(n)]
        standard: list[Completion] = []
        calls_before = self.judge.model_calls
        undecided = list(range(n))
        while undecided:
            take = [
                max(
                    cfg.early_stop_round,
                    samples_to_decide(entropy.cluster_counts(clusters[q]), m - len(high[q]), self.tau),
                )
                for q in undecided
            ]
            take = [min(t, m - len(high[q])) for t, q in zip(take, undecided, strict=True)]
            convs = [conversations[q] for q in undecided]
            params = [sampling_params(cfg, t, cfg.temperature) for t in take]
            if not standard:  # the standard answer rides along with the first round
                convs += conversations
                params += [sampling_params(cfg, 1, cfg.standard_temperature)] * n
            results = self._chat(engine, convs, params)
            if not standard:
                standard = [cs[0] for cs in results[len(undecided) :]]
            for q, cs in zip(undecided, results, strict=False):
                high[q].extend(cs)
            found = cluster_questions(
                self.judge,
                [questions[q] for q in undecided],
                [[c.text for c in high[q]] for q in undecided],
                self.entailment.strict,
                verdicts=[verdicts[q] for q in undecided],
            )
            still = []
            for q, ids in zip(undecided, found, strict=True):
                clusters[q] = ids
                left = m - len(ids)
                if left and entropy.label_is_decided(entropy.cluster_counts(ids), left, self.tau) is None:
                    still.append(q)
            undecided = still
        calls = self.judge.model_calls - calls_before
        if isinstance(self.judge, EmbeddingJudge):
            self.judge.reset_cache()
        return self._columns(
            batch,
            high,
            standard,
            {
                col.CLUSTER_IDS: (clusters, pa.list_(pa.int64())),
                col.ENTAILMENT_CALLS: ([calls / n] * n, pa.float64()),
            },
        )

    @staticmethod
    def _columns(
        batch: pa.Table,
        high: list[list[Completion]],
        standard: list[Completion],
        extra: dict[str, tuple[list[Any], pa.DataType]],
    ) -> pa.Table:
        floats, ints, strings = pa.list_(pa.float64()), pa.list_(pa.int64()), pa.list_(pa.string())
        return with_columns(
            batch,
            {
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

"""Cluster + entropy stage: the reference greedy clustering of each question's samples by an
entailment judge, then the pure entropy math.

Every question of a batch is clustered in lockstep (``entropy.greedy_rounds``), so each round
is one batched judge call across questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from se_ray import columns as col
from se_ray import entropy
from se_ray.config import EntailmentConfig
from se_ray.engine import EnginePool
from se_ray.judges.entailment import EntailmentJudge, Query, are_equivalent, build_judge


def cluster_questions(
    judge: EntailmentJudge,
    questions: Sequence[str],
    samples: Sequence[Sequence[str]],
    strict: bool,
    verdicts: Sequence[dict[tuple[str, str], bool]] | None = None,
) -> list[list[int]]:
    """Reference greedy clustering of each question's M samples, one batched judge call per round.

    Samples equal up to case and whitespace are equivalent without a call ("-40" and "40" are
    not), and each unordered pair of distinct texts is judged at most once (both directions).
    The greedy rule still runs over all M samples: clustering only the unique texts and
    expanding can differ from the reference when the judge is not transitive.

    ``verdicts``: one cache per question (normalised pair -> equivalent), read and filled, so
    a caller that clusters growing sample lists (early stop) judges each pair once and keeps
    the ids of the earlier samples unchanged.
    """
    keys = [[entropy.surface_key(a) for a in answers] for answers in samples]
    if verdicts is None:
        verdicts = [{} for _ in samples]
    elif len(verdicts) != len(samples):
        raise ValueError(f"{len(verdicts)} verdict caches for {len(samples)} questions")
    rounds = [entropy.greedy_rounds(len(k)) for k in keys]
    results: list[list[int] | None] = [None] * len(rounds)
    pending: dict[int, list[tuple[int, int]]] = {}

    def advance(qi: int, sent: list[bool] | None) -> None:
        try:
            pending[qi] = next(rounds[qi]) if sent is None else rounds[qi].send(sent)
        except StopIteration as stop:
            results[qi] = stop.value

    for qi in range(len(rounds)):
        advance(qi, None)
    while pending:
        asked: dict[tuple[int, tuple[str, str]], tuple[str, str]] = {}
        for qi, pairs in pending.items():
            for i, j in pairs:
                a, b = keys[qi][i], keys[qi][j]
                pair = (min(a, b), max(a, b))
                if a == b:
                    verdicts[qi][pair] = True
                elif pair not in verdicts[qi]:
                    asked.setdefault((qi, pair), (samples[qi][i], samples[qi][j]))
        queries = []
        for (qi, _), (first, second) in asked.items():
            queries += [Query(questions[qi], first, second), Query(questions[qi], second, first)]
        implications = judge.implications(queries)
        for n, (qi, pair) in enumerate(asked):
            verdicts[qi][pair] = are_equivalent(implications[2 * n], implications[2 * n + 1], strict)
        current, pending = pending, {}
        for qi, pairs in current.items():
            k = keys[qi]
            advance(qi, [verdicts[qi][(min(k[i], k[j]), max(k[i], k[j]))] for i, j in pairs])
    return [ids or [] for ids in results]


class EntropyStage:
    """``__call__(batch)`` needs ``question``, ``samples``, ``sample_logprobs``; adds clusters and entropies.

    A batch that already carries ``cluster_ids`` (the early-stop sampler clusters while it
    samples, with the same judge settings) keeps them and its ``entailment_calls``: the stage
    then only computes the entropies.
    """

    def __init__(self, cfg: EntailmentConfig, engines: EnginePool | None = None):
        self.cfg = cfg
        self.engines = engines
        self._judge: EntailmentJudge | None = None

    @property
    def judge(self) -> EntailmentJudge:
        """Loaded at the first batch that needs it: early-stop batches arrive clustered."""
        if self._judge is None:
            self._judge = build_judge(self.cfg, self.engines)
        return self._judge

    def __call__(self, batch: pa.Table) -> pa.Table:
        col.require_columns(batch, "entropy stage", (col.QUESTION, col.SAMPLES, col.SAMPLE_LOGPROBS))
        questions = batch.column(col.QUESTION).to_pylist()
        samples = batch.column(col.SAMPLES).to_pylist()
        logprobs = batch.column(col.SAMPLE_LOGPROBS).to_pylist()
        n = len(questions)
        if col.CLUSTER_IDS in batch.column_names:
            clusters = batch.column(col.CLUSTER_IDS).to_pylist()
            per_question = (
                batch.column(col.ENTAILMENT_CALLS).to_pylist()
                if col.ENTAILMENT_CALLS in batch.column_names
                else [0.0] * n
            )
        else:
            clusters, per_question = self._cluster(questions, samples)
        nan = float("nan")  # a rejected row has no samples, so no entropy; it is never labelled
        scores = [
            (
                entropy.discrete_semantic_entropy(c),
                entropy.regular_semantic_entropy(c, lp),
                entropy.exact_entropy(s),
            )
            if s
            else (nan, nan, nan)
            for c, lp, s in zip(clusters, logprobs, samples, strict=True)
        ]
        f64 = pa.float64()
        return col.with_columns(
            batch,
            {
                col.CLUSTER_IDS: (clusters, pa.list_(pa.int64())),
                col.SEMANTIC_ENTROPY: ([x[0] for x in scores], f64),
                col.REGULAR_SEMANTIC_ENTROPY: ([x[1] for x in scores], f64),
                col.EXACT_ENTROPY: ([x[2] for x in scores], f64),
                col.ENTAILMENT_CALLS: (per_question, f64),
            },
        )

    def _cluster(self, questions: list[str], samples: list[list[str]]):
        """Cluster ids of every row with samples, and the batch's model calls spread over its rows
        (calls are batched across questions)."""
        todo = [i for i, s in enumerate(samples) if s]
        calls_before = self.judge.model_calls
        found = cluster_questions(
            self.judge, [questions[i] for i in todo], [samples[i] for i in todo], self.cfg.strict
        )
        calls = self.judge.model_calls - calls_before
        self.judge.reset_cache()
        clusters: list[list[int]] = [[] for _ in samples]
        for i, ids in zip(todo, found, strict=True):
            clusters[i] = ids
        return clusters, [calls / len(samples)] * len(samples)


def add_entropy_stage(ds, cfg: EntailmentConfig, engines: EnginePool | None = None):
    resources: dict[str, Any] = {"num_cpus": cfg.num_cpus}
    if cfg.num_gpus:
        resources["num_gpus"] = cfg.num_gpus
    if cfg.accelerator_type:
        resources["accelerator_type"] = cfg.accelerator_type
    return ds.map_batches(
        EntropyStage,
        fn_constructor_kwargs={"cfg": cfg, "engines": engines},
        batch_size=cfg.batch_size,
        concurrency=cfg.num_actors if cfg.max_actors is None else (cfg.num_actors, cfg.max_actors),
        batch_format="pyarrow",
        **resources,
    )

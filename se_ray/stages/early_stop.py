"""Early stop: sample in rounds and cluster as the samples arrive; a question stops once its
label at τ can no longer change (``entropy.label_is_decided``).

A stopped question may hold fewer than M samples (``num_generated`` counts what was generated,
the standard answer included). Its ``semantic_entropy`` is then the discrete SE of the samples
it has, which can differ from the SE that M samples would have given; the label (SE > τ) is
the one every continuation to M samples would give. The greedy clustering only looks
forward, so the cluster ids of the first k samples do not change when more arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from se_ray import entropy
from se_ray.config import SamplingConfig
from se_ray.engine import Completion, EnginePool, Rejected, request_params
from se_ray.judges.entailment import EntailmentJudge
from se_ray.stages.entropy import cluster_questions


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


@dataclass
class EarlyStopped:
    high: list[list[Completion]]  # the samples of each question (at most M)
    standard: list[Completion]
    clusters: list[list[int]]
    calls: int  # entailment-model calls for the whole batch
    rejected: list[str | None]  # why the engine would not take a question (None: it did)


def _round_sizes(cfg: SamplingConfig, high: list[list[Completion]], clusters, undecided, tau) -> list[int]:
    m = cfg.num_samples
    return [
        min(
            max(
                cfg.early_stop_round,
                samples_to_decide(entropy.cluster_counts(clusters[q]), m - len(high[q]), tau),
            ),
            m - len(high[q]),
        )
        for q in undecided
    ]


def sample_until_decided(
    engine: EnginePool,
    judge: EntailmentJudge,
    cfg: SamplingConfig,
    strict: bool,
    tau: float,
    questions: list[str],
    conversations: list[Any],
) -> EarlyStopped:
    """Rounds of one engine call each, for the undecided questions only. ``engine`` should hold
    one engine: its prefix cache keeps these prompts between rounds."""
    m, n = cfg.num_samples, len(questions)
    high: list[list[Completion]] = [[] for _ in range(n)]
    clusters: list[list[int]] = [[] for _ in range(n)]
    verdicts: list[dict[tuple[str, str], bool]] = [{} for _ in range(n)]
    standard: list[Completion] = []
    rejected: list[str | None] = [None] * n
    calls_before = judge.model_calls
    undecided = list(range(n))
    while undecided:
        take = _round_sizes(cfg, high, clusters, undecided, tau)
        convs = [conversations[q] for q in undecided]
        params = [
            request_params(t, cfg.temperature, cfg.max_tokens, cfg.stop, cfg.top_p, cfg.top_k) for t in take
        ]
        if not standard:  # the standard answer rides along with the first round
            convs += conversations
            params += [
                request_params(1, cfg.standard_temperature, cfg.max_tokens, cfg.stop, cfg.top_p, cfg.top_k)
            ] * n
        results = engine.chat(convs, params)
        if not standard:
            standard = [
                Completion("", 0.0, 0) if isinstance(cs, Rejected) else cs[0]
                for cs in results[len(undecided) :]
            ]
            rejected = [cs.reason if isinstance(cs, Rejected) else None for cs in results[len(undecided) :]]
        for q, cs in zip(undecided, results, strict=False):
            if isinstance(cs, Rejected):
                rejected[q] = cs.reason
            else:
                high[q].extend(cs)
        undecided = [q for q in undecided if rejected[q] is None]
        found = cluster_questions(
            judge,
            [questions[q] for q in undecided],
            [[c.text for c in high[q]] for q in undecided],
            strict,
            verdicts=[verdicts[q] for q in undecided],
        )
        still = []
        for q, ids in zip(undecided, found, strict=True):
            clusters[q] = ids
            left = m - len(ids)
            if left and entropy.label_is_decided(entropy.cluster_counts(ids), left, tau) is None:
                still.append(q)
        undecided = still
    calls = judge.model_calls - calls_before
    judge.reset_cache()
    return EarlyStopped(high, standard, clusters, calls, rejected)

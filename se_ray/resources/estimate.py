"""GPU-hours of a placed job, from its config's sizes and stated throughput assumptions. Pure.

Each phase costs (its wall-clock) x (the GPUs of the nodes it holds), once per repetition:
- label: questions x (num_samples + 1) answers x max_tokens generated tokens (every answer at
  max_tokens: an upper bound) over the engines, plus one engine start;
- train, per trial: examples x epochs x max_length tokens (padded: an upper bound) over the
  workers, plus a trainer start; validate, per trial: validation questions x one greedy answer
  (plus the judge's reply) over the engines, plus one engine start;
- evaluate: (untuned + every trained model) x test questions, plus one engine start.
Trials that run at once (sweep.max_concurrent_trials) share the wall-clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from se_ray.config import JobConfig
from se_ray.resources.groups import JobSizes
from se_ray.resources.model import GPUS, Arch, decode_tokens_per_s, train_tokens_per_s
from se_ray.resources.placement import PhasePlan

ENGINE_START_S = 180.0  # assumed: load an 8B model from the node's cache, CUDA graphs, warm-up
TRAINER_START_S = 120.0  # assumed: Ray Train workers, NCCL, DeepSpeed initialisation, model load


@dataclass(frozen=True)
class PhaseCost:
    phase: str
    repeats: int
    hours_each: float
    gpus_held: int
    gpu_model: str | None
    basis: str

    @property
    def gpu_hours(self) -> float:
        return self.repeats * self.hours_each * self.gpus_held


def assumptions() -> list[str]:
    """The throughput assumptions, one line each, as the plan prints them."""
    rates = ", ".join(f"{name} {g.decode_tokens_per_s_8b:,.0f}" for name, g in GPUS.items())
    peaks = ", ".join(f"{name} {g.bf16_tflops:g}" for name, g in GPUS.items())
    return [
        f"vLLM decoding, generated tokens/s per engine GPU for an 8B bf16 model (scaled by 8B/size): {rates}",
        f"training: 4N (LoRA) or 6N (full) FLOPs per token at 30% of the bf16 peak TFLOPs ({peaks})",
        f"every answer max_tokens long, every training example max_length long (upper bounds); "
        f"engine start {ENGINE_START_S:.0f} s, trainer start {TRAINER_START_S:.0f} s",
        "not measured: se-ray has not run on real GPUs; the entailment pool is assumed to keep up",
    ]


def _node_gpu(plan: PhasePlan, group: str) -> str | None:
    nodes = plan.nodes_of(group)
    return nodes[0].type.gpu_model if nodes and nodes[0].type.gpu else None


def _engine_hours(
    cfg: JobConfig, plan: PhasePlan, tokens: float, archs: Mapping[str, Arch]
) -> tuple[float, str | None]:
    s = cfg.sampling
    model = _node_gpu(plan, "engines")
    if model is None or not (s.num_gpus_per_engine or s.tensor_parallel_size > 1):
        return math.nan, None
    rate = s.num_engines * s.tensor_parallel_size * decode_tokens_per_s(GPUS[model], archs.get(s.model))
    return (tokens / rate + ENGINE_START_S) / 3600, model


def estimate(
    cfg: JobConfig, sizes: JobSizes, phases: list[PhasePlan], archs: Mapping[str, Arch]
) -> list[PhaseCost]:
    """One cost line per placed phase; hours_each is NaN where the work runs on CPUs
    (or the input size is unknown)."""
    s, t = cfg.sampling, cfg.train
    answer = (cfg.eval.max_tokens or s.max_tokens) + (
        cfg.eval.judge_max_tokens if cfg.eval.judge == "llm" else 0
    )
    concurrent = max(1, cfg.sweep.max_concurrent_trials)
    batches = math.ceil(sizes.trials / concurrent)
    out: list[PhaseCost] = []
    if not sizes.known:
        unknown = "input size unknown: pass --questions N"
        return [PhaseCost(p.phase, 1, math.nan, p.gpus_held(), None, unknown) for p in phases]
    for plan in phases:
        if plan.phase == "label":
            tokens = sizes.label_questions * (s.num_samples + 1) * s.max_tokens
            hours, model = _engine_hours(cfg, plan, tokens, archs)
            basis = f"{sizes.label_questions} questions x {s.num_samples + 1} answers x {s.max_tokens} tokens"
            out.append(PhaseCost("label", 1, hours, plan.gpus_held(), model, basis))
        elif plan.phase == "train":
            tokens = sizes.train_examples * t.epochs * t.max_length
            model = _node_gpu(plan, "train workers")
            arch = archs.get(s.model)
            hours = math.nan
            if model and t.use_gpu and arch:
                rate = t.num_workers * train_tokens_per_s(GPUS[model], arch, t.method)
                hours = (tokens / rate + TRAINER_START_S) / 3600
            basis = (
                f"{sizes.trials} trial(s) x {sizes.train_examples} examples x {t.epochs} epochs "
                f"x {t.max_length} tokens"
            )
            out.append(PhaseCost("train", batches, hours, plan.gpus_held(), model, basis))
        elif plan.phase == "validate":
            hours, model = _engine_hours(cfg, plan, sizes.validation_questions * answer, archs)
            basis = f"{sizes.trials} trial(s) x {sizes.validation_questions} questions x {answer} tokens"
            out.append(PhaseCost("validate", batches, hours, plan.gpus_held(), model, basis))
        elif plan.phase == "evaluate":
            hours, model = _engine_hours(cfg, plan, sizes.evaluations * sizes.test_questions * answer, archs)
            basis = f"{sizes.evaluations} model(s) x {sizes.test_questions} questions x {answer} tokens"
            out.append(PhaseCost("evaluate", 1, hours, plan.gpus_held(), model, basis))
    return out

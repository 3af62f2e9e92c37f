"""The actor groups a job config starts, phase by phase, as ``se-ray`` starts them, and the
GPU-hours they would cost. Pure: no ray, no torch.

Phases (what runs at once):
- label: the generation engines, the entailment pool (its largest size when it autoscales) and
  an LLM entailment judge's own engine; they stream together;
- train: per concurrent Tune trial its function and ``train.num_workers`` Ray Train workers (on
  CPU the run keeps its engines up meanwhile; so it does while several trials run at once);
- validate: the trial function, and the engines it starts to answer the validation split (with
  its own correctness judge engine when ``eval.judge_model`` is another model);
- evaluate: the engines and the correctness judge, for the untuned and every trained model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from se_ray.config import JobConfig, SamplingConfig
from se_ray.engine import engine_digest, judge_engine_config
from se_ray.resources.model import (
    CUDA_CONTEXT_GB,
    MODELS,
    TRAIN_HEADROOM,
    Arch,
    nli_gb,
    train_gb,
    vllm_min_gpu_gb,
)
from se_ray.resources.placement import Group, PlanError, Request

VERBS = ("run", "label", "train", "evaluate")
SMALL_MODEL_GPU_GB = 2.0  # an embedding judge's model on a GPU (MiniLM: 90 MB) with its CUDA context


def config_verb(path: str | Path | None) -> str | None:
    """The verb of the command a job config opens with (``# ... se-ray VERB --config ...``)."""
    if path is None or not Path(path).is_file():
        return None
    first = Path(path).read_text().splitlines()[:1]
    found = re.search(r"\bse-ray\s+(\w+)", first[0]) if first and first[0].startswith("#") else None
    return found.group(1) if found and found.group(1) in VERBS else None


def _arch(model: str, archs: Mapping[str, Arch], what: str) -> Arch:
    if model not in archs:
        raise PlanError(
            f"{what}: no memory figures for {model!r}: fetch its config.json "
            f"(huggingface-cli download {model} config.json) or add it to se_ray/resources/model.py MODELS"
        )
    return archs[model]


def engine_request(s: SamplingConfig, archs: Mapping[str, Arch], tokens: int) -> Request:
    """One vLLM engine: TP 1 asks for num_gpus_per_engine GPUs (may be a fraction); TP > 1 counts
    as TP whole GPUs on one node (vLLM's Ray executor places one worker per GPU, NVLink-bound)."""
    tp = s.tensor_parallel_size
    gpus = s.num_gpus_per_engine if tp == 1 else float(tp)
    if not gpus:
        return Request(cpus=s.num_cpus_per_engine, accelerator=s.accelerator_type)
    arch = _arch(s.model, archs, "engine")
    need = vllm_min_gpu_gb(arch, s.gpu_memory_utilization, tp, tokens, s.dtype)
    return Request(
        cpus=s.num_cpus_per_engine,
        gpus=gpus,
        accelerator=s.accelerator_type,
        gpu_gb=CUDA_CONTEXT_GB,
        gpu_share=s.gpu_memory_utilization,
        min_gpu_gb=need,
    )


def _engines(cfg: JobConfig, phase: str, archs: Mapping[str, Arch]) -> Group:
    s = cfg.sampling
    tokens = s.max_model_len * (s.num_samples + 1)  # one question's samples at full length
    note = f"vLLM {s.model}, TP {s.tensor_parallel_size}, {s.gpu_memory_utilization:.0%} of each GPU"
    return Group("engines", phase, s.num_engines, engine_request(s, archs, tokens), note)


def _judge_engines(name: str, judge: SamplingConfig, cfg: JobConfig, phase: str, archs) -> list[Group]:
    """A judge's own engines, when it is not the generation engine."""
    if engine_digest(judge) == engine_digest(cfg.sampling):
        return []
    request = engine_request(judge, archs, judge.max_model_len)
    note = f"vLLM {judge.model}, TP {judge.tensor_parallel_size}"
    return [Group(name, phase, judge.num_engines, request, note)]


def correctness_judge(cfg: JobConfig, phase: str, archs) -> list[Group]:
    e = cfg.eval
    if e.judge != "llm":
        return []
    judge = judge_engine_config(
        e.judge_model or cfg.sampling.model, cfg.sampling, e.judge_tensor_parallel_size
    )
    return _judge_engines("correctness judge", judge, cfg, phase, archs)


def _entailment(cfg: JobConfig, archs: Mapping[str, Arch]) -> list[Group]:
    e = cfg.entailment
    gpu_gb = 0.0
    if e.num_gpus and e.judge == "nli":
        gpu_gb = nli_gb(_arch(e.model, archs, "entailment"), e.model_batch_size, cfg.sampling.max_tokens)
    elif e.num_gpus:
        gpu_gb = SMALL_MODEL_GPU_GB
    request = Request(cpus=e.num_cpus, gpus=e.num_gpus, accelerator=e.accelerator_type, gpu_gb=gpu_gb)
    out = [Group("entailment", "label", e.max_actors or e.num_actors, request, f"{e.judge} judge {e.model}")]
    if e.judge == "llm":
        model = "" if e.model.startswith("builtin:all-minilm") else e.model
        out += _judge_engines(
            "entailment judge", judge_engine_config(model, cfg.sampling), cfg, "label", archs
        )
    return out


def _workers(cfg: JobConfig, count: int, archs: Mapping[str, Arch]) -> Group:
    t = cfg.train
    if not t.use_gpu:
        return Group(
            "train workers", "train", count, Request(cpus=t.cpus_per_worker), "Ray Train, CPU (gloo)"
        )
    arch = _arch(cfg.sampling.model, archs, "train workers")
    need = train_gb(
        arch,
        method=t.method,
        lora_r=t.lora_r,
        modules=t.lora_target_modules,
        workers=t.num_workers,
        zero_stage=t.zero_stage,
        seq=t.max_length,
        batch=t.micro_batch_size,
    )
    request = Request(
        cpus=t.cpus_per_worker,
        gpus=1,
        accelerator=t.accelerator_type,
        gpu_gb=need,
        min_gpu_gb=need / TRAIN_HEADROOM,
    )
    return Group("train workers", "train", count, request, f"DeepSpeed ZeRO-{t.zero_stage} {t.method}")


def _trials(cfg: JobConfig, phase: str) -> Group:
    """The Tune trial function: it launches the trainer, waits, then validates (run/trials.py).
    Tune refuses an empty request: with no CPU it asks for one byte of memory."""
    n = cfg.sweep.trial_num_cpus
    request = Request(cpus=n, memory=0.0 if n > 0 else 1.0)
    return Group("tune trials", phase, cfg.sweep.max_concurrent_trials, request, "Ray Tune function")


def job_groups(cfg: JobConfig, verb: str = "run", archs: Mapping[str, Arch] = MODELS) -> list[Group]:
    """Every actor group the verb starts, in phase order and, within a phase, in start order."""
    if verb not in VERBS:
        raise PlanError(f"unknown verb {verb!r} (one of {', '.join(VERBS)})")
    label = [_engines(cfg, "label", archs), *_entailment(cfg, archs)]
    evaluate = [_engines(cfg, "evaluate", archs), *correctness_judge(cfg, "evaluate", archs)]
    if verb == "label":
        return label
    if verb == "evaluate":
        return evaluate
    if verb == "train":
        return [_workers(cfg, cfg.train.num_workers, archs)]
    k = cfg.sweep.max_concurrent_trials
    train = [_trials(cfg, "train"), _workers(cfg, k * cfg.train.num_workers, archs)]
    if not cfg.train.use_gpu or k > 1:  # the engines stay up while trials train
        return label + train + [_retag(g, "train") for g in evaluate] + evaluate
    validate = [_trials(cfg, "validate"), *[_retag(g, "validate") for g in evaluate]]
    return label + train + validate + evaluate


def _retag(g: Group, phase: str) -> Group:
    return Group(g.name, phase, g.count, g.request, g.note)


@dataclass(frozen=True)
class JobSizes:
    """How much work each phase does: its repetitions and what one repetition processes."""

    label_questions: int
    trials: int  # trainings (sweep trials, an upper bound: τ values that give one partition share one)
    train_examples: int
    validation_questions: int
    evaluations: int  # models evaluated on the test split (and on OOD when set)
    test_questions: int
    known: bool = True  # False: the input's size is unknown (se-ray plan --questions N)


def job_sizes(cfg: JobConfig, verb: str, questions: int | None) -> JobSizes:
    """The sizes ``se-ray plan`` estimates from; ``questions`` is the input's size where the verb
    reads a whole input (label, train, evaluate), else the split's sizes are used."""
    sp, sw = cfg.split, cfg.sweep
    if verb != "run":
        n = questions or 0
        label, trials, evals = n if verb == "label" else 0, int(verb == "train"), int(verb == "evaluate")
        return JobSizes(label, trials, n, 0, evals, n, known=questions is not None)
    entropy = [m for m in sw.methods if m != "r_tuning"]
    sweep = len(sw.taus) * len(entropy) + ("r_tuning" in sw.methods)
    seeds = (sw.seeds - 1) * len(sw.methods)
    held = sp.test + ((sp.ood_limit or 0) if sp.ood_input else 0)
    return JobSizes(sp.train, sweep + seeds, sp.train, sp.validation, sweep + seeds + 1, held)

"""One vLLM engine as a Ray actor class, and what its calls return."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from se_ray.config import EngineConfig
from se_ray.models import resolve_model

logger = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str) -> str:
    """bf16 on a CPU without bf16 units (AVX2 only) is emulated and ~6x slower than float32."""
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available() or cpu_has_bf16():
        return "auto"
    return "float32"


def request_params(
    n: int,
    temperature: float,
    max_tokens: int,
    stop: list[str] | None = None,
    top_p: float = 1.0,
    top_k: int = -1,
) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments of one request (every caller builds them here)."""
    return dict(
        n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, stop=list(stop or [])
    )


@dataclass(frozen=True)
class Completion:
    text: str
    logprob_sum: float
    num_tokens: int

    @property
    def mean_logprob(self) -> float:
        return self.logprob_sum / self.num_tokens if self.num_tokens else 0.0


@dataclass(frozen=True)
class Rejected:
    """A row the engine would not take (its prompt does not fit, or it alone fails the call)."""

    reason: str


class EngineFailedError(RuntimeError):
    """An engine died or stopped answering, and its restarts are spent."""


class LLMEngineActor:
    """One vLLM engine (one GPU, a tensor-parallel group, or the CPU build)."""

    def __init__(self, cfg: EngineConfig):
        started = time.perf_counter()
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.update(cfg.env)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(max(1, cfg.kv_cache_space_gb))))
        from vllm import LLM

        self.cfg = cfg
        self.model_path = resolve_model(cfg.model)
        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            seed=cfg.seed,  # per-request seeds fail on the CPU build: seed the engine
            dtype=resolve_dtype(cfg.dtype),
            enforce_eager=cfg.enforce_eager,
            max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
        )
        if cfg.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=cfg.max_lora_rank)
        if cfg.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"
        kwargs.update(cfg.engine_kwargs)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._lora_ids: dict[str, int] = {}
        self._closing = False
        threading.Thread(target=self._exit_when_core_dies, daemon=True, name="se-ray-core-watch").start()
        self.start_s = time.perf_counter() - started
        self.ready_at = time.time()
        logger.info("vLLM engine for %s started in %.1f s", self.model_path, self.start_s)

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_path,
            "start_s": self.start_s,
            "ready_at": self.ready_at,
            "pid": os.getpid(),
        }

    def _lora_request(self, adapter: str | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        lora_id = self._lora_ids.setdefault(adapter, len(self._lora_ids) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, adapter)

    def chat(
        self,
        conversations: list[list[dict[str, str]]],
        params: list[dict[str, Any]],
        adapter: str | None = None,
    ) -> list[list[Completion]]:
        """Chat-template each conversation and sample with its own parameters, in one call.

        ``params[i]`` are ``vllm.SamplingParams`` keyword arguments; returns, per
        conversation, its ``n`` completions with their token log-prob sums, or ``Rejected``
        where the prompt and its answer budget do not fit the engine's context.
        """
        prompts = [
            self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in conversations
        ]
        out: list[list[Completion] | Rejected] = [
            self._check_length(p, q.get("max_tokens", 16)) for p, q in zip(prompts, params, strict=True)
        ]
        fits = [i for i, r in enumerate(out) if r is None]
        done = self.generate([prompts[i] for i in fits], [params[i] for i in fits], adapter) if fits else []
        for i, completions in zip(fits, done, strict=True):
            out[i] = completions
        return out

    def _check_length(self, prompt: str, max_tokens: int) -> Rejected | None:
        tokens = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        context = self.cfg.max_model_len
        if tokens + max_tokens <= context:
            return None
        return Rejected(
            f"prompt is {tokens:,} tokens; the engine holds {context:,} ({max_tokens} kept for the answer)"
        )

    def generate(
        self, prompts: list[str], params: list[dict[str, Any]], adapter: str | None = None
    ) -> list[list[Completion]]:
        from vllm import SamplingParams

        sampling = [SamplingParams(**{"logprobs": 0, **p}) for p in params]
        outputs = self.llm.generate(
            prompts, sampling, use_tqdm=False, lora_request=self._lora_request(adapter)
        )
        return [
            [
                Completion(c.text.strip(), float(c.cumulative_logprob or 0.0), len(c.token_ids))
                for c in out.outputs
            ]
            for out in outputs
        ]

    def _exit_when_core_dies(self, every_s: float = 2.0) -> None:
        """End this actor once vLLM marks its core process dead: a call in flight would block for
        ever, while a dead actor is restarted by Ray and the call retried by the pool."""
        while not self._closing:
            time.sleep(every_s)
            core = getattr(getattr(getattr(self, "llm", None), "llm_engine", None), "engine_core", None)
            if getattr(getattr(core, "resources", None), "engine_dead", False) and not self._closing:
                logger.error(
                    "vLLM engine core of %s died: ending the actor so Ray restarts it", self.model_path
                )
                os._exit(1)

    def shutdown(self) -> None:
        # vLLM's engine core runs in child processes: stop them before the actor dies.
        self._closing = True
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self.llm = None

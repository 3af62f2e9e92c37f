"""One vLLM engine as a Ray actor class, and what its calls return."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from se_ray.config import EngineConfig, StorageConfig
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


def teacher_forced_steps(prompt_ids: list[int], continuation_ids: list[int]) -> list[tuple[list[int], int]]:
    """One (context, next token) per continuation token: the prompt and the continuation so far,
    then the token whose log-prob is read there (the sum over the steps is the continuation's)."""
    return [(prompt_ids + continuation_ids[:k], token) for k, token in enumerate(continuation_ids)]


class EngineFailedError(RuntimeError):
    """An engine died or stopped answering, and its restarts are spent."""


# The engine's calls run one at a time in Ray's default group; heartbeat and info answer from
# this group beside a running call (an actor runs no method before its constructor returns).
CONTROL_GROUP = "control"


def control(handle: Any, method: str) -> Any:
    """``handle.<method>`` answered from the control group, beside a running call."""
    return getattr(handle, method).options(concurrency_group=CONTROL_GROUP)


# vLLM scans upward from VLLM_PORT for the ports it opens: a random base per engine keeps engines
# that start at once on one node off each other's ports (vllm-project/vllm#43206).
ENGINE_PORT_RANGE = (20000, 60000)


def engine_port_base(rng: random.Random | None = None) -> int:
    low, high = ENGINE_PORT_RANGE
    return (rng or random.SystemRandom()).randrange(low, high, 64)


class LLMEngineActor:
    """One vLLM engine (one GPU, a tensor-parallel group, or the CPU build)."""

    def __init__(self, cfg: EngineConfig, storage: StorageConfig | None = None):
        """``storage``: how this node reaches the URIs of models and adapters (S3 endpoint etc.)."""
        started = time.perf_counter()
        self._busy_since: float | None = None
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.update(cfg.env)
        if cfg.cpu_reserved_cores is not None:  # the CPU build reads it; a GPU engine does not
            cores = len(os.sched_getaffinity(0))
            reserved = max(0, min(cfg.cpu_reserved_cores, cores - 1))  # at least one core computes
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(reserved))
        os.environ.setdefault("VLLM_PORT", str(engine_port_base()))
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(max(1, cfg.kv_cache_space_gb))))
        from vllm import LLM

        self.cfg, self.storage = cfg, storage
        self.model_path = resolve_model(cfg.model, storage)  # a URI: copied into this node's cache
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

    def heartbeat(self) -> dict[str, float | None]:
        """How long the current call has run (None: idle); answered beside it (``CONTROL_GROUP``)."""
        since = self._busy_since
        return {"busy_s": None if since is None else time.monotonic() - since}

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        self._busy_since = time.monotonic()
        try:
            yield
        finally:
            self._busy_since = None

    def _lora_request(self, adapter: str | None):
        """``adapter``: a URI or a shared-filesystem path, materialised on this node. vLLM keeps
        a loaded adapter by its id, so the id follows the copy's content key: an adapter
        rewritten at the same URI is loaded afresh."""
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        from se_ray.artifacts import materialize

        path = materialize(adapter, self.storage)
        lora_id = self._lora_ids.setdefault(path, len(self._lora_ids) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, path)

    def chat(
        self,
        conversations: list[list[dict[str, str]]],
        params: list[dict[str, Any]],
        adapter: str | None = None,
    ) -> list[list[Completion] | Rejected]:
        """Chat-template each conversation and sample with its own parameters, in one call.

        The prompts reach vLLM as token ids from ``chat_prompt_ids`` (never as text, which vLLM
        would encode with a second BOS). ``params[i]`` are ``vllm.SamplingParams`` keyword
        arguments; returns, per conversation, its ``n`` completions with their token log-prob
        sums, or ``Rejected`` where the prompt and its answer budget do not fit the context.
        """
        with self._busy():
            return self._chat(conversations, params, adapter)

    def _chat(
        self, conversations: list[list[dict[str, str]]], params: list[dict[str, Any]], adapter: str | None
    ) -> list[list[Completion] | Rejected]:
        from se_ray.prompts import chat_prompt_ids

        prompts = [chat_prompt_ids(self.tokenizer, c) for c in conversations]
        out: list[list[Completion] | Rejected] = [
            self._check_length(len(p), q.get("max_tokens", 16)) for p, q in zip(prompts, params, strict=True)
        ]
        fits = [i for i, r in enumerate(out) if r is None]
        done = self.generate([prompts[i] for i in fits], [params[i] for i in fits], adapter) if fits else []
        for i, completions in zip(fits, done, strict=True):
            out[i] = completions
        return out

    def _check_length(self, prompt_tokens: int, max_tokens: int) -> Rejected | None:
        context = self.cfg.max_model_len
        if prompt_tokens + max_tokens <= context:
            return None
        return Rejected(
            f"prompt is {prompt_tokens:,} tokens; the engine holds {context:,} "
            f"({max_tokens} kept for the answer)"
        )

    def generate(
        self, prompt_ids: list[list[int]], params: list[dict[str, Any]], adapter: str | None = None
    ) -> list[list[Completion]]:
        from vllm import SamplingParams

        sampling = [SamplingParams(**{"logprobs": 0, **p}) for p in params]
        outputs = self._run(prompt_ids, sampling, adapter)
        return [
            [
                Completion(c.text.strip(), float(c.cumulative_logprob or 0.0), len(c.token_ids))
                for c in out.outputs
            ]
            for out in outputs
        ]

    def _run(self, prompt_ids: list[list[int]], sampling: list[Any], adapter: str | None) -> list[Any]:
        from vllm.inputs import TokensPrompt

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids],
            sampling,
            use_tqdm=False,
            lora_request=self._lora_request(adapter),
        )
        self._last_prompt_token_ids = [list(o.prompt_token_ids or []) for o in outputs]
        return outputs

    def last_prompt_token_ids(self) -> list[list[int]]:
        """The prompt token ids vLLM reported for the requests of the last call (a check that what
        reaches the model is what the renderer made: one BOS, no second tokenisation)."""
        return list(getattr(self, "_last_prompt_token_ids", []))

    def continuation_logprobs(
        self, conversations: list[list[dict[str, str]]], continuation: str, adapter: str | None = None
    ) -> list[float | Rejected]:
        """Per conversation, the teacher-forced total log-probability of ``continuation``'s tokens
        right after its chat prompt (e.g. of the abstention text; no EOS added), or ``Rejected``.

        Read one token at a time (``teacher_forced_steps``): one request per continuation token,
        whose one generated position reports the raw log-prob of that token
        (``logprob_token_ids``); prefix caching shares the prompt's prefill across them. vLLM's
        ``prompt_logprobs`` would score all positions in one pass, but with LoRA enabled it kills
        the CPU engine core and drops an lm_head adapter's delta on GPU (vllm-project/vllm#16668,
        #51594), while sampled log-probs are right.
        """
        with self._busy():
            return self._continuation_logprobs(conversations, continuation, adapter)

    def _continuation_logprobs(
        self, conversations: list[list[dict[str, str]]], continuation: str, adapter: str | None
    ) -> list[float | Rejected]:
        from vllm import SamplingParams

        from se_ray.prompts import chat_prompt_ids

        tail = list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
        if not tail:
            raise ValueError("continuation_logprobs needs a continuation of at least one token")
        prompts = [chat_prompt_ids(self.tokenizer, c) for c in conversations]
        out: list[float | Rejected | None] = [self._check_length(len(p) + len(tail) - 1, 1) for p in prompts]
        steps = [
            (i, context, token)
            for i, p in enumerate(prompts)
            if out[i] is None
            for context, token in teacher_forced_steps(p, tail)
        ]
        sampling = [
            SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=[t], detokenize=False)
            for _, _, t in steps
        ]
        outputs = self._run([context for _, context, _ in steps], sampling, adapter) if steps else []
        totals = {i: 0.0 for i, r in enumerate(out) if r is None}
        for (i, _, token), o in zip(steps, outputs, strict=True):
            totals[i] += o.outputs[0].logprobs[0][token].logprob
        return [totals.get(i, r) for i, r in enumerate(out)]  # type: ignore[misc]

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

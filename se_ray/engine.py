"""vLLM engines as named Ray actors, shared by sampling, the LLM judges and evaluation.

An engine is a named actor ``se-ray-llm-<digest>-<i>``, the digest a hash of its settings. By
default a job's engines live in a namespace of its own (``<ray.namespace>-job-<job id>``): every
process of the job (Ray Data replicas, Tune trials) finds them by name, no other job can, and they
stop with the job. With ``ray.shared_engines`` they are detached actors in ``ray.namespace``: a
job with the same engine settings reuses running ones and leaves them running, so the τ sweep,
evaluation or the next job pays no start-up; ``se-ray engines start|list|stop`` manages them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any

from se_ray.config import EngineConfig, JobConfig, RayConfig, SamplingConfig, StorageConfig
from se_ray.engine_actor import (
    CONTROL_GROUP,
    Completion,
    EngineFailedError,
    LLMEngineActor,
    Rejected,
    control,
    request_params,
)
from se_ray.engine_dispatch import Dispatch, first_line
from se_ray.engine_placement import engine_actor_options

logger = logging.getLogger(__name__)

# Probes of a restarted engine that may meet the killed process before the new one answers.
RESTART_PROBES = 30

__all__ = [
    "Completion",
    "EngineFailedError",
    "EnginePool",
    "Engines",
    "LLMEngineActor",
    "Rejected",
    "acquire_engines",
    "engine_namespace",
    "request_params",
]

ENGINE_PREFIX = "se-ray-llm-"


def engine_digest(cfg: EngineConfig) -> str:
    """The engine's identity: its whole EngineConfig (a SamplingConfig's engine part)."""
    engine = cfg.engine if isinstance(cfg, SamplingConfig) else cfg
    key = json.dumps(engine.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def judge_engine_config(
    model: str, generation: SamplingConfig, tensor_parallel_size: int | None = None
) -> SamplingConfig:
    """The engine an LLM judge (entailment or correctness) runs on: the generation engine when
    ``model`` is empty or is its model, else a one-engine copy for ``model`` without LoRA."""
    if not model or model == generation.model:
        return generation
    return generation.model_copy(
        update={
            "model": model,
            "enable_lora": False,
            "num_engines": 1,
            "tensor_parallel_size": tensor_parallel_size or generation.tensor_parallel_size,
        }
    )


def engine_names(cfg: SamplingConfig) -> list[str]:
    digest = engine_digest(cfg)
    return [f"{ENGINE_PREFIX}{digest}-{i}" for i in range(cfg.num_engines)]


def engine_namespace(ray_cfg: RayConfig) -> str:
    """Where a job's engines are named: ``ray.namespace`` for shared engines, else the job's own."""
    if ray_cfg.shared_engines:
        return ray_cfg.namespace
    import ray

    return f"{ray_cfg.namespace}-job-{ray.get_runtime_context().get_job_id()}"


def _is_port_clash(e: BaseException) -> bool:
    text = str(e)
    return "Address already in use" in text or "EADDRINUSE" in text


@dataclass
class EnginePool:
    """Handles to the engines of one sampling config; ``owned`` ones are stopped by ``release``.

    The pool holds the handles it was given: a non-detached actor dies with its last handle.
    ``chat`` fans calls out over the engines, isolates rows that fail a call, and restarts an
    engine that died or went silent for ``request_timeout_s`` (up to ``retries`` times a call).
    """

    names: list[str]
    namespace: str
    actors: list[Any] = field(default_factory=list)
    owned: list[str] = field(default_factory=list)
    requested_at: float = field(default_factory=time.time)
    request_timeout_s: float | None = None
    start_timeout_s: float | None = None
    retries: int = 0
    # How to start engine k again under its name (a constructor that failed is not restarted by Ray).
    engine_cfg: EngineConfig | None = None
    storage: StorageConfig | None = None
    actor_options: list[dict[str, Any]] = field(default_factory=list)
    placement_groups: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cursor = random.randrange(1 << 16)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Each process holding a copy (e.g. one Ray Data replica per engine) starts its
        # round-robin at its own engine.
        self.__dict__.update(state)
        self._cursor = random.randrange(1 << 16)

    def handles(self) -> list[Any]:
        return list(self.actors)

    def one(self) -> EnginePool:
        """A view on the next engine alone (owning nothing): for calls that must share its cache."""
        k = self._cursor % len(self.actors)
        self._cursor += 1
        return replace(self, names=[self.names[k]], actors=[self.actors[k]], owned=[])

    def chat(
        self,
        conversations: list[list[dict[str, str]]],
        params: dict[str, Any] | list[dict[str, Any]],
        adapter: str | None = None,
        batch_size: int | None = None,
    ) -> list[list[Completion] | Rejected]:
        """Completions per conversation (``Rejected`` for a row the engine would not take); chunks
        of ``batch_size`` (default: an even share per engine, so each engine batches as many
        sequences as it can) go round-robin to the engines, one call in flight per engine.
        ``params``: one dict for all, or one per conversation."""
        if not self.actors:
            raise RuntimeError("the engine pool holds no engines")
        per = params if isinstance(params, list) else [params] * len(conversations)
        size = batch_size or max(1, -(-len(conversations) // len(self.actors)))
        results: list[Any] = [None] * len(conversations)
        todo = [list(range(s, min(s + size, len(conversations)))) for s in range(0, len(conversations), size)]
        Dispatch(self, conversations, per, adapter, results).run(todo)
        return results

    def continuation_logprobs(
        self, conversations: list, continuation: str, adapter: str | None = None
    ) -> list[float | Rejected]:
        """``LLMEngineActor.continuation_logprobs``, the rows split evenly over the engines, one call
        each (no restart or retry)."""
        import ray

        if not self.actors:
            raise RuntimeError("continuation_logprobs on a released engine pool")
        n = len(self.actors)
        size = max(1, -(-len(conversations) // n))
        calls = [
            self.actors[k % n].continuation_logprobs.remote(
                conversations[s : s + size], continuation, adapter
            )
            for k, s in enumerate(range(0, len(conversations), size))
        ]
        return [value for part in ray.get(calls) for value in part]

    def _call(self, k: int, conversations: list, params: list, adapter: str | None):
        return self.actors[k].chat.remote(conversations, params, adapter)

    def restart(self, k: int, cause: str, kill: bool = True) -> None:
        """Kill engine ``k`` so Ray restarts it (its actor has ``max_restarts``), and wait for it
        to start again (``sampling.engine_start_timeout_s``); ``kill=False`` for an actor that
        died, which Ray restarts by itself."""
        import ray
        import ray.exceptions as rex

        logger.warning("restarting vLLM engine %s: %s", self.names[k], cause)
        if kill:
            ray.kill(self.actors[k], no_restart=False)
        for attempt in range(RESTART_PROBES):
            try:
                ray.get(control(self.actors[k], "info").remote(), timeout=self.start_timeout_s)
                return
            except rex.ActorUnavailableError as e:
                # The probe reached the killed process before this handle saw the restart
                # ("The actor was restarted"): ask the new one.
                if attempt == RESTART_PROBES - 1:
                    raise self._not_back(k, cause, e) from None
                time.sleep(1.0)
            except Exception as e:
                raise self._not_back(k, cause, e) from None

    def _not_back(self, k: int, cause: str, e: BaseException) -> EngineFailedError:
        return EngineFailedError(f"engine {self.names[k]} did not come back after {cause}: {first_line(e)}")

    def wait_ready(self) -> list[dict[str, Any]]:
        """Block until every engine has started (within ``sampling.engine_start_timeout_s`` of the
        request); an engine of this pool whose start failed on a port clash is started again (up
        to ``sampling.engine_retries`` times); any other start failure is raised."""
        infos = [self._wait_started(k) for k in range(len(self.actors))]
        logger.info(
            "%d vLLM engine(s) ready (engine start %s s)",
            len(infos),
            ", ".join(f"{i['start_s']:.1f}" for i in infos),
        )
        return infos

    def _wait_started(self, k: int) -> dict[str, Any]:
        import ray
        import ray.exceptions as rex

        for attempt in range(self.retries + 1):
            timeout = None
            if self.start_timeout_s is not None:
                timeout = max(1.0, self.start_timeout_s - (time.time() - self.requested_at))
            try:
                return ray.get(control(self.actors[k], "info").remote(), timeout=timeout)
            except rex.GetTimeoutError:
                raise EngineFailedError(
                    f"engine {self.names[k]} did not start within "
                    f"sampling.engine_start_timeout_s={self.start_timeout_s:g}"
                ) from None
            except Exception as e:
                if not (_is_port_clash(e) and self.names[k] in self.owned and attempt < self.retries):
                    raise
                logger.warning("engine %s hit a port clash while starting: starting it again", self.names[k])
                ray.kill(self.actors[k], no_restart=True)
                self.actors[k] = self._start(k)
        raise AssertionError("unreachable")

    def _start(self, k: int) -> Any:
        import ray

        remote = ray.remote(concurrency_groups={CONTROL_GROUP: 1})(LLMEngineActor)
        return remote.options(**self.actor_options[k]).remote(self.engine_cfg, self.storage)

    def ready_after_s(self) -> float:
        """Seconds from the request to the last engine being ready (0 for engines already running)."""
        return max(0.0, *(i["ready_at"] - self.requested_at for i in self.wait_ready()))

    def release(self, timeout_s: float = 20.0) -> None:
        """Stop the engines this pool started (its ``owned`` ones) and free their placement groups."""
        import ray

        for name, handle in zip(self.names, self.actors, strict=True):
            if name not in self.owned:
                continue
            try:
                ray.get(handle.shutdown.remote(), timeout=timeout_s)
            except Exception as e:  # the engine may already be gone; killing it is what matters
                logger.warning("engine %s did not shut down cleanly: %s", name, first_line(e))
            ray.kill(handle)
        for pg in self.placement_groups:
            ray.util.remove_placement_group(pg)
        self.owned, self.actors, self.placement_groups = [], [], []


def acquire_engines(
    cfg: SamplingConfig,
    ray_cfg: RayConfig,
    wait: bool = True,
    storage: StorageConfig | None = None,
) -> EnginePool:
    """Reuse running engines with these settings, start the missing ones, wait until ready.

    Engines are named in ``engine_namespace(ray_cfg)``. With ``ray.shared_engines`` they start
    detached, owned by no job: they outlive this process and ``release`` leaves them running
    (a detached engine in a job's own namespace could never be found again). ``wait=False``
    returns at once: calls queue behind the engines' start-up, so a caller can start its other
    actors meanwhile (and ``wait_ready`` later for a clear start-up error). ``storage``: how the
    engines reach model and adapter URIs (each copies them to its own node).
    """
    import ray

    detached = ray_cfg.shared_engines
    namespace = engine_namespace(ray_cfg)
    pool = EnginePool(
        names=engine_names(cfg),
        namespace=namespace,
        request_timeout_s=cfg.request_timeout_s,
        start_timeout_s=cfg.engine_start_timeout_s,
        retries=cfg.engine_retries,
        engine_cfg=cfg.engine,
        storage=storage,
    )
    for k, name in enumerate(pool.names):
        try:
            pool.actors.append(ray.get_actor(name, namespace=namespace))
            pool.actor_options.append({})  # not ours to start again
            logger.info("reusing running vLLM engine %s", name)
            continue
        except ValueError:
            pass
        pool.actor_options.append(engine_actor_options(cfg, name, namespace, detached, pool.placement_groups))
        pool.actors.append(pool._start(k))
        if not detached:
            pool.owned.append(name)
        logger.info("starting vLLM engine %s for %s", name, cfg.model)
    if wait:
        try:
            pool.wait_ready()
        except Exception:
            pool.release()
            raise
    return pool


class Engines:
    """The engine pools one job uses, acquired on first use and released together (only the
    engines started here are stopped). A context manager for label, evaluate and run."""

    def __init__(self, cfg: JobConfig, generation: SamplingConfig | None = None):
        self.cfg = cfg
        self.generation_cfg = generation or cfg.sampling
        self._pools: dict[str, EnginePool] = {}

    def __enter__(self) -> Engines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def pool(self, engine_cfg: SamplingConfig, wait: bool = True) -> EnginePool:
        from se_ray.runtime import ensure_ray

        digest = engine_digest(engine_cfg)
        if digest not in self._pools:
            ensure_ray(self.cfg.ray)
            self._pools[digest] = acquire_engines(
                engine_cfg, self.cfg.ray, wait=wait, storage=self.cfg.storage
            )
        return self._pools[digest]

    def generation(self, wait: bool = True) -> EnginePool:
        return self.pool(self.generation_cfg, wait)

    def correctness_judge_cfg(self, generation: SamplingConfig | None = None) -> SamplingConfig:
        e = self.cfg.eval
        return judge_engine_config(
            e.judge_model or self.cfg.sampling.model,
            generation or self.generation_cfg,
            e.judge_tensor_parallel_size,
        )

    def correctness_judge_pool(self, generation: SamplingConfig | None = None) -> EnginePool | None:
        """The LLM correctness judge's engines (None for the judges that need no model)."""
        if self.cfg.eval.judge != "llm":
            return None
        return self.pool(self.correctness_judge_cfg(generation))

    def entailment_judge_pool(self, wait: bool = True) -> EnginePool | None:
        """The LLM entailment judge's engines (None for the embedding/NLI/lexical judges)."""
        e = self.cfg.entailment
        if e.judge != "llm":
            return None
        model = "" if e.model.startswith("builtin:all-minilm") else e.model
        return self.pool(judge_engine_config(model, self.generation_cfg), wait)

    def ready_after_s(self) -> float:
        return max((p.ready_after_s() for p in self._pools.values()), default=0.0)

    def wait_ready(self) -> None:
        for p in self._pools.values():
            p.wait_ready()

    def release_one(self, engine_cfg: SamplingConfig) -> None:
        """Stop one pool (not the generation engine, which the job keeps to the end)."""
        if engine_digest(engine_cfg) != engine_digest(self.generation_cfg):
            pool = self._pools.pop(engine_digest(engine_cfg), None)
            if pool is not None:
                pool.release()

    def release(self) -> None:
        for pool in self._pools.values():
            pool.release()
        self._pools.clear()

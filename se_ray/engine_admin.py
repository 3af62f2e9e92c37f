"""``se-ray engines start|list|stop``: the shared engines (``ray.shared_engines``) of a config.

Shared engines are detached actors in ``ray.namespace``, named by their settings: ``start``
brings up the engines a verb of the config uses (generation, and the LLM judges it names) and
returns once they are ready, leaving them running; jobs run with ``ray.shared_engines=true``
and the same engine settings then use them and leave them running; ``stop`` ends them.
"""

from __future__ import annotations

from typing import Any

from se_ray.config import JobConfig, SamplingConfig
from se_ray.engine import ENGINE_PREFIX, EnginePool, Engines, control, engine_names
from se_ray.engine_dispatch import first_line


def shared(cfg: JobConfig) -> JobConfig:
    return cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"shared_engines": True})})


def verb_engine_configs(cfg: JobConfig, verb: str) -> list[SamplingConfig]:
    """The engine settings ``verb`` of this config runs on: its generation engine (for ``run``,
    LoRA serving on when it trains adapters), then the LLM judges' engines it names."""
    from se_ray.engine import judge_engine_config
    from se_ray.run.stages import generation_config

    generation = generation_config(cfg) if verb == "run" else cfg.sampling
    out = [generation]
    if cfg.entailment.judge == "llm":
        model = "" if cfg.entailment.model.startswith("builtin:all-minilm") else cfg.entailment.model
        out.append(judge_engine_config(model, generation))
    if verb != "label" and cfg.eval.judge == "llm":
        out.append(Engines(cfg, generation).correctness_judge_cfg())
    unique: dict[tuple[str, ...], SamplingConfig] = {}
    for c in out:
        unique.setdefault(tuple(engine_names(c)), c)
    return list(unique.values())


def start_engines(cfg: JobConfig, verb: str = "run") -> dict[str, Any]:
    """Start (or find running) the shared engines of ``verb``; wait until every one is ready."""
    from se_ray.engine import acquire_engines
    from se_ray.runtime import ensure_ray

    cfg = shared(cfg)
    ensure_ray(cfg.ray)
    started = []
    for engine_cfg in verb_engine_configs(cfg, verb):
        pool = acquire_engines(engine_cfg, cfg.ray, storage=cfg.storage)
        started += [
            {"name": name, "model": info["model"], "start_s": round(info["start_s"], 1)}
            for name, info in zip(pool.names, pool.wait_ready(), strict=True)
        ]
    return {"namespace": cfg.ray.namespace, "engines": started}


def _named_engines() -> list[dict[str, str]]:
    """``{"name", "namespace"}`` of every se-ray engine on the cluster."""
    from ray.util import list_named_actors

    return [e for e in list_named_actors(all_namespaces=True) if e["name"].startswith(ENGINE_PREFIX)]


def list_engines(cfg: JobConfig, probe_timeout_s: float = 5.0) -> dict[str, Any]:
    """Every se-ray engine on the cluster, in every namespace, and whether it answers."""
    import ray

    from se_ray.runtime import ensure_ray

    ensure_ray(cfg.ray)
    rows = []
    for entry in _named_engines():
        row: dict[str, Any] = {"name": entry["name"], "namespace": entry["namespace"]}
        try:
            handle = ray.get_actor(entry["name"], namespace=entry["namespace"])
            info = ray.get(control(handle, "info").remote(), timeout=probe_timeout_s)
            row.update(state="ready", model=info["model"], pid=info["pid"])
        except ray.exceptions.GetTimeoutError:
            row["state"] = "starting"
        except Exception as e:
            row.update(state="failed", error=first_line(e))
        rows.append(row)
    return {"engines": sorted(rows, key=lambda r: (r["namespace"], r["name"]))}


def stop_engines(
    cfg: JobConfig, verb: str = "run", every: bool = False, keep: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Stop the shared engines of ``verb`` (``every``: all se-ray engines in ``ray.namespace``),
    except those named in ``keep``."""
    import ray

    from se_ray.runtime import ensure_ray

    cfg = shared(cfg)
    ensure_ray(cfg.ray)
    namespace = cfg.ray.namespace
    if every:
        names = [e["name"] for e in _named_engines() if e["namespace"] == namespace]
    else:
        names = [n for c in verb_engine_configs(cfg, verb) for n in engine_names(c)]
    found = EnginePool(names=[], namespace=namespace)
    for name in (n for n in names if n not in keep):
        try:
            found.actors.append(ray.get_actor(name, namespace=namespace))
        except ValueError:
            continue
        found.names.append(name)
    stopped = list(found.names)
    found.owned = stopped  # stopping them is what was asked: release them as if started here
    found.release()
    return {"namespace": namespace, "stopped": stopped}

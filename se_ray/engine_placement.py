"""Where an engine actor runs: its Ray options, and a tensor-parallel engine's placement group."""

from __future__ import annotations

from typing import Any

from se_ray.config import SamplingConfig


def tensor_parallel_bundles(cfg: SamplingConfig) -> list[dict[str, float]]:
    """A TP engine's placement group, one node: the actor (CPUs, no GPU) and its first worker
    in bundle 0, one GPU per bundle; vLLM's Ray executor places its workers in the group."""
    accelerator = {f"accelerator_type:{cfg.accelerator_type}": 0.001} if cfg.accelerator_type else {}
    first = {"GPU": 1.0, "CPU": cfg.num_cpus_per_engine, **accelerator}
    return [{k: v for k, v in first.items() if v}] + [{"GPU": 1.0, **accelerator}] * (
        cfg.tensor_parallel_size - 1
    )


def engine_actor_options(
    cfg: SamplingConfig, name: str, namespace: str, detached: bool, placement_groups: list[Any]
) -> dict[str, Any]:
    """Ray options of engine ``name``; a TP engine's placement group, made here, is appended to
    ``placement_groups`` when this job owns it (not detached)."""
    options: dict[str, Any] = dict(
        name=name,
        namespace=namespace,
        num_cpus=cfg.num_cpus_per_engine,
        num_gpus=cfg.num_gpus_per_engine,
        max_concurrency=1,
        max_restarts=-1,  # restarts are bounded per call by engine_retries (Dispatch)
        runtime_env={"env_vars": dict(cfg.env)} if cfg.env else None,
    )
    if cfg.accelerator_type:
        options["accelerator_type"] = cfg.accelerator_type
    if detached:
        options["lifetime"] = "detached"
    if cfg.tensor_parallel_size > 1:
        # The actor and its TP workers in one placement group, made here and freed by release()
        # (a shared engine's group is detached with it); the actor itself takes no GPU.
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = placement_group(
            tensor_parallel_bundles(cfg), strategy="STRICT_PACK", lifetime="detached" if detached else None
        )
        if not detached:
            placement_groups.append(pg)
        options.pop("accelerator_type", None)  # the bundles carry it
        options.update(
            num_gpus=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
            ),
        )
    return options

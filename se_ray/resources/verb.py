"""`se-ray plan`: the job's actor groups, where Ray would put them, whether they fit, what they
cost; ``--reserve`` asks a live cluster for them as placement groups and gives them back.

The table goes to stderr, the JSON summary to stdout (the CLI's contract); a plan that fails
is one line naming the group and the node type.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from se_ray.config import JobConfig
from se_ray.resources.cluster import Cluster, live_cluster, local_cluster, read_cluster
from se_ray.resources.estimate import PhaseCost, assumptions, estimate
from se_ray.resources.groups import config_verb, job_groups, job_sizes
from se_ray.resources.model import MODELS, Arch, arch_from_hf_config
from se_ray.resources.placement import PhasePlan, PlanError, plan_phases

logger = logging.getLogger(__name__)


def _config_json(model: str) -> Path | None:
    """A model's config.json on this machine: in its folder, or in the Hugging Face cache (a hub id
    fetched with `huggingface-cli download ID config.json`); never downloaded here."""
    folder = Path(model).expanduser() / "config.json"
    if folder.is_file():
        return folder
    if "/" not in model or model.startswith(("builtin:", "s3://", "gs://")):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json")
    return Path(cached) if isinstance(cached, str) else None


def known_archs(cfg: JobConfig) -> dict[str, Arch]:
    """MODELS, plus every model of the config whose config.json is on this machine."""
    out = dict(MODELS)
    for model in (cfg.sampling.model, cfg.eval.judge_model, cfg.entailment.model):
        path = _config_json(model) if model and model not in out else None
        if path is None:
            continue
        try:
            out[model] = arch_from_hf_config(json.loads(path.read_text()))
        except (KeyError, ValueError, TypeError):
            logger.warning("could not read the sizes of %s from %s", model, path)
    return out


def _questions(cfg: JobConfig, given: int | None) -> int | None:
    if given:
        return given
    if cfg.data.limit:
        return cfg.data.limit
    path = Path(cfg.input or "")
    if cfg.input and path.suffix == ".jsonl" and path.is_file():
        with path.open() as f:
            return sum(1 for line in f if line.strip())
    return None


def _cluster(cfg: JobConfig, cluster_file: str | None, reserve: bool) -> Cluster:
    if cluster_file:
        return read_cluster(cluster_file)
    if reserve:
        import ray

        return live_cluster(ray.nodes())
    if cfg.ray.address:
        raise PlanError(
            f"ray.address={cfg.ray.address}: pass --cluster FILE (or --reserve on the live cluster)"
        )
    return local_cluster(cfg.ray.num_cpus)


def _fmt(x: float) -> str:
    return f"{x:g}" if x < 1e6 else f"{x / 2**30:.0f}Gi"


def render(plans: list[PhasePlan], costs: list[PhaseCost], cluster: Cluster, verb: str) -> str:
    """The plan as a text table: one row per actor group, then the GPU-hours and the assumptions."""
    lines = [f"se-ray plan: `se-ray {verb}` on {cluster.source}", ""]
    head = f"{'phase':<9} {'group':<18} {'n':>3}  {'CPU':>5} {'GPU':>5} {'memory':>6} {'accel':<6} "
    lines.append(head + f"{'GPU GB':>6}  node type (nodes)")
    for plan in plans:
        for g in plan.groups:
            r, nodes = g.request, plan.nodes_of(g.name)
            kinds = sorted({n.type.name for n in nodes})
            gpu_mem = max((r.gpu_use_gb(n.type.gpu.memory_gb) for n in nodes if n.type.gpu), default=0.0)
            mem = f"{gpu_mem:.1f}" if r.gpus else "-"
            lines.append(
                f"{plan.phase:<9} {g.name:<18} {g.count:>3}  {r.cpus:>5g} {r.gpus:>5g} {_fmt(r.memory):>6} "
                f"{r.accelerator or '-':<6} {mem:>6}  {', '.join(kinds)} ({len(nodes)})"
            )
    lines += ["", "GPU-hours (wall-clock x GPUs of the nodes held):"]
    for c in costs:
        hours = "n/a" if math.isnan(c.hours_each) else f"{c.gpu_hours:,.1f}"
        each = (
            "" if math.isnan(c.hours_each) else f", {c.hours_each:.2f} h each x {c.gpus_held} {c.gpu_model}"
        )
        lines.append(f"  {c.phase:<9} {hours:>10}  ({c.repeats} x; {c.basis}{each})")
    total = sum(c.gpu_hours for c in costs if not math.isnan(c.hours_each))
    lines += [f"  {'total':<9} {total:>10,.1f}", "Assumptions:"] + [f"  - {a}" for a in assumptions()]
    return "\n".join(lines)


def reserve(plans: list[PhasePlan], timeout_s: float) -> list[dict[str, Any]]:
    """Each phase's groups as placement groups (PACK, one bundle per actor), all at once; whether
    they were placed within ``timeout_s``; then released. PlanError for the first that was not."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    out = []
    for plan in plans:
        groups = [g for g in plan.groups if g.request.bundle()]
        pgs = [placement_group([g.request.bundle()] * g.count, strategy="PACK") for g in groups]
        refs = [pg.ready() for pg in pgs]
        started = time.monotonic()
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        waited = time.monotonic() - started
        placed = [ref in ready for ref in refs]
        for pg in pgs:
            remove_placement_group(pg)
        out.append({"phase": plan.phase, "placed": all(placed), "wait_s": round(waited, 2)})
        missing = [g.name for g, ok in zip(groups, placed, strict=True) if not ok]
        if missing:
            raise PlanError(
                f"reserve: {plan.phase}: {', '.join(missing)} not placed within {timeout_s:g} s (released)"
            )
    return out


def plan_job(
    cfg: JobConfig,
    *,
    config_path: str | None,
    cluster_file: str | None,
    verb: str | None = None,
    questions: int | None = None,
    do_reserve: bool = False,
    reserve_timeout_s: float = 60.0,
) -> dict[str, Any]:
    """The plan's summary; the table on stderr. PlanError (one line) when it does not hold."""
    verb = verb or config_verb(config_path) or "run"
    if do_reserve:
        if not cfg.ray.address:
            raise PlanError(
                "--reserve needs a running cluster: set ray.address (e.g. --set ray.address=auto)"
            )
        from se_ray.runtime import ensure_ray

        ensure_ray(cfg.ray)
    cluster = _cluster(cfg, cluster_file, do_reserve)
    archs = known_archs(cfg)
    plans = plan_phases(job_groups(cfg, verb, archs), cluster)
    costs = estimate(cfg, job_sizes(cfg, verb, _questions(cfg, questions)), plans, archs)
    reserved = reserve(plans, reserve_timeout_s) if do_reserve else None
    table = render(plans, costs, cluster, verb)
    if reserved is not None:
        table += "\nReserved on the live cluster (placement groups, released): " + ", ".join(
            f"{r['phase']} in {r['wait_s']:g} s" for r in reserved
        )
    print(table, file=sys.stderr)
    summary: dict[str, Any] = {
        "verb": verb,
        "cluster": cluster.source,
        "phases": [_phase_summary(p) for p in plans],
        "gpu_hours": {c.phase: None if math.isnan(c.hours_each) else round(c.gpu_hours, 2) for c in costs},
        "assumptions": assumptions(),
    }
    if reserved is not None:
        summary["reserve"] = reserved
    return summary


def _phase_summary(plan: PhasePlan) -> dict[str, Any]:
    return {
        "phase": plan.phase,
        "groups": [
            {
                "group": g.name,
                "count": g.count,
                "request": g.request.bundle(),
                "node_types": sorted({n.type.name for n in plan.nodes_of(g.name)}),
                "nodes": len(plan.nodes_of(g.name)),
            }
            for g in plan.groups
        ],
        "nodes_launched": sorted(n.type.name for n in plan.nodes if n.launched),
    }

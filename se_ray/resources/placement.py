"""`se-ray plan`'s arithmetic: the actor groups a job starts, phase by phase, with the Ray request
each actor makes, the node type Ray's autoscaler would give it, and whether it fits there in GPU
memory. Pure: no ray, no torch (cluster reads the node types, model the memory).

Placement is emulated in two steps, as Ray does it:
- the autoscaler (``ray/autoscaler/v2/scheduler.py``, ``_try_schedule``) sees resources as totals:
  it sorts the pending requests (most resource kinds, then largest, first), fills the nodes that
  exist, then launches node types one at a time, each time the type whose fresh node the remaining
  requests would use best (the utilisation score: GPU nodes only for GPU requests, most request
  kinds matched, then min and mean of ``total * utilisation**3`` over the node's resources). A
  request pinned to an accelerator type asks for ``accelerator_type:<type>: 0.001``, so only types
  that declare it fit;
- the raylet then places each actor, in the order they start, on a GPU *instance*: a whole number
  of entirely free GPUs, or a fraction < 1 on the best-fitting GPU (``resource_instance_set.cc``).
  A request the totals say fits but no single GPU holds would pend for ever: the plan says so.
Memory is checked after placement (Ray cannot: it knows GPU fractions, not bytes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from se_ray.config import ConfigError
from se_ray.resources.cluster import ACCELERATOR_PREFIX, Cluster, NodeType

EPS = 1e-9
ACCELERATOR_REQUEST = 0.001  # what Ray asks of accelerator_type:<type> for accelerator_type=
MAX_ROUNDS = 64


class PlanError(ConfigError):
    """The job cannot be placed on the cluster, or lands where it does not fit: one line."""


@dataclass(frozen=True)
class Request:
    """One actor's Ray request, and what it needs that Ray does not see."""

    cpus: float = 0.0
    gpus: float = 0.0  # a whole number of GPUs, or a fraction < 1 of one
    memory: float = 0.0  # Ray's `memory` resource, bytes
    accelerator: str | None = None
    gpu_gb: float = 0.0  # GPU memory it uses on each of its GPUs: a fixed part ...
    gpu_share: float = 0.0  # ... plus this share of the GPU (vLLM's gpu_memory_utilization)
    min_gpu_gb: float = 0.0  # it works only on GPUs at least this large

    def bundle(self) -> dict[str, float]:
        """The Ray resources asked for (a placement-group bundle, an actor's options)."""
        out = {"CPU": self.cpus, "GPU": self.gpus, "memory": self.memory}
        out = {k: v for k, v in out.items() if v > 0}
        if self.accelerator:
            out[ACCELERATOR_PREFIX + self.accelerator] = ACCELERATOR_REQUEST
        return out

    def gpu_use_gb(self, gpu_memory_gb: float) -> float:
        return self.gpu_share * gpu_memory_gb + self.gpu_gb


@dataclass(frozen=True)
class Group:
    """``count`` actors of one kind, running in one phase of the job."""

    name: str
    phase: str
    count: int
    request: Request
    note: str = ""


@dataclass
class PlacedNode:
    type: NodeType
    free: dict[str, float]
    gpu_free: list[float]
    gpu_used_gb: list[float]
    launched: bool
    holds: list[tuple[str, list[int]]] = field(default_factory=list)  # (group, GPU indices)

    @classmethod
    def fresh(cls, t: NodeType, launched: bool) -> PlacedNode:
        return cls(t, dict(t.resources), [1.0] * t.gpus, [0.0] * t.gpus, launched)


@dataclass
class PhasePlan:
    phase: str
    groups: list[Group]
    nodes: list[PlacedNode]

    def nodes_of(self, group: str) -> list[PlacedNode]:
        return [n for n in self.nodes if any(g == group for g, _ in n.holds)]

    def launched(self) -> list[PlacedNode]:
        """The nodes the autoscaler adds for this phase."""
        return [n for n in self.nodes if n.launched]

    def gpus_held(self) -> int:
        """GPUs of the nodes the phase uses (what a cloud bills), the existing ones included."""
        return sum(n.type.gpus for n in self.nodes if n.holds)


def _fits(free: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) >= v - EPS for k, v in bundle.items())


def _take(free: dict[str, float], bundle: dict[str, float]) -> None:
    for k, v in bundle.items():
        free[k] = free.get(k, 0.0) - v


# ---------------------------------------------------------------------------------- autoscaler
def _sort_key(r: Request) -> tuple:
    b = r.bundle()
    return (len(b), sum(b.values()), sorted(b.items()))


def _score(total: dict[str, float], free: dict[str, float], scheduled: list[Request]) -> tuple:
    kinds = {k for r in scheduled for k, v in r.bundle().items() if v > 0}
    matching = sum(k in total for k in kinds)
    util = [v * ((v - free.get(k, 0.0)) / v) ** 3 for k, v in total.items() if v > 0]
    gpu_ok = not (total.get("GPU", 0) > 0 and not any(r.gpus > 0 for r in scheduled))
    return (gpu_ok, matching, min(util, default=0.0), sum(util) / len(util) if util else 0.0)


def _try(free: dict[str, float], requests: list[Request]) -> tuple[list[Request], list[Request], dict]:
    left, scheduled, rest = dict(free), [], []
    for r in requests:
        if _fits(left, r.bundle()):
            _take(left, r.bundle())
            scheduled.append(r)
        else:
            rest.append(r)
    return scheduled, rest, left


def _best(views: list[tuple[dict, dict]], requests: list[Request]) -> tuple[int, list[Request], dict] | None:
    """The (total, free) view the requests use best: its index, what is left, its free after."""
    best, best_score = None, None
    for i, (total, free) in enumerate(views):
        scheduled, rest, left = _try(free, requests)
        if not scheduled:
            continue
        score = _score(total, left, scheduled)
        if best_score is None or score > best_score:
            best, best_score = (i, rest, left), score
    return best


def autoscale(
    requests: list[Request], nodes: list[PlacedNode], cluster: Cluster
) -> tuple[list[NodeType], list[Request]]:
    """The node types the autoscaler launches for pending ``requests``; and those it cannot place."""
    pending = sorted(requests, key=_sort_key, reverse=True)
    views = [(dict(n.type.resources), dict(n.free)) for n in nodes]
    while pending and views:
        found = _best(views, pending)
        if found is None:
            break
        i, pending, _ = found
        views.pop(i)
    launched_now: list[NodeType] = []
    counts = {t.name: sum(n.launched and n.type.name == t.name for n in nodes) for t in cluster.node_types}
    total = sum(counts.values())
    cap = cluster.max_workers
    candidates = [t for t in cluster.node_types if not t.head and counts[t.name] < t.max_workers]
    while pending and candidates and (cap is None or total < cap):
        found = _best([(dict(t.resources), dict(t.resources)) for t in candidates], pending)
        if found is None:
            break
        i, pending, _ = found
        t = candidates[i]
        launched_now.append(t)
        counts[t.name] += 1
        total += 1
        if counts[t.name] >= t.max_workers:
            candidates.pop(i)
    return launched_now, pending


# -------------------------------------------------------------------------------------- raylet
def _gpu_instances(node: PlacedNode, gpus: float) -> list[int] | None:
    if gpus >= 1:
        whole = [i for i, f in enumerate(node.gpu_free) if f >= 1 - EPS]
        return whole[: int(gpus)] if len(whole) >= gpus else None
    if gpus > 0:
        fits = [i for i, f in enumerate(node.gpu_free) if f >= gpus - EPS]
        return [min(fits, key=lambda i: node.gpu_free[i] - gpus)] if fits else None
    return []


def place_on(node: PlacedNode, group: str, r: Request) -> bool:
    """The raylet's rule on one node; commits and returns True when the actor fits."""
    if not _fits(node.free, r.bundle()):
        return False
    chosen = _gpu_instances(node, r.gpus)
    if chosen is None:
        return False
    _take(node.free, r.bundle())
    memory = node.type.gpu.memory_gb if node.type.gpu else 0.0
    for i in chosen:
        node.gpu_free[i] -= 1.0 if r.gpus >= 1 else r.gpus
        node.gpu_used_gb[i] += r.gpu_use_gb(memory)
    node.holds.append((group, chosen))
    return True


def _why_not(r: Request, group: str, cluster: Cluster) -> str:
    bundle = {k: round(v, 3) for k, v in r.bundle().items()}
    alone = [
        t for t in cluster.node_types if _fits(dict(t.resources), r.bundle()) and r.gpus <= max(t.gpus, 0)
    ]
    if r.accelerator and not any(r.accelerator in t.accelerators for t in cluster.node_types):
        offered = sorted({a for t in cluster.node_types for a in t.accelerators}) or ["none"]
        return (
            f"{group} cannot be placed: it asks for accelerator type {r.accelerator} and no node type of "
            f"{cluster.source} offers it (offered: {', '.join(offered)})"
        )
    if not alone:
        return (
            f"{group} cannot be placed: no node type of {cluster.source} holds one actor's request {bundle}"
        )
    names = ", ".join(f"{t.name} (max {t.max_workers})" for t in alone)
    limits = f"{cluster.source} reaches its node limits first"
    return f"{group} cannot be placed: {limits}; types that hold it: {names}"


def place_phase(phase: str, groups: list[Group], cluster: Cluster) -> PhasePlan:
    """Every actor of the phase placed, nodes launched as the autoscaler would; PlanError if not."""
    for g in groups:
        if g.request.gpus > 1 and not float(g.request.gpus).is_integer():
            raise PlanError(
                f"{phase}: {g.name} asks for {g.request.gpus:g} GPUs: Ray refuses fractions above 1"
            )
    nodes = [PlacedNode.fresh(t, False) for t in cluster.node_types for _ in range(t.existing)]
    pending = [(g.name, g.request) for g in groups for _ in range(g.count)]
    for _ in range(MAX_ROUNDS):
        pending = [(name, r) for name, r in pending if not any(place_on(n, name, r) for n in nodes)]
        if not pending:
            return PhasePlan(phase, groups, nodes)
        new, infeasible = autoscale([r for _, r in pending], nodes, cluster)
        if infeasible:
            name = next(n for n, r in pending if r is infeasible[0] or r == infeasible[0])
            raise PlanError(f"{phase}: {_why_not(infeasible[0], name, cluster)}")
        if not new:
            name, r = pending[0]
            raise PlanError(
                f"{phase}: {name} would wait for ever: the nodes have {r.gpus:g} GPU free in total, "
                "but no single GPU (or set of whole GPUs) holds it"
            )
        nodes += [PlacedNode.fresh(t, True) for t in new]
    raise PlanError(f"{phase}: placement did not settle after {MAX_ROUNDS} rounds")


# -------------------------------------------------------------------------------------- memory
def check_memory(plan: PhasePlan) -> None:
    """PlanError naming the first actor that lands where it does not fit in memory."""
    requests = {g.name: g.request for g in plan.groups}
    for node in plan.nodes:
        for name, gpus in node.holds:
            r = requests[name]
            where = f"{plan.phase}: {name} would land on {node.type.source}:{node.type.name}"
            if gpus and node.type.gpu is None:
                raise PlanError(
                    f"{where}, whose GPU model is unknown (name it: a known instance type, "
                    "nodeSelector nvidia.com/gpu.product, or an accelerator_type resource)"
                )
            if gpus and r.min_gpu_gb > node.type.gpu.memory_gb + EPS:
                raise PlanError(
                    f"{where} ({node.type.gpu_model}, {node.type.gpu.memory_gb:g} GB per GPU), "
                    f"where it does not fit: it needs {r.min_gpu_gb:.1f} GB per GPU"
                )
        for i, used in enumerate(node.gpu_used_gb):
            cap = node.type.gpu.memory_gb if node.type.gpu else 0.0
            if node.type.gpu and used > cap + EPS:
                sharing = sorted({g for g, idx in node.holds if i in idx})
                raise PlanError(
                    f"{plan.phase}: GPU {i} of {node.type.source}:{node.type.name} is oversubscribed: "
                    f"{' + '.join(sharing)} need {used:.1f} GB of its {cap:g} GB"
                )


def plan_phases(groups: Iterable[Group], cluster: Cluster) -> list[PhasePlan]:
    """Each phase placed and memory-checked, in order; the first failure raises PlanError."""
    phases: dict[str, list[Group]] = {}
    for g in groups:
        phases.setdefault(g.phase, []).append(g)
    out = []
    for phase, members in phases.items():
        plan = place_phase(phase, members, cluster)
        check_memory(plan)
        out.append(plan)
    return out

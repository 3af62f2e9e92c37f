"""The node types a cluster offers, as the Ray autoscaler sees them, read from its files: a cluster
launcher config (``ray up``: ``available_node_types``) or a KubeRay manifest (RayCluster / RayJob
head and worker groups), or from a live cluster's nodes. Pure: yaml only, no ray.

What a node type advertises is what the autoscaler plans with: the resources it declares
(KubeRay: derived from the group's ``resources``, ``rayStartParams`` and container limits, in
that order, as Ray's ``autoscaling_config.py`` does). Its GPU model, which Ray does not know,
comes from the machine type or the pod's node selector, through the tables of model.py.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from se_ray.config import ConfigError
from se_ray.resources.model import GPU_PRODUCTS, GPUS, INSTANCES, RAY_TYPES, Gpu

ACCELERATOR_PREFIX = "accelerator_type:"
RAY_MEMORY_SHARE = 0.7  # Ray advertises this share of a node's RAM as `memory` when none is declared
GPU_SELECTORS = ("nvidia.com/gpu.product", "cloud.google.com/gke-accelerator")


class ClusterFileError(ConfigError):
    """A cluster file se-ray plan cannot read: the message is one line."""


@dataclass(frozen=True)
class NodeType:
    """One kind of node: the Ray resources each node advertises and how many may exist."""

    source: str
    name: str
    resources: Mapping[str, float] = field(hash=False)
    gpu_model: str | None  # a key of model.GPUS; None: no GPU, or a model not known
    max_workers: int
    head: bool = False  # the head exists from the start; it is never launched
    existing: int = 0  # nodes already running (the head; a live cluster's nodes)

    @property
    def gpus(self) -> int:
        return int(self.resources.get("GPU", 0))

    @property
    def gpu(self) -> Gpu | None:
        return GPUS.get(self.gpu_model) if self.gpu_model else None

    @property
    def accelerators(self) -> list[str]:
        return sorted(
            k.removeprefix(ACCELERATOR_PREFIX) for k in self.resources if k.startswith(ACCELERATOR_PREFIX)
        )

    def describe(self) -> str:
        gpu = f"{self.gpus}x {self.gpu_model or 'unknown GPU'}" if self.gpus else "no GPU"
        return f"{self.name} ({gpu}, {self.resources.get('CPU', 0):g} CPUs)"


@dataclass(frozen=True)
class Cluster:
    source: str
    node_types: list[NodeType]
    max_workers: int | None = None  # the launcher's cluster-wide cap on worker nodes


_QUANTITY = {
    **{s: 1024**i for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"), start=1)},
    **{s: 1000**i for i, s in enumerate(("k", "M", "G", "T", "P", "E"), start=1)},
    "m": 1e-3,
    "": 1,
}


def k8s_quantity(value: Any) -> float:
    """A Kubernetes quantity ("64", "500m", "768Gi", 8) as a number."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value).strip())
    if not match or match[2] not in _QUANTITY:
        raise ClusterFileError(f"not a Kubernetes quantity: {value!r}")
    return float(match[1]) * _QUANTITY[match[2]]


def _gpu_model_of_instance(instance: str | None) -> str | None:
    spec = INSTANCES.get(instance or "")
    return spec[0] if spec else None


def _gpu_model_of_resources(resources: Mapping[str, float]) -> str | None:
    """A node's GPU model from the accelerator type it advertises (A100 alone: the 40 GB one)."""
    for key in resources:
        if key.startswith(ACCELERATOR_PREFIX) and key.removeprefix(ACCELERATOR_PREFIX) in RAY_TYPES:
            return RAY_TYPES[key.removeprefix(ACCELERATOR_PREFIX)]
    return None


def launcher_cluster(config: Mapping[str, Any], source: str) -> Cluster:
    """Node types of a cluster launcher config (``ray up``)."""
    try:
        head_name, types = config["head_node_type"], config["available_node_types"]
    except (KeyError, TypeError):
        raise ClusterFileError(f"{source}: no available_node_types / head_node_type") from None
    out = []
    for name, t in types.items():
        node_config = t.get("node_config", {})
        instance = node_config.get("InstanceType") or node_config.get("machineType")
        resources = {k: float(v) for k, v in t.get("resources", {}).items()}
        spec = INSTANCES.get(instance or "")
        if "memory" not in resources and spec:
            resources["memory"] = RAY_MEMORY_SHARE * spec[3] * 2**30
        gpu_model = (
            (_gpu_model_of_instance(instance) or _gpu_model_of_resources(resources))
            if resources.get("GPU")
            else None
        )
        head = name == head_name
        max_workers = 0 if head else int(t.get("max_workers", config.get("max_workers", 0)))
        out.append(NodeType(source, name, resources, gpu_model, max_workers, head, 1 if head else 0))
    return Cluster(source, out, config.get("max_workers"))


def _custom_resources(group: Mapping[str, Any]) -> dict[str, float]:
    declared = group.get("resources") or {}
    if declared:  # the top-level field is the only source when present
        return {
            k: math.ceil(k8s_quantity(v))
            for k, v in declared.items()
            if k not in ("CPU", "GPU", "TPU", "memory")
        }
    raw = (group.get("rayStartParams") or {}).get("resources")
    if not raw:
        return {}
    try:  # '"{\"Custom\": 1}"': the extra quotes dropped, the escapes removed (as Ray reads it)
        parsed = (
            json.loads(raw.strip()[1:-1].replace("\\", ""))
            if raw.strip().startswith('"')
            else json.loads(raw)
        )
    except (json.JSONDecodeError, AttributeError):
        raise ClusterFileError(f"rayStartParams.resources is not a JSON object: {raw!r}") from None
    return {k: float(v) for k, v in parsed.items()}


def _group_resources(group: Mapping[str, Any]) -> dict[str, float]:
    declared = group.get("resources") or {}
    params = group.get("rayStartParams") or {}
    container = group["template"]["spec"]["containers"][0].get("resources", {})
    limits, requests = container.get("limits", {}), container.get("requests", {})

    def pick(key: str, param: str, k8s: tuple[str, ...]) -> float | None:
        if key in declared:
            return math.ceil(k8s_quantity(declared[key]))
        if param in params:
            return float(params[param])
        for table in (limits, requests):
            for name, value in table.items():
                if name in k8s or (key == "GPU" and name.endswith("gpu")):
                    return math.ceil(k8s_quantity(value)) if key != "memory" else k8s_quantity(value)
        return None

    out: dict[str, float] = {"CPU": pick("CPU", "num-cpus", ("cpu",)) or 0.0}
    gpus = pick("GPU", "num-gpus", ())
    if gpus:
        out["GPU"] = gpus
    memory = pick("memory", "memory", ("memory",))
    if memory is not None:
        out["memory"] = memory
    out.update(_custom_resources(group))
    return out


def kuberay_cluster(docs: list[Mapping[str, Any]], source: str) -> Cluster:
    """Node types of the RayCluster (or a RayJob's rayClusterSpec) in a KubeRay manifest."""
    specs = [
        d["spec"]["rayClusterSpec"] if d.get("kind") == "RayJob" else d["spec"]
        for d in docs
        if d.get("kind") in ("RayCluster", "RayJob")
    ]
    if len(specs) != 1:
        raise ClusterFileError(f"{source}: expected one RayCluster or RayJob, found {len(specs)}")
    spec = specs[0]
    out = [NodeType(source, "head", _group_resources(spec["headGroupSpec"]), None, 0, True, 1)]
    for g in spec.get("workerGroupSpecs", []):
        resources = _group_resources(g)
        selector = g["template"]["spec"].get("nodeSelector", {})
        product = next((selector[k] for k in GPU_SELECTORS if k in selector), None)
        gpu_model = (
            (GPU_PRODUCTS.get(product or "") or _gpu_model_of_resources(resources))
            if resources.get("GPU")
            else None
        )
        max_workers = int(g.get("maxReplicas", 0)) * int(g.get("numOfHosts", 1))
        out.append(NodeType(source, g["groupName"], resources, gpu_model, max_workers))
    return Cluster(source, out)


def read_cluster(path: str | Path) -> Cluster:
    """A cluster file: a KubeRay manifest (apiVersion ray.io/...) or a cluster launcher config."""
    p = Path(path)
    if not p.is_file():
        raise ClusterFileError(f"cluster file {path} does not exist")
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
    except yaml.YAMLError as e:
        raise ClusterFileError(f"cluster file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        if any(str(d.get("apiVersion", "")).startswith("ray.io/") for d in docs if isinstance(d, dict)):
            return kuberay_cluster(docs, p.name)
        if len(docs) == 1 and isinstance(docs[0], dict):
            return launcher_cluster(docs[0], p.name)
    except (KeyError, TypeError, IndexError) as e:
        raise ClusterFileError(f"cluster file {path}: missing {e}") from None
    raise ClusterFileError(f"cluster file {path}: neither a KubeRay manifest nor a `ray up` config")


def live_cluster(nodes: list[Mapping[str, Any]], source: str = "live cluster") -> Cluster:
    """The alive nodes of ``ray.nodes()``, one node type per distinct set of resources (none launched)."""
    kinds: dict[str, tuple[dict[str, float], int]] = {}
    for n in nodes:
        if not n.get("Alive", True):
            continue
        resources = {
            k: float(v)
            for k, v in n.get("Resources", {}).items()
            if not k.startswith("node:") and k != "object_store_memory"
        }
        key = json.dumps(resources, sort_keys=True)
        kinds[key] = (resources, kinds.get(key, (resources, 0))[1] + 1)
    out = []
    for i, (resources, count) in enumerate(kinds.values()):
        gpu_model = _gpu_model_of_resources(resources) if resources.get("GPU") else None
        out.append(NodeType(source, f"node-kind-{i}", resources, gpu_model, 0, False, count))
    return Cluster(source, out, 0)


def local_cluster(num_cpus: int | None, source: str = "local (ray.num_cpus)") -> Cluster:
    """The one-node cluster `se-ray` starts itself when ray.address is unset (no GPU)."""
    return Cluster(
        source,
        [NodeType(source, "local", {"CPU": float(num_cpus or 1), "memory": 8 * 2**30}, None, 0, True, 1)],
        0,
    )

"""`se-ray plan`: every shipped job config on every shipped cluster file places, or fails with one
line, as the memory model says; the expectation per pair is derived here from the files and the
model's formulas, not from the planner. Then the planner's own rules: the autoscaler's choice
(checked against Ray's own scorer), the raylet's GPU instances, the head, the node limits, the
GPU-hour arithmetic."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml

from se_ray.config import JobConfig, load_config
from se_ray.resources.cluster import NodeType, live_cluster, read_cluster
from se_ray.resources.estimate import ENGINE_START_S, estimate
from se_ray.resources.groups import config_verb, job_groups, job_sizes
from se_ray.resources.model import GPU_PRODUCTS, GPUS, INSTANCES, MODELS, nli_gb, train_gb, vllm_fits
from se_ray.resources.placement import PlanError, Request, autoscale, place_phase, plan_phases
from tests.conftest import SE_RAY_BIN

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
CLUSTERS = sorted((REPO / "cluster").glob("**/*.yaml"))
PAIRS = [(c, k) for c in CONFIGS for k in CLUSTERS]
PAPER = REPO / "jobs" / "configs" / "paper.yaml"
AWS = REPO / "cluster" / "autoscaler" / "aws.yaml"


def _se_ray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SE_RAY_BIN, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


# ------------------------------------------------------------------ the expectation, by hand
def _worker_types(path: Path) -> dict[str, tuple[str, dict[str, float], int]]:
    """name -> (GPU model, Ray resources, max nodes) of each GPU worker type, read straight off
    the YAML (no planner code): launcher resources, or KubeRay limits + rayStartParams.resources."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    out = {}
    if docs[0].get("apiVersion", "").startswith("ray.io/"):
        spec = docs[0]["spec"].get("rayClusterSpec", docs[0]["spec"])
        for g in spec["workerGroupSpecs"]:
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            res = {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}
            res.update(json.loads(g["rayStartParams"]["resources"].strip('"').replace("\\", "")))
            product = g["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
            out[g["groupName"]] = (GPU_PRODUCTS[product], res, g["maxReplicas"])
        return out
    for name, t in docs[0]["available_node_types"].items():
        if t["resources"].get("GPU"):
            model = INSTANCES[t["node_config"].get("InstanceType") or t["node_config"].get("machineType")][0]
            out[name] = (model, {k: float(v) for k, v in t["resources"].items()}, t["max_workers"])
    return out


def _pins(cfg: JobConfig, verb: str) -> set[str]:
    pins = {cfg.sampling.accelerator_type, cfg.entailment.accelerator_type}
    if verb in ("run", "train") and cfg.train.use_gpu:
        pins.add(cfg.train.accelerator_type)
    return pins - {None}


def expected(cfg: JobConfig, verb: str, cluster: Path) -> tuple[str | None, dict[str, tuple[str, int]]]:
    """(the error's regex, or None) and, when it places, phase -> (node type, nodes) of its GPUs."""
    s, e, t = cfg.sampling, cfg.entailment, cfg.train
    if not (s.num_gpus_per_engine or e.num_gpus or t.use_gpu):
        return None, {}  # CPU actors: any worker type's CPUs hold them (checked below)
    (pin,) = _pins(cfg, verb)  # the shipped GPU configs pin one accelerator type throughout
    types = {n: v for n, v in _worker_types(cluster).items() if f"accelerator_type:{pin}" in v[1]}
    if not types:
        return rf"label: engines cannot be placed: it asks for accelerator type {pin} and no node type", {}
    ((name, (model, res, max_nodes)),) = types.items()
    mem, per_node = GPUS[model].memory_gb, res["GPU"]
    llama, deberta = MODELS[s.model], MODELS[e.model]
    if not vllm_fits(llama, mem, s.gpu_memory_utilization, 1, s.max_model_len * (s.num_samples + 1)):
        return rf"label: engines would land on {cluster.name}:{name} .* does not fit", {}
    nli = nli_gb(deberta, e.model_batch_size, s.max_tokens)
    f, g, nli_n = s.num_gpus_per_engine, e.num_gpus, e.max_actors or e.num_actors
    if f + g <= 1:  # paper.yaml: each engine's GPU takes one NLI actor beside it
        assert nli_n <= s.num_engines and g * 2 > 1 - f, "a shape this test does not derive"
        shared = s.gpu_memory_utilization * mem + 1.0 + nli
    else:  # label_gpu.yaml: whole-GPU engines, the NLI actors share GPUs of their own
        assert f == 1 and g * nli_n <= 1, "a shape this test does not derive"
        shared = nli * nli_n
    if shared > mem:
        return rf"label: GPU \d+ of {cluster.name}:{name} is oversubscribed", {}
    label_gpus = s.num_engines * f + nli_n * g
    out = {
        "label": (
            name,
            math.ceil(label_gpus / per_node - 1e-9) if f < 1 else s.num_engines + math.ceil(nli_n * g),
        )
    }
    if verb == "run" and t.use_gpu:
        worker = train_gb(
            llama,
            method=t.method,
            lora_r=t.lora_r,
            modules=t.lora_target_modules,
            workers=t.num_workers,
            zero_stage=t.zero_stage,
            seq=t.max_length,
            batch=t.micro_batch_size,
        )
        if worker > 0.95 * mem:
            return rf"train: train workers would land on {cluster.name}:{name}", {}
        out["train"] = (name, math.ceil(t.num_workers / per_node))
        out["evaluate"] = (name, math.ceil(s.num_engines * f / per_node))
    assert all(n <= max_nodes for _, n in out.values())
    return None, out


def _verb(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    return first.split("se-ray ", 1)[1].split()[0]


@pytest.mark.parametrize("config, cluster", PAIRS, ids=[f"{c.stem}-{k.stem}" for c, k in PAIRS])
def test_plan_of_every_config_on_every_cluster(config, cluster):
    cfg, verb = load_config(config), _verb(config)
    error, phases = expected(cfg, verb, cluster)
    res = _se_ray("plan", "--config", str(config), "--cluster", str(cluster))
    if error:
        assert res.returncode == 2 and res.stdout == "", res.stderr
        (line,) = res.stderr.strip().splitlines()
        assert line.startswith("se-ray plan: error: ") and __import__("re").search(error, line), line
        return
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["verb"] == verb
    got = {p["phase"]: p for p in summary["phases"]}
    for phase, (node_type, nodes) in phases.items():
        gpu_groups = [g for g in got[phase]["groups"] if g["request"].get("GPU")]
        assert gpu_groups and all(g["node_types"] == [node_type] for g in gpu_groups), got[phase]
        assert got[phase]["nodes_launched"] == [node_type] * nodes, (phase, got[phase]["nodes_launched"])
    if not phases:  # CPU only: every request fits one worker type's CPUs
        biggest = max(t.resources.get("CPU", 0) for t in read_cluster(cluster).node_types)
        assert all(g["request"].get("CPU", 0) <= biggest for p in summary["phases"] for g in p["groups"])


@pytest.mark.parametrize("cluster", CLUSTERS, ids=[k.stem for k in CLUSTERS])
@pytest.mark.parametrize("pin", ["H100", "A100"])
def test_paper_plans_onto_h100_or_a100_only(cluster, pin):
    sets = [f"{k}.accelerator_type={pin}" for k in ("sampling", "entailment", "train")]
    cfg = load_config(PAPER, sets)
    types = {t.name: t for t in read_cluster(cluster).node_types}
    try:
        plans = plan_phases(job_groups(cfg, "run"), read_cluster(cluster))
    except PlanError as e:  # the KubeRay files offer H100 alone
        assert pin == "A100" and "accelerator type A100" in str(e) and "kuberay" in str(cluster), e
        return
    used = {n.type.name for p in plans for n in p.nodes if any(gpus for _, gpus in n.holds)}
    assert used and all(types[u].gpu_model.startswith(pin) for u in used), used
    assert {p.phase: len(p.launched()) for p in plans}["label"] == 1  # sampling + NLI share one node
    assert {p.phase: len(p.launched()) for p in plans}["train"] == 1  # NCCL within one node


def test_every_cluster_head_runs_no_work():
    """Trials ask for a CPU (sweep.trial_num_cpus >= 1 in paper.yaml) because every head has none."""
    for path in CLUSTERS:
        (head,) = [t for t in read_cluster(path).node_types if t.head]
        assert head.resources.get("CPU", 0) == 0 and not head.gpus, path.name
    assert load_config(PAPER).sweep.trial_num_cpus >= 1


# ------------------------------------------------------------------------- the planner's rules
def test_the_autoscaler_choice_is_rays():
    """Node types chosen for pending requests, against Ray's own (v1) bin-packing and scorer."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import (
        _resource_based_utilization_scorer,
        get_nodes_for,
    )

    cluster = read_cluster(AWS)
    types = {
        t.name: {"resources": dict(t.resources), "max_workers": t.max_workers} for t in cluster.node_types
    }

    def scorer(res, reqs, _node_type):
        return _resource_based_utilization_scorer(
            res, reqs, node_availability_summary=NodeAvailabilitySummary({})
        )

    demands = [
        [Request(cpus=4, gpus=0.75)],  # one unpinned engine: an L4 (defect 3 of issue 16)
        [Request(cpus=4, gpus=0.75)] * 8 + [Request(cpus=2, gpus=0.25)] * 8,
        [Request(cpus=6, gpus=1)] * 8,  # unpinned trainers: the A100 node's CPUs are used best
        [Request(cpus=6, gpus=1, accelerator="H100")] * 8,
        [Request(cpus=4, gpus=1, accelerator="L4")] * 3,
    ]
    for demand in demands:
        ours, left = autoscale(demand, [], cluster)
        theirs, their_left = get_nodes_for(types, {}, "head", 12, [r.bundle() for r in demand], scorer)
        assert not left and not their_left
        assert sorted(t.name for t in ours) == sorted(n for n, k in theirs.items() for _ in range(k)), demand
    assert [t.name for t in autoscale(demands[0], [], cluster)[0]] == ["gpu_l4x1"]


def test_an_unpinned_engine_lands_on_an_l4_where_it_does_not_fit():
    cfg = load_config(PAPER, ["sampling.accelerator_type=null", "sampling.num_engines=1"])
    with pytest.raises(PlanError, match=r"evaluate: engines would land on aws.yaml:gpu_l4x1 \(L4, 24 GB"):
        plan_phases(job_groups(cfg, "evaluate"), read_cluster(AWS))
    pinned = load_config(PAPER, ["sampling.num_engines=1"])
    (plan,) = plan_phases(job_groups(pinned, "evaluate"), read_cluster(AWS))
    assert [n.type.name for n in plan.launched()] == ["gpu_h100x8"]


def test_raylet_gpu_instances():
    """Whole requests take entirely free GPUs; fractions the best-fitting one; the totals alone
    (what the autoscaler sees) can promise a GPU no instance holds: that request waits for ever."""
    node = NodeType("t", "gpu2", {"CPU": 8, "GPU": 2}, "H100-80GB", 1)
    cluster = read_cluster(AWS).__class__("t", [node], None)
    from se_ray.resources.placement import Group

    ok = place_phase(
        "p", [Group("a", "p", 2, Request(gpus=0.5)), Group("b", "p", 1, Request(gpus=1))], cluster
    )
    (n,) = ok.launched()
    assert [i for g, i in n.holds if g == "a"] == [[0], [0]] and n.gpu_free == [0.0, 0.0]
    frag = [Group("a", "p", 2, Request(gpus=0.75)), Group("b", "p", 1, Request(gpus=0.5))]
    with pytest.raises(PlanError, match="b would wait for ever"):
        place_phase("p", frag, cluster)


def test_trials_without_a_cpu_land_on_the_head():
    plans = plan_phases(job_groups(load_config(PAPER, ["sweep.trial_num_cpus=0"]), "run"), read_cluster(AWS))
    train = next(p for p in plans if p.phase == "train")
    assert [n.type.name for n in train.nodes_of("tune trials")] == ["head"]
    plans = plan_phases(job_groups(load_config(PAPER), "run"), read_cluster(AWS))
    assert all(not n.type.head for p in plans for n in p.nodes_of("tune trials"))


def test_node_limits_fail_with_one_line():
    cfg = load_config(REPO / "jobs" / "configs" / "label_gpu.yaml", ["sampling.num_engines=9"])
    with pytest.raises(
        PlanError, match=r"^label: engines cannot be placed: aws.yaml reaches its node limits"
    ):
        plan_phases(job_groups(cfg, "label"), read_cluster(AWS))


def test_gpu_hours_by_hand():
    cfg = load_config(PAPER)
    plans = plan_phases(job_groups(cfg, "run"), read_cluster(AWS))
    sizes = job_sizes(cfg, "run", None)
    assert sizes.trials == 9 * 2 + 1 + 2 * 3  # sweep (2 entropy methods x 9 taus + R-Tuning) + 2 more seeds
    costs = {c.phase: c for c in estimate(cfg, sizes, plans, MODELS)}
    tokens = 2000 * 11 * 100
    label_h = (tokens / (8 * GPUS["H100-80GB"].decode_tokens_per_s_8b) + ENGINE_START_S) / 3600
    assert costs["label"].gpu_hours == pytest.approx(label_h * 8)
    assert costs["train"].repeats == 25 and costs["train"].gpus_held == 8
    unknown = estimate(cfg, job_sizes(cfg, "label", None), plans[:1], MODELS)
    assert math.isnan(unknown[0].hours_each) and "--questions" in unknown[0].basis


def test_config_verb_and_live_nodes(tmp_path):
    assert config_verb(PAPER) == "run" and config_verb(REPO / "jobs/configs/label_gpu.yaml") == "label"
    assert config_verb(None) is None
    nodes = [
        {
            "Alive": True,
            "Resources": {"CPU": 8.0, "GPU": 4.0, "accelerator_type:H100": 1.0, "node:1.2.3.4": 1.0},
        },
        {
            "Alive": True,
            "Resources": {"CPU": 8.0, "GPU": 4.0, "accelerator_type:H100": 1.0, "node:1.2.3.5": 1.0},
        },
        {"Alive": False, "Resources": {"CPU": 1.0}},
    ]
    (kind,) = live_cluster(nodes).node_types
    assert kind.existing == 2 and kind.gpu_model == "H100-80GB" and kind.max_workers == 0


def test_plan_cli_contract():
    res = _se_ray("plan", "--config", str(PAPER), "--cluster", str(AWS))
    assert res.returncode == 0 and "Assumptions:" in res.stderr and "gpu_h100x8" in res.stderr
    assert json.loads(res.stdout)["gpu_hours"]["label"] > 0
    res = _se_ray("plan", "--config", str(PAPER), "--cluster", "cluster/nope.yaml")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "se-ray plan: error: cluster file cluster/nope.yaml does not exist"
    ]

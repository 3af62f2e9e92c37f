"""Deployment files, checked without a cluster.

- ``cluster/kuberay/*.yaml`` against the KubeRay CRDs' ``ray.io/v1`` OpenAPI schemas, made
  structural the way the Kubernetes API server applies them (unknown fields rejected);
- ``cluster/autoscaler/*.yaml`` against the schema Ray ships (and Ray's own ``ray up`` checks);
- ``jobs/configs/*.yaml`` through ``se_ray.config.load_config``; ``jobs/runtime_env.yaml``
  through Ray's runtime-env parser and packager;
- the ``Dockerfile``, linted structurally (no Docker engine or hadolint here);
- resource arithmetic: each job config's actor pools, stage by stage, pack onto the GPU node
  types the cluster files declare, by Ray's own placement rules, and fit in GPU memory.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

from se_ray.config import JobConfig, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
KUBERAY_SCHEMAS = SHARED / "schemas" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}

KUBERAY_FILES = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
AUTOSCALER_FILES = sorted((REPO / "cluster" / "autoscaler").glob("*.yaml"))
JOB_CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
RUNTIME_ENV = REPO / "jobs" / "runtime_env.yaml"
DOCKERFILE = REPO / "Dockerfile"
PAPER = REPO / "jobs" / "configs" / "paper.yaml"

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def _load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_Loader)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


_SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|ACCESS_KEY|API_KEY|CREDENTIALS?)($|_)")


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _ray_dir() -> Path:
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def test_the_files_exist():
    assert KUBERAY_FILES, "cluster/kuberay/*.yaml"
    assert AUTOSCALER_FILES, "cluster/autoscaler/*.yaml"
    assert PAPER.is_file() and RUNTIME_ENV.is_file() and DOCKERFILE.is_file()


# --------------------------------------------------------------------------------------------
# KubeRay manifests against the CRDs
# --------------------------------------------------------------------------------------------

# Keywords whose value is a map of name -> schema, a schema, or a list of schemas.
_SCHEMA_MAPS = ("properties", "patternProperties", "definitions")
_SCHEMA_ONE = ("items", "additionalProperties", "not")
_SCHEMA_LIST = ("allOf", "anyOf", "oneOf")

# ObjectMeta is validated by the API server itself, not by the CRD (whose schema says only
# `type: object`); these are the fields a manifest sets. Names: RFC 1035 labels, because
# KubeRay derives Service names from them.
_OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 63, "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def k8s_structural(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's OpenAPI v3 schema -> a Draft 7 schema that rejects what the API server rejects.

    Kubernetes treats CRD schemas as *structural*: a field not declared under ``properties``
    is unknown (pruned, or an error under strict field validation, kubectl's default) unless
    the object says ``x-kubernetes-preserve-unknown-fields``; JSON Schema allows it. So every
    object schema with ``properties`` and no ``additionalProperties`` gets
    ``additionalProperties: false``, recursively. ``x-kubernetes-int-or-string`` means
    "integer or string" (controller-gen also writes the ``anyOf``; it is added where missing,
    so such fields are never untyped); ``nullable`` admits null; the other ``x-kubernetes-*``
    keys (list/map types, CEL rules) are dropped: they are beyond JSON Schema.
    """
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    for kw in _SCHEMA_MAPS:
        if isinstance(out.get(kw), dict):
            out[kw] = {name: k8s_structural(sub) for name, sub in out[kw].items()}
    for kw in _SCHEMA_ONE:
        if isinstance(out.get(kw), dict):
            out[kw] = k8s_structural(out[kw])
    for kw in _SCHEMA_LIST:
        if isinstance(out.get(kw), list):
            out[kw] = [k8s_structural(sub) for sub in out[kw]]
    if schema.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def _crd_schema(kind: str, structural: bool = True) -> dict[str, Any]:
    if not KUBERAY_SCHEMAS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY_SCHEMAS} (the shared folder beside the repo)")
    crd = _load_yaml(KUBERAY_SCHEMAS / CRD_FILES[kind])
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    if not structural:
        return schema
    out = k8s_structural(schema)
    out["properties"]["metadata"] = _OBJECT_META
    out["required"] = sorted({*out.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    out["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    out["properties"]["kind"] = {"const": kind}
    return out


@cache
def _crd_validator(kind: str, structural: bool = True):
    schema = _crd_schema(kind, structural)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _k8s_errors(doc: dict[str, Any], structural: bool = True) -> list[str]:
    kind = doc.get("kind")
    assert kind in CRD_FILES, f"unexpected kind {kind!r} (have CRDs for {sorted(CRD_FILES)})"
    errors = sorted(_crd_validator(kind, structural).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}" for e in errors]


def _kuberay_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p.name}#{i}", d) for p in KUBERAY_FILES for i, d in enumerate(_docs(p))]


def _raycluster() -> dict[str, Any]:
    (doc,) = [d for _, d in _kuberay_docs() if d["kind"] == "RayCluster"]
    return doc


def _rayjob() -> dict[str, Any]:
    (doc,) = [d for _, d in _kuberay_docs() if d["kind"] == "RayJob"]
    return doc


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=_ids(KUBERAY_FILES))
def test_kuberay_manifest_matches_its_crd(path):
    docs = _docs(path)
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        errors = _k8s_errors(doc)
        assert not errors, f"{path.name} ({doc.get('kind')}):\n" + "\n".join(errors)


def test_structural_schema_is_not_vacuous():
    """The transformed schema closes thousands of objects and types every int-or-string field."""
    schema = _crd_schema("RayCluster")
    closed, int_or_string, untyped_leaves = 0, 0, []

    def walk(node: Any, path: str) -> None:
        nonlocal closed, int_or_string
        if not isinstance(node, dict):
            return
        if node.get("additionalProperties") is False:
            closed += 1
        if node.get("anyOf") == [{"type": "integer"}, {"type": "string"}]:
            int_or_string += 1
        elif not ({"type", "anyOf", "oneOf", "allOf", "const", "$ref", "properties"} & node.keys()):
            untyped_leaves.append(path)
        for kw in _SCHEMA_MAPS:
            for name, sub in (node.get(kw) or {}).items():
                walk(sub, f"{path}.{name}")
        for kw in _SCHEMA_ONE:
            if isinstance(node.get(kw), dict):
                walk(node[kw], f"{path}[{kw}]")
        for kw in _SCHEMA_LIST:
            for i, sub in enumerate(node.get(kw) or []):
                walk(sub, f"{path}[{kw}{i}]")

    walk(schema, "")
    assert closed > 500, closed
    assert int_or_string > 50, int_or_string
    assert not untyped_leaves, untyped_leaves[:10]


def _mutated(doc: dict[str, Any], path: tuple[Any, ...], key: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node = out
    for p in path:
        node = node[p]
    node[key] = value
    return out


_HEAD = ("spec", "headGroupSpec")
_GPU_GROUP = ("spec", "workerGroupSpecs", 0)
_GPU_CONTAINER = (*_GPU_GROUP, "template", "spec", "containers", 0)


def test_misspelled_field_is_rejected_where_the_raw_crd_would_accept_it():
    doc = _raycluster()
    bad = _mutated(doc, _HEAD, "rayStartParamz", {"num-cpus": "0"})
    assert not _k8s_errors(bad, structural=False), "the raw CRD schema is open: this is why k8s_structural"
    errors = _k8s_errors(bad)
    assert errors and any("rayStartParamz" in e and e.startswith("spec.headGroupSpec") for e in errors), (
        errors
    )


@pytest.mark.parametrize(
    "path, key, value, where",
    [
        (_GPU_GROUP, "replicas", "two", "spec.workerGroupSpecs.0.replicas"),
        (_GPU_GROUP, "maxReplicas", 2.5, "spec.workerGroupSpecs.0.maxReplicas"),
        (_GPU_CONTAINER, "imagePullPolicyy", "Always", "spec.workerGroupSpecs.0.template.spec.containers.0"),
        (("spec", "autoscalerOptions"), "upscalingMode", "Eager", "spec.autoscalerOptions.upscalingMode"),
        (("spec",), "enableInTreeAutoscaling", "yes", "spec.enableInTreeAutoscaling"),
        (("metadata",), "name", "se_ray", "metadata.name"),
    ],
    ids=["replicas-string", "replicas-float", "unknown-container-field", "enum", "bool", "bad-name"],
)
def test_raycluster_negative(path, key, value, where):
    errors = _k8s_errors(_mutated(_raycluster(), path, key, value))
    assert any(e.startswith(where) for e in errors), errors


@pytest.mark.parametrize("value", ["eight", True, "8 GPUs"], ids=["word", "bool", "unit-typo"])
def test_int_or_string_quantities_are_typed(value):
    """``nvidia.com/gpu`` is an int-or-string Kubernetes quantity: 8 and "8" pass, these fail."""
    for ok in (8, "8"):
        doc = _mutated(_raycluster(), (*_GPU_CONTAINER, "resources", "limits"), "nvidia.com/gpu", ok)
        assert not _k8s_errors(doc)
    doc = _mutated(_raycluster(), (*_GPU_CONTAINER, "resources", "limits"), "nvidia.com/gpu", value)
    errors = _k8s_errors(doc)
    assert any("nvidia.com/gpu" in e for e in errors), errors


def test_rayjob_negative():
    job = _rayjob()
    errors = _k8s_errors(_mutated(job, ("spec",), "shutdownAfterJobFinish", True))
    assert any("shutdownAfterJobFinish" in e for e in errors), errors
    errors = _k8s_errors(_mutated(job, ("spec",), "ttlSecondsAfterFinished", "1h"))
    assert any(e.startswith("spec.ttlSecondsAfterFinished") for e in errors), errors
    bad = _mutated(job, ("spec", "rayClusterSpec", "headGroupSpec"), "rayStartParamz", {})
    assert _k8s_errors(bad)


_QUANTITY_SUFFIXES = {
    **{s: 1024**i for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"), start=1)},
    **{s: 1000**i for i, s in enumerate(("k", "M", "G", "T", "P", "E"), start=1)},
    "m": 1e-3,
}


def _quantity(value: Any) -> float:
    """A Kubernetes quantity ("64", "500m", "768Gi", 8) as a number."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match and (match[2] in _QUANTITY_SUFFIXES or not match[2]), f"not a quantity: {value!r}"
    return float(match[1]) * _QUANTITY_SUFFIXES.get(match[2], 1)


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_cluster_semantics():
    """What KubeRay and Ray check at run time, beyond the schema."""
    cluster, job = _raycluster(), _rayjob()
    spec = cluster["spec"]
    assert job["spec"]["rayClusterSpec"] == spec, "rayjob.yaml must embed the same cluster as raycluster.yaml"
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "the head runs no tasks"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names))
    for group in spec["workerGroupSpecs"]:
        name = group["groupName"]
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name
        (container,) = group["template"]["spec"]["containers"]
        limits, requests = container["resources"]["limits"], container["resources"].get("requests", {})
        assert int(_quantity(limits["nvidia.com/gpu"])) >= 1, name
        assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"], name
        for key, value in requests.items():  # the API server rejects requests above limits
            assert _quantity(value) <= _quantity(limits[key]), (name, key)
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/dev/shm" in mounts, "NCCL/vLLM need a real /dev/shm"
    # A job that deletes its cluster when done
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[:2] == ["se-ray", "run"]
    config = Path(entry[entry.index("--config") + 1])
    assert config.is_absolute() and config.parts[:4] == ("/", "home", "ray", "se-ray"), config
    assert (REPO / config.relative_to("/home/ray/se-ray")).is_file(), f"{config} is not in the repo"
    assert ("WORKDIR", "/home/ray/se-ray") in _dockerfile(), "the image keeps se-ray in /home/ray/se-ray"
    assert any(i == "COPY" and " jobs/ " in f" {a} " for i, a in _dockerfile()), "the image holds jobs/"
    assert "://" in entry[entry.index("--output") + 1], "outputs go to object storage"
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]


def _image_tag() -> str:
    return f"ghcr.io/se-ray/se-ray:{_pyproject()['project']['version']}-gpu"


def test_images_and_versions_agree():
    """Every manifest runs the image the Dockerfile builds, on the Ray version it is built from."""
    ray_version = _raycluster()["spec"]["rayVersion"]
    images = {c["image"] for c in _containers(_raycluster()["spec"])}
    images |= {c["image"] for c in _rayjob()["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    images |= {_load_yaml(p)["docker"]["image"] for p in AUTOSCALER_FILES if _load_yaml(p).get("docker")}
    assert images == {_image_tag()}, images
    (base,) = [args for instr, args in _dockerfile() if instr == "FROM"]
    assert base.split(":", 1)[1].startswith(ray_version + "-"), (base, ray_version)
    assert _image_tag() in DOCKERFILE.read_text(), "the Dockerfile's build command names the tag"
    installed = (_ray_dir() / "_version.py").read_text()
    assert re.search(rf"""version\s*=\s*["']{re.escape(ray_version.rsplit(".", 1)[0])}\.""", installed), (
        "the local ray is not the cluster's Ray minor version"
    )


# --------------------------------------------------------------------------------------------
# Ray cluster launcher (autoscaler) configs
# --------------------------------------------------------------------------------------------


@cache
def _ray_schema() -> dict[str, Any]:
    return json.loads((_ray_dir() / "autoscaler" / "ray-schema.json").read_text())


def _launcher_errors(config: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(_ray_schema())
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(config)
    ]


@pytest.mark.parametrize("path", AUTOSCALER_FILES, ids=_ids(AUTOSCALER_FILES))
def test_autoscaler_config_matches_ray_schema(path):
    config = _load_yaml(path)
    assert not _launcher_errors(config), _launcher_errors(config)
    assert path.read_text().startswith(f"# ray up cluster/autoscaler/{path.name}\n")


@pytest.mark.parametrize("path", AUTOSCALER_FILES, ids=_ids(AUTOSCALER_FILES))
def test_autoscaler_config_passes_ray_up_checks(path):
    """What `ray up` runs before it talks to the cloud: defaults merged, then validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_load_yaml(path))
    validate_config(config)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head runs no tasks"
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types.values()), "GPU nodes scale from 0"
    for name, t in gpu_types.items():
        assert {"CPU", "GPU", "memory"} <= t["resources"].keys(), f"{name}: declare CPU, GPU and memory"
        assert t["max_workers"] <= config["max_workers"], name
    assert any("pip install" in c and "[gpu]" in c for c in config["setup_commands"])


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda c: c.update(idle_timeout_minute=5), ""),
        (lambda c: c["available_node_types"]["gpu_h100x8"]["resources"].update(GPU="8"), "resources.GPU"),
        (lambda c: c["available_node_types"]["gpu_h100x8"].update(min_worker=1), "gpu_h100x8"),
        (lambda c: c["available_node_types"]["gpu_h100x8"].pop("node_config"), "gpu_h100x8"),
        (lambda c: c["provider"].pop("type"), "provider"),
    ],
    ids=[
        "unknown-top-level-key",
        "gpu-as-string",
        "misspelled-node-type-key",
        "no-node-config",
        "no-provider",
    ],
)
@pytest.mark.parametrize("path", AUTOSCALER_FILES, ids=_ids(AUTOSCALER_FILES))
def test_autoscaler_negative(path, mutate, where):
    config = _load_yaml(path)
    mutate(config)
    errors = _launcher_errors(config)
    assert errors and any(where in e for e in errors), errors


# --------------------------------------------------------------------------------------------
# Job configs and the runtime environment
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=_ids(JOB_CONFIGS))
def test_job_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"--config jobs/configs/{path.name}" in first, (
        f"{path.name} must open with the command that runs it"
    )
    words = shlex.split(first[2:])
    if "--runtime-env" in words:
        assert (REPO / words[words.index("--runtime-env") + 1]).is_file()


def test_paper_config_is_the_papers_setting():
    cfg = load_config(PAPER)
    s, e, t = cfg.sampling, cfg.entailment, cfg.train
    assert (s.model, s.num_samples, s.temperature, s.standard_temperature) == (
        "meta-llama/Meta-Llama-3-8B-Instruct",
        10,
        1.0,
        0.1,
    )
    assert (s.answer_style, s.max_tokens) == ("sentence", 100)
    assert (e.judge, e.model, e.strict) == ("nli", "microsoft/deberta-v2-xlarge-mnli", True)
    assert cfg.labeling.method == "semantic_entropy"
    assert (t.num_workers, t.use_gpu, t.zero_stage, t.method) == (8, True, 2, "lora")
    assert (t.lora_r, t.lora_target_modules, t.learning_rate) == (8, ["q_proj", "v_proj"], 3e-5)
    assert (t.global_batch_size, t.epochs, t.warmup_ratio) == (48, 7, 0.2)
    assert t.global_batch_size == t.micro_batch_size * t.num_workers  # no gradient accumulation
    assert (cfg.eval.judge, cfg.eval.judge_model) == ("llm", "meta-llama/Meta-Llama-3-8B-Instruct")  # A.2
    assert judge_engine(cfg) is None  # the 8B judge shares the evaluation engines
    assert (cfg.split.train, cfg.split.validation) == (2000, 500)
    assert cfg.sweep.taus == [0.25 * i for i in range(1, 10)] and cfg.sweep.seeds == 3


def test_runtime_env_parses_and_installs_from_the_working_dir(tmp_path):
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    raw = _load_yaml(RUNTIME_ENV)
    env = RuntimeEnv(**raw)  # Ray's own validation of every field
    packages = env.pip_config()["packages"]
    assert packages == ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}[gpu]"]
    assert "gpu" in _pyproject()["project"]["optional-dependencies"]
    assert all(isinstance(v, str) for v in env.env_vars().values())
    assert not [k for k in env.env_vars() if _SECRET_NAME.search(k)], "no secrets in the runtime env"
    assert raw["config"]["setup_timeout_seconds"] >= 1200, "installing torch + vllm outlasts Ray's 600 s"
    # What `ray job submit --working-dir .` would upload, with these excludes only
    zipped = tmp_path / "pkg.zip"
    create_package(str(REPO), zipped, include_gitignore=False, excludes=raw["excludes"])
    import zipfile

    names = zipfile.ZipFile(zipped).namelist()
    assert "pyproject.toml" in names and "jobs/configs/paper.yaml" in names
    assert not [n for n in names if n.startswith((".venv/", ".git/", "out/")) or "__pycache__" in n]
    assert zipped.stat().st_size < 20 * 2**20, (
        f"working dir upload is {zipped.stat().st_size / 2**20:.1f} MiB"
    )


# --------------------------------------------------------------------------------------------
# Dockerfile lint (structural: no Docker engine, no hadolint here)
# --------------------------------------------------------------------------------------------


@cache
def _dockerfile() -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    instructions, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        instr, _, args = current.partition(" ")
        instructions.append((instr.upper(), args.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return tuple(instructions)


def _run_commands() -> list[str]:
    return [args for instr, args in _dockerfile() if instr == "RUN"]


def test_dockerfile_base_image_is_pinned():
    instrs = _dockerfile()
    first = next(i for i in instrs if i[0] != "ARG")
    assert first[0] == "FROM", "the first instruction (after ARGs) must be FROM"
    for instr, args in instrs:
        if instr != "FROM":
            continue
        image = args.split()[0]
        assert "$" not in image, "pin the base image literally"
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and "latest" not in tag, f"FROM {image}: pin a version tag"
        assert name == "rayproject/ray" and re.fullmatch(r"\d+\.\d+\.\d+-py3\d+-cu\d+", tag), image


def test_dockerfile_structure():
    instrs = _dockerfile()
    kinds = [i for i, _ in instrs]
    known = {
        "FROM",
        "ARG",
        "ENV",
        "LABEL",
        "USER",
        "WORKDIR",
        "COPY",
        "ADD",
        "RUN",
        "EXPOSE",
        "ENTRYPOINT",
        "CMD",
        "SHELL",
        "HEALTHCHECK",
        "VOLUME",
        "STOPSIGNAL",
        "ONBUILD",
    }
    assert set(kinds) <= known, set(kinds) - known
    workdirs = [a for i, a in instrs if i == "WORKDIR"]
    assert workdirs and all(w.startswith("/") for w in workdirs)
    assert "COPY" in kinds
    pip = [r for r in _run_commands() if "pip install" in r]
    assert pip, "RUN pip install"
    for run in pip:
        for cmd in re.split(r"&&|;", run):
            if "pip install" in cmd:
                assert "--no-cache-dir" in cmd, f"pip cache bloats the image: {cmd.strip()}"
    assert any(".[gpu]" in r for r in pip), "installs se-ray's gpu extra (vllm)"
    for instr, args in instrs:
        if instr == "ADD":
            assert not re.search(r"(https?|ftp)://|git@", args), f"ADD of a URL: {args}"
    users = [a.split(":")[0] for i, a in instrs if i == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"


def test_dockerfile_has_no_secrets():
    for instr, args in _dockerfile():
        if instr in ("ENV", "ARG"):
            for key in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0].split("=")[0]]:
                assert not _SECRET_NAME.search(key.upper()), key
    assert not re.search(r"hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}", DOCKERFILE.read_text())


def test_dockerfile_copies_only_what_exists():
    """COPY by name (no `COPY .`: without a .dockerignore that ships the local .venv)."""
    missing = []
    for instr, args in _dockerfile():
        if instr != "COPY":
            continue
        words = [w for w in args.split() if not w.startswith("--")]
        for src in words[:-1]:
            assert src not in (".", "./", "*") or (REPO / ".dockerignore").is_file(), f"COPY {src}"
            if not (REPO / src).exists():
                missing.append(src)
    readme = _pyproject()["project"].get("readme")
    if missing and set(missing) <= {readme}:
        pytest.skip(
            f"{readme} (pyproject's readme) does not exist yet; `docker build` and `pip install .` need it"
        )
    assert not missing, missing


# --------------------------------------------------------------------------------------------
# Resource arithmetic: do the job configs' actor pools fit the declared GPU nodes?
# --------------------------------------------------------------------------------------------
#
# Placement, as Ray does it (src/ray/common/scheduling/resource_instance_set.cc, TryAllocate):
# a GPU request is a whole number (it takes that many *entirely free* GPUs) or a fraction < 1
# (it goes to the *best-fitting* GPU: the one with the least capacity left that still holds it;
# fractional requests >= 1 are refused). So fractional actors pack into whole GPUs, and whether
# a 0.25-GPU actor can share a GPU with an engine depends on what the engine took.
# Requests per pool (how se_ray starts them):
#   vLLM engine    tensor_parallel_size == 1: one actor, num_gpus_per_engine GPUs (may be a
#                  fraction), num_cpus_per_engine CPUs (se_ray/engine.py).
#                  tensor_parallel_size  > 1: the actor takes 0 GPUs and vLLM's Ray executor
#                  places TP workers of 1 GPU each; they must share a node (NVLink), so the
#                  engine counts as one TP-GPU request.
#   NLI actor      entailment.num_gpus, entailment.num_cpus (Ray Data actor pool).
#   train worker   1 GPU and train.cpus_per_worker CPUs (Ray Train, use_gpu).
#   LLM judge      an engine of eval.judge_model; its TP is not a config key yet: the smallest
#                  power of two that fits in GPU memory (judge_tp_needed below).
# Stages running at once: sampling + entailment (they stream together), then training alone,
# then evaluation (engines and judge counted together: the conservative case).
# Nodes are filled first-fit in the order the actors start (engines are acquired before the
# dataset runs, so they start first); the autoscaler adds nodes up to the type's max workers.

GB = 1e9


@dataclass(frozen=True)
class Arch:
    """From each model's config.json on the Hugging Face Hub."""

    params_b: float  # billions of parameters
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int


MODELS = {
    "meta-llama/Meta-Llama-3-8B-Instruct": Arch(8.03, 32, 4096, 32, 8, 128, 128256, 14336),
    "meta-llama/Meta-Llama-3-70B-Instruct": Arch(70.55, 80, 8192, 64, 8, 128, 128256, 28672),
    "microsoft/deberta-v2-xlarge-mnli": Arch(0.886, 24, 1536, 24, 24, 64, 128100, 6144),
}

# Memory per GPU as sold, in GB (1e9 bytes); usable memory is 1-3% less, which the
# activation and context reserves below absorb.
GPU_MEMORY_GB = {"H100-80GB": 80.0, "A100-40GB": 40.0, "A100-80GB": 80.0, "L4": 24.0}
# Instance / machine type -> (GPU model, GPUs, vCPUs, RAM in GiB), from the clouds' spec sheets.
INSTANCES = {
    "p5.48xlarge": ("H100-80GB", 8, 192, 2048),
    "p4d.24xlarge": ("A100-40GB", 8, 96, 1152),
    "p4de.24xlarge": ("A100-80GB", 8, 96, 1152),
    "g6.xlarge": ("L4", 1, 4, 16),
    "g6.2xlarge": ("L4", 1, 8, 32),
    "a3-highgpu-8g": ("H100-80GB", 8, 208, 1743),  # 1872 GB
    "a2-highgpu-8g": ("A100-40GB", 8, 96, 633),  # 680 GB
    "a2-ultragpu-8g": ("A100-80GB", 8, 96, 1266),  # 1360 GB
    "g2-standard-8": ("L4", 1, 8, 29),  # 32 GB
}
# Node labels of NVIDIA GPU feature discovery (nvidia.com/gpu.product) -> GPU model.
GPU_PRODUCTS = {
    "NVIDIA-H100-80GB-HBM3": "H100-80GB",
    "NVIDIA-A100-SXM4-40GB": "A100-40GB",
    "NVIDIA-A100-SXM4-80GB": "A100-80GB",
    "NVIDIA-L4": "L4",
}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "auto": 2, "float32": 4}
CUDA_CONTEXT_GB = 1.0  # per process: CUDA context, cuBLAS/NCCL workspaces
VLLM_ACTIVATION_GB = 2.0  # vLLM's profiled peak activations, sampler and CUDA graphs at 1k context
PROMPT_TOKENS = 64  # chat template + question (NQ questions are short)


def _arch(model: str) -> Arch:
    assert model in MODELS, f"no memory figures for {model!r}: add its config.json numbers to MODELS"
    return MODELS[model]


def weights_gb(model: str, dtype: str = "bfloat16") -> float:
    return _arch(model).params_b * 1e9 * DTYPE_BYTES[dtype] / GB


def kv_bytes_per_token(model: str, dtype: str = "bfloat16") -> float:
    a = _arch(model)
    return 2 * a.layers * a.kv_heads * a.head_dim * DTYPE_BYTES[dtype]  # K and V


def vllm_kv_gb(model: str, gpu_mem_gb: float, utilization: float, tp: int, dtype: str = "bfloat16") -> float:
    """KV cache left per GPU once the weights shard and activations are in vLLM's budget."""
    return utilization * gpu_mem_gb - weights_gb(model, dtype) / tp - VLLM_ACTIVATION_GB


def vllm_fits(
    model: str, gpu_mem_gb: float, utilization: float, tp: int, tokens: int, dtype="bfloat16"
) -> bool:
    """Whether the engine starts and holds `tokens` tokens of KV cache (vLLM refuses to start
    when the cache cannot hold one max_model_len sequence; we ask for one question's samples)."""
    return (
        vllm_kv_gb(model, gpu_mem_gb, utilization, tp, dtype) * GB >= tokens * kv_bytes_per_token(model) / tp
    )


def tp_lower_bound(model: str, gpu_mem_gb: float, dtype: str = "bfloat16") -> int:
    """Weights alone: the fewest GPUs (power of two) whose memory holds the weights."""
    return 2 ** math.ceil(math.log2(max(1.0, weights_gb(model, dtype) / gpu_mem_gb)))


def judge_tp_needed(model: str, gpu_mem_gb: float, max_model_len: int, utilization: float = 0.9) -> int:
    """The smallest power-of-two tensor parallelism with which the vLLM engine fits."""
    tp = tp_lower_bound(model, gpu_mem_gb)
    while not vllm_fits(model, gpu_mem_gb, utilization, tp, max_model_len):
        tp *= 2
        assert tp <= 64
    return tp


def nli_gb(model: str, model_batch_size: int, max_answer_tokens: int) -> float:
    """An NLI actor: fp32 weights (loaded at the model's saved dtype) + inference activations.
    A pair is "{question} {answer_a}" [SEP] "{question} {answer_b}". Peak activations: the
    attention scores of one layer (DeBERTa adds content-to-position and position-to-content
    terms: 3 score matrices) plus a few hidden-state copies."""
    a = _arch(model)
    seq = 2 * (PROMPT_TOKENS + max_answer_tokens)
    scores = model_batch_size * a.heads * seq * seq * 4 * 3
    hidden = model_batch_size * seq * max(a.hidden, a.intermediate) * 4 * 4
    return weights_gb(model, "float32") + (scores + hidden) / GB + CUDA_CONTEXT_GB


def lora_params(model: str, r: int, modules: list[str]) -> float:
    a = _arch(model)
    kv = a.kv_heads * a.head_dim
    shapes = {
        "q_proj": (a.hidden, a.heads * a.head_dim),
        "k_proj": (a.hidden, kv),
        "v_proj": (a.hidden, kv),
        "o_proj": (a.heads * a.head_dim, a.hidden),
        "gate_proj": (a.hidden, a.intermediate),
        "up_proj": (a.hidden, a.intermediate),
        "down_proj": (a.intermediate, a.hidden),
    }
    return a.layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in modules)


def train_gb(cfg: JobConfig) -> float:
    """One ZeRO-2 worker (bf16 weights replicated; grads + fp32 Adam states of the trainable
    parameters sharded over the workers) + activations without recomputation (Korthikanti et
    al. 2022: s*b*h*L*(34 + 5*a*s/h) bytes) + fp32 logits and their gradient."""
    t, a = cfg.train, _arch(cfg.sampling.model)
    trainable = (
        a.params_b * 1e9
        if t.method == "full"
        else lora_params(cfg.sampling.model, t.lora_r, t.lora_target_modules)
    )
    states = (2 + 12) * trainable / (t.num_workers if t.zero_stage >= 2 else 1)
    s, b = t.max_length, t.micro_batch_size
    activations = s * b * a.hidden * a.layers * (34 + 5 * a.heads * s / a.hidden)
    logits = 2 * b * s * a.vocab * 4
    return weights_gb(cfg.sampling.model) + (states + activations + logits) / GB + CUDA_CONTEXT_GB


@dataclass(frozen=True)
class NodeType:
    source: str
    name: str
    gpu_model: str
    gpus: int
    cpus: float
    max_workers: int

    @property
    def gpu_mem_gb(self) -> float:
        assert self.gpu_model in GPU_MEMORY_GB, (
            f"{self.source}:{self.name}: {self.gpu_model} (see GPU_PRODUCTS)"
        )
        return GPU_MEMORY_GB[self.gpu_model]


def _launcher_node_types(path: Path) -> list[NodeType]:
    """GPU node types of a launcher config; their machines are checked by a test below."""
    config = _load_yaml(path)
    out = []
    for name, t in config["available_node_types"].items():
        gpus = t["resources"].get("GPU", 0)
        if not gpus:
            continue
        node_config = t["node_config"]
        instance = node_config.get("InstanceType") or node_config.get("machineType")
        model = INSTANCES.get(instance, (f"unknown machine {instance}",))[0]
        max_workers = t.get("max_workers", config["max_workers"])
        out.append(NodeType(path.name, name, model, gpus, t["resources"]["CPU"], max_workers))
    return out


@pytest.mark.parametrize("path", AUTOSCALER_FILES, ids=_ids(AUTOSCALER_FILES))
def test_declared_resources_match_the_machines(path):
    """What a node type declares is what its machine has (the autoscaler trusts the YAML)."""
    for name, t in _load_yaml(path)["available_node_types"].items():
        node_config = t["node_config"]
        instance = node_config.get("InstanceType") or node_config.get("machineType")
        if not t["resources"].get("GPU"):
            continue
        assert instance in INSTANCES, f"{path.name}:{name}: add {instance!r} to INSTANCES"
        _, n_gpus, vcpus, ram_gib = INSTANCES[instance]
        declared = t["resources"]
        assert declared["GPU"] == n_gpus, (
            f"{path.name}:{name}: {instance} has {n_gpus} GPUs, not {declared['GPU']}"
        )
        assert declared["CPU"] <= vcpus, f"{path.name}:{name}: {instance} has {vcpus} vCPUs"
        assert declared["memory"] <= ram_gib * 2**30, f"{path.name}:{name}: {instance} has {ram_gib} GiB"


def _kuberay_node_types(path: Path) -> list[NodeType]:
    out = []
    for doc in _docs(path):
        spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        for g in spec.get("workerGroupSpecs", []):
            pod = g["template"]["spec"]
            limits = pod["containers"][0]["resources"]["limits"]
            gpus = int(_quantity(limits.get("nvidia.com/gpu", 0)))
            if not gpus:
                continue
            product = pod.get("nodeSelector", {}).get("nvidia.com/gpu.product")
            # the GPU model is pinned with a nodeSelector (unknown ones fail in gpu_mem_gb)
            model = GPU_PRODUCTS.get(product, f"unknown GPU product {product}")
            cpus = float(g.get("rayStartParams", {}).get("num-cpus", _quantity(limits["cpu"])))
            replicas = g["maxReplicas"] * g.get("numOfHosts", 1)
            out.append(NodeType(path.name, g["groupName"], model, gpus, cpus, replicas))
    return out


def gpu_node_types() -> list[NodeType]:
    types = [t for p in KUBERAY_FILES for t in _kuberay_node_types(p)]
    types += [t for p in AUTOSCALER_FILES for t in _launcher_node_types(p)]
    return types


@dataclass(frozen=True)
class Request:
    pool: str
    cpus: float
    gpus: float  # a whole number of free GPUs, or a fraction < 1 of one GPU
    mem_gb: float  # GPU memory this actor uses on each of its GPUs


@dataclass
class Node:
    gpus: list[float]  # free capacity per GPU
    gpu_mem: list[float]  # free memory per GPU, GB
    cpus: float
    placed: list[str] = field(default_factory=list)

    def try_place(self, r: Request) -> bool:
        """Ray's rule: by GPU fraction only. Memory is tracked, not consulted (Ray cannot)."""
        if r.cpus > self.cpus + 1e-9:
            return False
        if r.gpus >= 1:
            free = [i for i, g in enumerate(self.gpus) if g >= 1 - 1e-9]
            if len(free) < r.gpus:
                return False
            chosen = free[: int(r.gpus)]
        elif r.gpus > 0:  # best fit
            fits = [i for i, g in enumerate(self.gpus) if g >= r.gpus - 1e-9]
            if not fits:
                return False
            chosen = [min(fits, key=lambda i: self.gpus[i] - r.gpus)]
        else:
            chosen = []
        for i in chosen:
            self.gpus[i] -= 1.0 if r.gpus >= 1 else r.gpus
            self.gpu_mem[i] -= r.mem_gb
        self.cpus -= r.cpus
        self.placed.append(r.pool)
        return True


def place(requests: list[Request], node: NodeType) -> list[Node]:
    """First-fit over nodes, adding one when nothing fits (what the autoscaler does)."""
    nodes: list[Node] = []
    for r in requests:
        assert r.gpus < 1 or float(r.gpus).is_integer(), f"{r.pool}: Ray refuses fractional GPUs >= 1"
        assert r.gpus <= node.gpus and r.cpus <= node.cpus, f"{r.pool} can never fit one {node.name} node"
        if not any(n.try_place(r) for n in nodes):
            fresh = Node([1.0] * node.gpus, [node.gpu_mem_gb] * node.gpus, node.cpus)
            assert fresh.try_place(r), f"{r.pool} does not fit an empty {node.source}:{node.name}"
            nodes.append(fresh)
    return nodes


def engine_requests(cfg: JobConfig, node: NodeType, pool: str = "engine") -> list[Request]:
    s = cfg.sampling
    tp = s.tensor_parallel_size
    gpus = s.num_gpus_per_engine if tp == 1 else tp
    mem = s.gpu_memory_utilization * node.gpu_mem_gb + CUDA_CONTEXT_GB
    return [Request(pool, s.num_cpus_per_engine, gpus, mem)] * s.num_engines


def nli_requests(cfg: JobConfig) -> list[Request]:
    e = cfg.entailment
    mem = nli_gb(e.model, e.model_batch_size, cfg.sampling.max_tokens) if e.num_gpus else 0.0
    # an autoscaling pool must fit at its largest
    return [Request("nli", e.num_cpus, e.num_gpus, mem)] * (e.max_actors or e.num_actors)


def judge_engine(cfg: JobConfig):
    """The correctness judge's engine exactly as se-ray derives it (None: it shares the generation engine)."""
    from se_ray.engine import Engines, engine_digest

    engines = Engines(cfg)
    judge = engines.correctness_judge_cfg()
    return None if engine_digest(judge) == engine_digest(engines.generation_cfg) else judge


def judge_tp(cfg: JobConfig, node: NodeType) -> int:
    """The judge engine's tensor parallelism as the code starts it; it must fit the node's GPUs."""
    judge = judge_engine(cfg)
    needed = judge_tp_needed(judge.model, node.gpu_mem_gb, judge.max_model_len)
    assert judge.tensor_parallel_size >= needed, (
        f"{judge.model} on {node.name}: tensor parallelism {judge.tensor_parallel_size} < {needed} needed"
    )
    return judge.tensor_parallel_size


def stage_requests(cfg: JobConfig, node: NodeType) -> dict[str, list[Request]]:
    stages = {"sample+entailment": engine_requests(cfg, node) + nli_requests(cfg)}
    t = cfg.train
    if t.use_gpu:
        stages["train"] = [Request("train", t.cpus_per_worker, 1, train_gb(cfg))] * t.num_workers
    if cfg.eval.judge == "llm":
        stages["evaluate"] = engine_requests(cfg, node)
        if judge_engine(cfg) is not None:
            tp = judge_tp(cfg, node)
            stages["evaluate"].append(
                Request("judge", cfg.sampling.num_cpus_per_engine, tp, 0.9 * node.gpu_mem_gb)
            )
    return stages


def _uses_gpus(cfg: JobConfig) -> bool:
    return bool(cfg.sampling.num_gpus_per_engine or cfg.entailment.num_gpus or cfg.train.use_gpu)


# Which node types each GPU job config is meant for, and what must hold on them.
# single_node: stages that must fit one node (NVLink for NCCL; no idle second node).
PLANS = {
    "paper.yaml": {
        "min_gpus_per_node": 8,
        "stages": ("sample+entailment", "train", "evaluate"),
        "single_node": ("sample+entailment", "train"),
    },
    "label_gpu.yaml": {"min_gpus_per_node": 1, "stages": ("sample+entailment",), "single_node": ()},
}


def test_every_gpu_config_has_a_plan():
    for path in JOB_CONFIGS:
        if _uses_gpus(load_config(path)):
            assert path.name in PLANS, f"{path.name} asks for GPUs: add its node plan to PLANS"
    assert gpu_node_types(), "no GPU node type declared in cluster/"


def _plan_cases() -> list[tuple[str, str, str]]:
    try:
        types = gpu_node_types()
    except Exception as e:  # a broken file fails the tests, not the collection
        return [(f"unreadable cluster files: {e!r}"[:200], "", "")]
    return [
        (name, node.source, node.name)
        for name, plan in PLANS.items()
        for node in types
        if node.gpus >= plan["min_gpus_per_node"]
    ]


def _node(source: str, name: str) -> NodeType:
    (node,) = [n for n in gpu_node_types() if (n.source, n.name) == (source, name)]
    return node


@pytest.mark.parametrize("config_name, source, node_name", _plan_cases())
def test_stages_pack_onto_declared_gpu_nodes(config_name, source, node_name):
    cfg, node, plan = (
        load_config(REPO / "jobs" / "configs" / config_name),
        _node(source, node_name),
        PLANS[config_name],
    )
    stages = stage_requests(cfg, node)
    for stage in plan["stages"]:
        nodes = place(stages[stage], node)
        assert len(nodes) <= node.max_workers, (
            f"{config_name} {stage} needs {len(nodes)} x {node.name}, {source} allows {node.max_workers}"
        )
        if stage in plan["single_node"]:
            assert len(nodes) == 1, f"{config_name} {stage} spills onto {len(nodes)} {node.name} nodes"
        gpus = sum(r.gpus for r in stages[stage])
        assert gpus <= node.max_workers * node.gpus


@pytest.mark.parametrize("config_name, source, node_name", _plan_cases())
def test_gpu_memory_fits(config_name, source, node_name):
    cfg, node = load_config(REPO / "jobs" / "configs" / config_name), _node(source, node_name)
    s, mem = cfg.sampling, node.gpu_mem_gb
    tokens = s.max_model_len * (s.num_samples + 1)  # one question's samples at full length
    assert vllm_fits(s.model, mem, s.gpu_memory_utilization, s.tensor_parallel_size, tokens), (
        f"{s.model} on {node.gpu_model}: {vllm_kv_gb(s.model, mem, s.gpu_memory_utilization, 1):.1f} GB KV"
    )
    # Ray places by GPU fraction alone: whatever lands beside an engine must fit in the memory
    # vLLM leaves (1 - gpu_memory_utilization, minus the engine's CUDA context).
    stages = stage_requests(cfg, node)
    for stage in PLANS[config_name]["stages"]:
        for n in place(stages[stage], node):
            assert min(n.gpu_mem) >= 0, (
                f"{config_name} {stage} on {node.gpu_model}: GPU memory oversubscribed, GB left per GPU: "
                f"{[round(m, 1) for m in n.gpu_mem]}"
            )
    if "train" in PLANS[config_name]["stages"]:
        assert train_gb(cfg) <= 0.95 * mem, f"training needs {train_gb(cfg):.1f} GB on {node.gpu_model}"
    if "evaluate" in PLANS[config_name]["stages"] and judge_engine(cfg) is not None:
        assert judge_tp(cfg, node) <= node.gpus, f"the judge does not fit one {node.name} node"


def test_memory_model_numbers():
    """The figures the plans rest on (documented so a reader can redo them by hand)."""
    assert weights_gb("meta-llama/Meta-Llama-3-8B-Instruct") == pytest.approx(16.06)
    assert weights_gb("meta-llama/Meta-Llama-3-70B-Instruct") == pytest.approx(141.1)
    assert kv_bytes_per_token("meta-llama/Meta-Llama-3-8B-Instruct") == 128 * 1024  # 128 KiB per token
    # An 8B engine fits one 80 GB GPU at 70%: ~38 GB of KV cache, ~290k tokens
    assert vllm_kv_gb("meta-llama/Meta-Llama-3-8B-Instruct", 80, 0.7, 1) == pytest.approx(37.9, abs=0.1)
    # The 70B judge: the weights alone need TP >= 2 on 80 GB GPUs, >= 4 on 40 GB ones;
    # with vLLM's activation reserve at 90% utilization, TP 4 on H100 80GB, TP 8 on A100 40GB.
    judge = "meta-llama/Meta-Llama-3-70B-Instruct"
    assert tp_lower_bound(judge, 80) == 2 and tp_lower_bound(judge, 40) == 4
    assert judge_tp_needed(judge, 80, 1024) == 4 and judge_tp_needed(judge, 40, 1024) == 8
    assert judge_tp_needed(judge, 24, 1024) == 8  # never on single-L4 nodes
    # DeBERTa-v2-xlarge NLI at batch 64 of 328-token pairs: ~8 GB
    assert nli_gb("microsoft/deberta-v2-xlarge-mnli", 64, 100) == pytest.approx(8.0, abs=1.0)
    # LoRA r=8 on q_proj and v_proj of Llama-3-8B: 3.4M trainable parameters
    assert lora_params("meta-llama/Meta-Llama-3-8B-Instruct", 8, ["q_proj", "v_proj"]) == 3_407_872
    # A ZeRO-2 LoRA worker, micro batch 6 x 256 tokens: 16 GB weights + ~9 GB activations + logits
    assert train_gb(load_config(PAPER)) == pytest.approx(27.5, abs=0.5)


def test_the_70b_judge_option_needs_its_tensor_parallelism():
    """paper.yaml's documented 70B judge: with its TP it packs on an 8 x 80 GB node; at TP 1
    (the key unset, sampling's TP) the code's own engine would not fit, and the plan says so."""
    big = "eval.judge_model=meta-llama/Meta-Llama-3-70B-Instruct"
    node = next(n for n in gpu_node_types() if n.gpus == 8 and n.gpu_mem_gb >= 80)
    cfg = load_config(PAPER, [big, "eval.judge_tensor_parallel_size=4"])
    assert judge_engine(cfg).tensor_parallel_size == 4 and judge_tp(cfg, node) == 4
    assert len(place(stage_requests(cfg, node)["evaluate"], node)) >= 1
    with pytest.raises(AssertionError, match="tensor parallelism 1 < 4"):
        judge_tp(load_config(PAPER, [big, "eval.judge_tensor_parallel_size=null"]), node)


def test_packing_model_is_not_vacuous():
    """The layouts the paper config avoids do fail the same checks."""
    h100 = NodeType("test", "h100x8", "H100-80GB", 8, 64, 4)
    l4 = NodeType("test", "l4x1", "L4", 1, 8, 8)
    cfg = load_config(PAPER)
    # 8 engines x 1 GPU leave no room for the 0.25-GPU NLI actors: a second 8-GPU node.
    whole = cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"num_gpus_per_engine": 1})})
    assert len(place(stage_requests(whole, h100)["sample+entailment"], h100)) == 2
    # Best fit piles NLI actors started first onto the same GPUs: engines then spill over.
    stage = stage_requests(cfg, h100)["sample+entailment"]
    nli_first = sorted(stage, key=lambda r: r.pool != "nli")
    assert len(place(stage, h100)) == 1 and len(place(nli_first, h100)) == 2
    # At vLLM's default 90% utilization an engine leaves 7 GB: too little for a DeBERTa actor.
    greedy = cfg.model_copy(
        update={"sampling": cfg.sampling.model_copy(update={"gpu_memory_utilization": 0.9})}
    )
    (n,) = place(stage_requests(greedy, h100)["sample+entailment"], h100)
    assert min(n.gpu_mem) < 0
    # The paper's engines at 70% of a 24 GB L4 leave no KV cache.
    assert not vllm_fits(cfg.sampling.model, l4.gpu_mem_gb, cfg.sampling.gpu_memory_utilization, 1, 11 * 1024)
    # Fractional GPU requests above 1 are refused, as Ray refuses them.
    with pytest.raises(AssertionError, match="fractional"):
        place([Request("x", 1, 1.5, 0)], h100)

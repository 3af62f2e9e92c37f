"""The job config: one pydantic model per component, composed into ``JobConfig``.

Loaded once at the entry point from YAML plus dotted ``key=value`` overrides; each
stage receives only its own section. Unknown keys are errors. Importing this module
loads no torch, vllm, deepspeed or ray.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, StringConstraints, ValidationError, model_validator

from se_ray.config_base import OPERATIONAL, ConfigError, results_key
from se_ray.config_base import Section as _Section
from se_ray.config_eval import EvalConfig
from se_ray.config_train import PAPER_TAU_GRID, SweepConfig, TrainConfig

__all__ = [
    "ABSTENTION_TEXT",
    "PAPER_TAU_GRID",
    "ConfigError",
    "JobConfig",
    "SweepConfig",
    "TrainConfig",
    "load_config",
    "parse_override",
    "results_key",
    "validate_config",
]

ABSTENTION_TEXT = "I don't know the answer."


class RayConfig(_Section):
    address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'ray://...'); None starts a local one."
    )
    num_cpus: int | None = Field(2, ge=1, description="CPUs of the local cluster (ignored when joining).")
    namespace: str = Field("se-ray", description="Namespace of named actors (shared engines).")
    shared_engines: bool = Field(
        False,
        description="false: the job's engines live in a namespace of its own and stop with it; true: "
        "engines are detached actors in `namespace`, named by their settings, reused by every job "
        "with the same engine settings and left running (start and stop them with `se-ray engines`).",
    )


class StorageConfig(_Section):
    s3_endpoint_override: str | None = Field(
        None, description="S3-compatible endpoint (e.g. http://host:port)."
    )
    s3_region: str | None = None
    s3_scheme: str | None = Field(None, description="'http' for a local S3 server.")
    lease_stale_s: float = Field(
        120.0,
        gt=0,
        description="A run's lease on its output without a heartbeat for this long may be taken over "
        "(--force takes a live one).",
        json_schema_extra=OPERATIONAL,
    )
    s3_lease_without_boto3: bool = Field(
        False,
        description="Without boto3 an S3 output's lease is refused; true accepts one that is written and "
        "read back (two runs racing to start may both write).",
        json_schema_extra=OPERATIONAL,
    )


class DataConfig(_Section):
    format: Literal["auto", "jsonl", "parquet", "hf", "nq_open", "svamp"] = Field(
        "auto", description="Input format; auto picks by file name/extension."
    )
    limit: int | None = Field(None, ge=1, description="Keep the first N valid questions.")
    hf_split: str = Field("validation", description="Split of a Hugging Face dataset input.")
    question_field: str = "question"
    id_field: str = "id"
    references_field: str = "references"
    context_field: str = "context"


class EngineConfig(_Section):
    """What makes a vLLM engine what it is: a running engine with an equal EngineConfig is reused."""

    model: str = Field("builtin:smollm2-135m-instruct", description="Folder, hub id or builtin:<name>.")
    seed: int = 0
    num_gpus_per_engine: float = Field(0.0, ge=0, json_schema_extra=OPERATIONAL)
    tensor_parallel_size: int = Field(1, ge=1, json_schema_extra=OPERATIONAL)
    dtype: str = Field("auto", description="auto: bf16 on GPU and on CPUs with bf16 units, else float32.")
    enforce_eager: bool = Field(
        True,
        description="Skip torch.compile: on CPU it costs minutes per engine start (its cache does "
        "not reload in vLLM 0.32); set false on GPU clusters for CUDA graphs.",
    )
    max_model_len: int = Field(1024, ge=16)
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="GPU only; CPU uses kv_cache_space_gb.", json_schema_extra=OPERATIONAL
    )
    kv_cache_space_gb: float = Field(
        2.0, gt=0, description="vLLM CPU KV cache (VLLM_CPU_KVCACHE_SPACE).", json_schema_extra=OPERATIONAL
    )
    enable_lora: bool = False
    max_lora_rank: int = Field(8, ge=1)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vllm.LLM arguments.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment of the engine actors.", json_schema_extra=OPERATIONAL
    )
    cpu_reserved_cores: int | None = Field(
        None,
        ge=0,
        description="vLLM's CPU build: cores of the engine's node kept off its OpenMP threads "
        "(VLLM_CPU_NUM_OF_RESERVED_CPU; the engine binds one thread to each other core). None: the "
        "Ray CPUs the job's entailment actors ask for when their judge runs a model on CPU, rounded "
        "up, else 0 (the residual and LLM judges need no core of their own). GPU engines ignore it.",
        json_schema_extra=OPERATIONAL,
    )


class SamplingConfig(EngineConfig):
    """The engine (inherited fields), its pool, and the per-request sampling settings."""

    num_samples: int = Field(10, ge=1, description="M high-temperature answers per question.")
    temperature: float = Field(1.0, gt=0)
    standard_temperature: float = Field(0.1, gt=0, description="Temperature of the standard answer.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="-1 disables top-k.")
    max_tokens: int = Field(32, ge=1)
    answer_style: Literal["short", "sentence"] = "short"
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    batch_size: int = Field(64, ge=1, description="Questions per engine call.", json_schema_extra=OPERATIONAL)
    num_engines: int = Field(
        1, ge=1, description="vLLM engine actors (one per GPU or TP group).", json_schema_extra=OPERATIONAL
    )
    num_cpus_per_engine: float = Field(1.0, ge=0, json_schema_extra=OPERATIONAL)
    accelerator_type: str | None = Field(
        None,
        description="Ray accelerator type the engines (and the LLM judge engines derived from them) "
        "need, e.g. H100, A100, L4 (Ray gives each GPU node the resource accelerator_type:<type>); "
        "passed to Ray as accelerator_type=. None: any node with the GPUs asked for.",
        json_schema_extra=OPERATIONAL,
    )
    request_timeout_s: float | None = Field(
        600.0,
        gt=0,
        description="An engine call that has run longer, counted by the engine from when it began "
        "working on it (not while queued or starting), is taken for a hung engine: the engine is "
        "restarted and the call retried (None: wait for ever).",
        json_schema_extra=OPERATIONAL,
    )
    engine_start_timeout_s: float | None = Field(
        1800.0,
        gt=0,
        description="An engine that has not started (model download, load, warm-up) within this long "
        "of being asked for fails the job (None: wait for ever); start-up never counts as a hung call.",
        json_schema_extra=OPERATIONAL,
    )
    engine_retries: int = Field(
        2,
        ge=0,
        description="Restarts of a dead or hung engine per call before the job fails.",
        json_schema_extra=OPERATIONAL,
    )
    early_stop: bool = Field(False, description="Sample in rounds; stop once the label at tau is fixed.")
    early_stop_round: int = Field(4, ge=1, description="Samples per round with early_stop.")

    @property
    def engine(self) -> EngineConfig:
        return EngineConfig.model_validate(self.model_dump(include=set(EngineConfig.model_fields)))


class EntailmentConfig(_Section):
    judge: Literal["residual", "embedding", "nli", "llm"] = Field(
        "residual",
        description="residual: model-free, compares what each answer adds beyond the question "
        "(names, numbers, dates); embedding: cosine of MiniLM embeddings; nli: an MNLI model; "
        "llm: the reference prompt through a vLLM engine.",
    )
    model: str = Field(
        "builtin:all-minilm-l6-v2",
        description="Embedding or NLI model; for judge=llm, None-like '' means the sampling model.",
    )
    similarity_threshold: float = Field(0.85, ge=-1, le=1, description="Embedding judge: cosine to entail.")
    condition_on_question: bool = True
    strict: bool = Field(True, description="Both directions must entail (the paper); lax otherwise.")
    batch_size: int = Field(16, ge=1, description="Questions per stage call.", json_schema_extra=OPERATIONAL)
    model_batch_size: int = Field(
        64, ge=1, description="Texts or pairs per model forward.", json_schema_extra=OPERATIONAL
    )
    num_actors: int = Field(
        1,
        ge=1,
        description="Entailment actors (the pool's minimum with max_actors).",
        json_schema_extra=OPERATIONAL,
    )
    max_actors: int | None = Field(
        None,
        ge=1,
        description="Autoscaling pool: Ray Data grows it from num_actors up to this when batches queue "
        "(a cluster autoscaler then adds the nodes its GPUs need); None keeps num_actors fixed.",
        json_schema_extra=OPERATIONAL,
    )
    num_cpus: float = Field(0.5, ge=0, json_schema_extra=OPERATIONAL)
    num_gpus: float = Field(0.0, ge=0, json_schema_extra=OPERATIONAL)
    accelerator_type: str | None = Field(
        None,
        description="Ray accelerator type of the entailment actors' nodes (e.g. H100), passed to "
        "map_batches as accelerator_type=; None: any node.",
        json_schema_extra=OPERATIONAL,
    )
    device: str = Field("auto", description="torch device for the NLI/embedding model.")
    llm_max_tokens: int = Field(30, ge=1)
    llm_temperature: float = Field(0.02, gt=0)


class LabelingConfig(_Section):
    method: Literal["semantic_entropy", "regular_semantic_entropy", "exact_entropy", "r_tuning"] = Field(
        "semantic_entropy", description="Which score decides abstention (r_tuning: the judge on references)."
    )
    tau: float = Field(1.0, ge=0, description="Abstain when the score is > tau.")
    abstention_text: str = Field(ABSTENTION_TEXT, min_length=1)
    write_batch_size: int = Field(16, ge=1, description="Rows per committed Parquet part.")


class SplitConfig(_Section):
    train: int = Field(48, ge=1)
    validation: int = Field(16, ge=1)
    test: int = Field(32, ge=0)
    seed: int = 0
    ood_input: str | None = Field(None, description="Out-of-distribution evaluation file (the split `ood`).")
    ood_inputs: dict[Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]+$")], str] = Field(
        default_factory=dict,
        description="More out-of-distribution sets, {name: file}: each is evaluated and reported as its "
        "own split `ood_<name>` (names: lowercase letters, digits, underscores).",
    )
    ood_limit: int | None = Field(None, ge=1, description="At most this many questions of each OOD set.")
    train_inputs: dict[Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]+$")], str] = Field(
        default_factory=dict,
        description="More training questions, {name: file}: every question of each file joins the "
        "training split (labelled like the rest), never validation, test or OOD; e.g. a second domain.",
    )

    @property
    def ood_splits(self) -> dict[str, str]:
        """Every OOD split's name and file: ``ood`` (``ood_input``), then ``ood_<name>`` in order."""
        named = {f"ood_{name}": path for name, path in self.ood_inputs.items()}
        return ({"ood": self.ood_input} if self.ood_input else {}) | named


class JobConfig(_Section):
    input: str | None = Field(None, description="Questions file or dataset (CLI --input overrides).")
    output: str | None = Field(None, description="Output folder or URI (CLI --output overrides).")
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    entailment: EntailmentConfig = Field(default_factory=EntailmentConfig)
    labeling: LabelingConfig = Field(default_factory=LabelingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if self.train.global_batch_size % (self.train.micro_batch_size * self.train.num_workers):
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                f"train.micro_batch_size*train.num_workers="
                f"{self.train.micro_batch_size * self.train.num_workers}"
            )
        e = self.entailment
        if e.max_actors is not None and e.max_actors < e.num_actors:
            raise ValueError(
                f"entailment.max_actors={e.max_actors} is below entailment.num_actors={e.num_actors}"
            )
        if self.sampling.early_stop and self.labeling.method != "semantic_entropy":
            raise ValueError("sampling.early_stop=true needs labeling.method=semantic_entropy")
        if self.sampling.cpu_reserved_cores is None:
            self.sampling.cpu_reserved_cores = cores_for_entailment(e)
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def cores_for_entailment(e: EntailmentConfig) -> int:
    """Whole cores a CPU engine leaves to the entailment actors beside it: their Ray CPUs, rounded
    up, where the judge runs a model on CPU (embedding, nli); none for the model-free residual
    judge or the LLM judge (which asks the engines themselves)."""
    if e.judge not in ("embedding", "nli") or e.num_gpus > 0:
        return 0
    return math.ceil(e.num_cpus * (e.max_actors or e.num_actors))


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    if not first["loc"]:  # a cross-field rule: its message names the keys
        return "config: " + first["msg"].removeprefix("Value error, ")
    key = ".".join(str(p) for p in first["loc"])
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        return f"config key {key}: unknown key"
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"config key {key}: {first['msg']}{shown}"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """YAML file (or the built-in CPU quickstart defaults) plus dotted overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return validate_config(tree)


def validate_config(tree: dict[str, Any]) -> JobConfig:
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None

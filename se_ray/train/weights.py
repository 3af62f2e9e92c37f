"""A worker's model: loaded (sharded under ZeRO-3), its trained weights gathered on rank 0 and written
as safetensors, and the selected steps' weights in storage."""

from __future__ import annotations

import posixpath
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from se_ray.config import JobConfig, TrainConfig
from se_ray.train.checkpoint import FULL_WEIGHTS_FILE, SELECTED_DIR, selected_dir


@dataclass(frozen=True)
class LoadedModel:
    """A worker's model before DeepSpeed takes it, with what the run needs to know about it."""

    model: Any
    tokenizer: Any
    base_dtype: Any  # the base folder's dtype: full fine-tuning exports in it
    zero3_loading: Any  # HfDeepSpeedConfig under ZeRO-3 (hold it until deepspeed.initialize), or None


def load_train_model(job: JobConfig, ds_config: dict[str, Any]) -> LoadedModel:
    """The base model (fp32 on CPU, bf16 on GPU), wrapped with LoRA or whole; under ZeRO-3 loaded
    straight into each rank's partitions (``zero3_loading_config``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from se_ray.models import resolve_model
    from se_ray.train.plan import lora_config

    cfg = job.train
    model_path = resolve_model(job.sampling.model, job.storage)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base_dtype = config_dtype(AutoConfig.from_pretrained(model_path))
    zero3_loading = zero3_loading_config(ds_config)  # before from_pretrained
    if zero3_loading is not None:
        import deepspeed

        deepspeed.init_distributed()  # zero.Init sizes partitions by DeepSpeed's world (Ray's group)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.bfloat16 if cfg.use_gpu else torch.float32
    )
    model.config.use_cache = False
    if cfg.method == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg))
    return LoadedModel(model, tokenizer, base_dtype, zero3_loading)


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and norms (the 1-D parameters). A parameter that
    ZeRO-3 loading has already partitioned is judged by its full shape (``ds_shape``); an empty
    group is left out (DeepSpeed drops it, and the LR scheduler must see the same groups)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def gather_trainable(engine: Any, zero_stage: int, rank: int, dtype: Any = None) -> dict[str, Any] | None:
    """The trainable weights, whole, on rank 0, in ``dtype`` if given (a collective: every rank calls it).

    One parameter at a time, so that ZeRO-3 never holds more than one gathered weight.
    """
    import deepspeed

    state: dict[str, Any] = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        gather = (
            deepspeed.zero.GatheredParameters([p], modifier_rank=None) if zero_stage == 3 else nullcontext()
        )
        with gather:
            if rank == 0:
                state[name] = p.detach().to("cpu", dtype=dtype or p.dtype, copy=True).contiguous()
    return state if rank == 0 else None


def write_export(engine: Any, cfg: TrainConfig, state: dict[str, Any], folder: Path) -> None:
    """Rank 0: the trained weights as safetensors (peft adapter, or the full weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.method == "lora":
        engine.module.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
    else:
        from safetensors.torch import save_file

        save_file(state, str(folder / FULL_WEIGHTS_FILE), {"format": "pt"})


def config_dtype(config: Any) -> Any:
    """The torch dtype a model folder's config declares (fp32 when it declares none)."""
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def publish_selected(
    engine: Any, cfg: TrainConfig, state: dict[str, Any], fs: Any, storage: str, step: int, keep: set[int]
) -> None:
    """Rank 0: a selected step's weights, written once to ``selected_dir(storage, step)``; then the
    selected steps' folders other than ``keep`` are deleted (``storage``: OUTPUT/ray_train)."""
    import shutil
    import tempfile

    from se_ray.train.export import assert_no_pickles, publish

    tmp = Path(tempfile.mkdtemp(prefix="se-ray-selected-"))
    try:
        write_export(engine, cfg, state, tmp / "export")
        assert_no_pickles(tmp / "export")
        publish(tmp / "export", fs, selected_dir(storage, step))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prune_selected(fs, posixpath.join(storage, SELECTED_DIR), keep)


def prune_selected(fs: Any, root: str, keep: set[int]) -> None:
    """Delete the selected steps' folders under ``root`` (``OUTPUT/ray_train/selected``) but ``keep``."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    for info in infos:
        step = info.base_name.removeprefix("step")
        if info.type == pafs.FileType.Directory and step.isdigit() and int(step) not in keep:
            fs.delete_dir(info.path)


def restore_selected(
    engine: Any, cfg: TrainConfig, fs: Any, storage: str, step: int, legacy_file: Path
) -> None:
    """Rank 0 on resume: make sure a checkpoint's selected step has its weights in storage. A
    checkpoint of the older layout carries them inside (``selected.safetensors``): written out once."""
    from se_ray.storage import exists

    if exists(fs, selected_dir(storage, step)):
        return
    if not legacy_file.exists():
        raise RuntimeError(f"the weights of selected step {step} are missing: {selected_dir(storage, step)}")
    from safetensors.torch import load_file

    publish_selected(engine, cfg, load_file(str(legacy_file)), fs, storage, step, {step})


def zero3_loading_config(ds_config: dict[str, Any]) -> Any:
    """transformers' ``HfDeepSpeedConfig`` of a ZeRO-3 config; None for ZeRO-2.

    While it is alive (transformers keeps only a weak reference: hold it until
    ``deepspeed.initialize``), ``from_pretrained`` builds the model under ``deepspeed.zero.Init``
    and loads each weight straight into its partition, so no rank holds the whole model.
    """
    if ds_config["zero_optimization"]["stage"] != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)

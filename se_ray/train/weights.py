"""The trained weights of a DeepSpeed engine: gathered whole on rank 0, written as safetensors."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from se_ray.config import TrainConfig
from se_ray.train.checkpoint import FULL_WEIGHTS_FILE


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

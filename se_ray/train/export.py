"""What a finished run leaves in OUTPUT: ``adapter/`` (peft ``save_pretrained``, loadable by vLLM as
a ``LoRARequest``), ``merged/`` (safetensors, config and tokenizer in the base folder's dtype),
``metrics.jsonl``, ``train_config.yaml`` and ``loss.png``. No pickles are ever exported."""

from __future__ import annotations

import json
import posixpath
import shutil
from pathlib import Path
from typing import Any

from se_ray.config import JobConfig, TrainConfig
from se_ray.train.checkpoint import FULL_WEIGHTS_FILE

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def export_models(
    cfg: JobConfig, trained: Path, tmp: Path, fs: Any, out_path: str, output: str
) -> dict[str, str | None]:
    """Publish the adapter (LoRA runs) and the merged model (``export_merged``); their OUTPUT paths."""
    from se_ray.models import resolve_model

    tcfg = cfg.train
    paths: dict[str, str | None] = {"adapter": None, "merged": None}
    if tcfg.method == "lora":
        adapter = tmp / "adapter"
        shutil.copytree(trained, adapter)
        assert_no_pickles(adapter)
        paths["adapter"] = posixpath.join(output, "adapter")
        publish(adapter, fs, posixpath.join(out_path, "adapter"))
    if tcfg.export_merged:
        merged = tmp / "merged"
        export_merged(tcfg, resolve_model(cfg.sampling.model), trained, merged)
        assert_no_pickles(merged)
        paths["merged"] = posixpath.join(output, "merged")
        publish(merged, fs, posixpath.join(out_path, "merged"))
    return paths


def export_merged(cfg: TrainConfig, model_path: str, trained: Path, out: Path) -> None:
    """The base model with the trained weights merged in, saved in the base folder's dtype.

    The weights are merged in fp32 and cast back only at the end, so the update is added at full
    precision.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    dtype = next(model.parameters()).dtype
    model = model.float()
    if cfg.method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(trained)).merge_and_unload()
    else:
        _load_full_weights(model, trained / FULL_WEIGHTS_FILE)
    model = model.to(dtype)
    model.config.use_cache = True
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(model_path).save_pretrained(str(out))


def _load_full_weights(model: Any, weights_file: Path) -> None:
    """Copy a full fine-tuning export into ``model``, refusing weights that do not fit it."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(weights_file))
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(weights))
    unknown = sorted(set(weights) - set(params))
    if missing or unknown:
        raise RuntimeError(
            f"trained weights do not fit the base model: missing {missing[:3]}, unknown {unknown[:3]}"
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(torch.float32))


def assert_no_pickles(folder: Path) -> None:
    """Refuse an export holding pickle files: loading one can run arbitrary code."""
    bad = [p.name for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if bad:
        raise RuntimeError(f"export {folder} holds pickle files {bad}: only safetensors may be exported")


def publish(local: Path, fs: Any, dest: str) -> None:
    """Move a finished local folder to ``dest`` (replacing it): rename on disk, copy to a URI."""
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        target = Path(dest)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(local), str(target))
    else:
        fs.delete_dir_contents(dest, missing_dir_ok=True)
        pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    """The training loss per optimizer step, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (target tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)


def write_run_files(
    cfg: JobConfig, history: list[dict[str, Any]], summary: dict[str, Any], tmp: Path, fs: Any, out_path: str
) -> None:
    """``metrics.jsonl`` (every step, then the summary), ``train_config.yaml`` and ``loss.png``."""
    from se_ray.storage import write_text_atomic

    lines = [json.dumps(h, sort_keys=True) for h in history] + [json.dumps(summary, sort_keys=True)]
    write_text_atomic(fs, posixpath.join(out_path, "metrics.jsonl"), "\n".join(lines) + "\n")
    write_text_atomic(fs, posixpath.join(out_path, "train_config.yaml"), cfg.to_yaml())
    if history:
        png = tmp / "loss.png"
        plot_loss(history, png)
        with fs.open_output_stream(posixpath.join(out_path, "loss.png")) as f:
            f.write(png.read_bytes())

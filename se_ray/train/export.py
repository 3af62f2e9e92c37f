"""What a finished run leaves in OUTPUT: ``adapter/`` (peft ``save_pretrained``, loadable by vLLM as
a ``LoRARequest``), ``merged/`` (safetensors, config and tokenizer in the base folder's dtype),
``metrics.jsonl``, ``train_config.yaml`` and ``loss.png``. No pickles are ever exported.

``merged/`` is written by one Ray task with a training worker's resources (its CPUs, its GPU and
accelerator type), never by the driver: on a cluster the driver may sit on a CPU head that cannot
hold the base model. The task loads the base in its own dtype on its device and adds the trained
weights in (LoRA: the fp32 update is added with one rounding to the base dtype).
"""

from __future__ import annotations

import json
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any

from se_ray.config import JobConfig, TrainConfig
from se_ray.train.checkpoint import FULL_WEIGHTS_FILE

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"


def export_models(cfg: JobConfig, trained: str, tmp: Path, output: str) -> dict[str, str | None]:
    """Publish the adapter (LoRA runs) and the merged model (``export_merged``); their OUTPUT paths.

    ``trained``: the folder holding the trained weights, relative to ``output``.
    """
    from se_ray.storage import filesystem

    tcfg = cfg.train
    fs, out_path = filesystem(output, cfg.storage)
    paths: dict[str, str | None] = {"adapter": None, "merged": None}
    if tcfg.method == "lora":
        adapter = tmp / ADAPTER_DIR
        download(fs, posixpath.join(out_path, trained), adapter)
        assert_no_pickles(adapter)
        publish(adapter, fs, posixpath.join(out_path, ADAPTER_DIR))
        paths["adapter"] = posixpath.join(output, ADAPTER_DIR)
        trained = ADAPTER_DIR
    if tcfg.export_merged:
        merge_on_training_resources(cfg, output, trained, MERGED_DIR)
        paths["merged"] = posixpath.join(output, MERGED_DIR)
    return paths


def training_task_options(cfg: TrainConfig) -> dict[str, Any]:
    """Ray options of a task that needs what one training worker has (CPUs, GPU, accelerator type)."""
    options: dict[str, Any] = {"num_cpus": cfg.cpus_per_worker, "num_gpus": 1 if cfg.use_gpu else 0}
    if cfg.accelerator_type:
        options["accelerator_type"] = cfg.accelerator_type
    return options


def merge_on_training_resources(cfg: JobConfig, output: str, trained: str, dest: str) -> None:
    """Write ``output/dest`` (the merged model) from the weights in ``output/trained``, in a Ray task
    with a training worker's resources; returns when it is published."""
    import ray

    from se_ray.lease import held_claims
    from se_ray.runtime import ensure_ray

    ensure_ray(cfg.ray)
    task = ray.remote(_merge_task).options(**training_task_options(cfg.train), max_retries=0)
    ray.get(task.remote(cfg.model_dump(mode="json"), output, trained, dest, held_claims()))


def _merge_task(job: dict[str, Any], output: str, trained: str, dest: str, leases: list[Any]) -> None:
    """Its publish checks the driver's ``leases`` first, as the driver's own commits do."""
    import torch

    from se_ray.lease import adopted
    from se_ray.models import resolve_model
    from se_ray.storage import filesystem

    cfg = JobConfig.model_validate(job)
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    fs, out_path = filesystem(output, cfg.storage)
    with tempfile.TemporaryDirectory(prefix="se-ray-merge-") as tmp_name:
        tmp = Path(tmp_name)
        download(fs, posixpath.join(out_path, trained), tmp / "trained")
        base = resolve_model(cfg.sampling.model, cfg.storage)
        export_merged(cfg.train, base, tmp / "trained", tmp / MERGED_DIR)
        assert_no_pickles(tmp / MERGED_DIR)
        with adopted(leases):
            publish(tmp / MERGED_DIR, fs, posixpath.join(out_path, dest))


def export_merged(cfg: TrainConfig, model_path: str, trained: Path, out: Path) -> None:
    """The base model with the trained weights merged in, saved in the base folder's dtype.

    The base is loaded in its own dtype on the training device (bf16 on GPU where it is bf16).
    LoRA: peft keeps the adapter in fp32 (``autocast_adapter_dtype``), so each weight's update is
    computed in fp32 and rounded once into the base dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if cfg.use_gpu else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto", device_map={"": device})
    if cfg.method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(trained)).merge_and_unload()
    else:
        _load_full_weights(model, trained / FULL_WEIGHTS_FILE)
    model.config.use_cache = True
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(model_path).save_pretrained(str(out))


def download(fs: Any, src: str, local: Path) -> None:
    """Copy a folder from storage into a local one (created)."""
    import pyarrow.fs as pafs

    local.mkdir(parents=True, exist_ok=True)  # copy_files creates the subfolders, not the root
    pafs.copy_files(src, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


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
            params[name].copy_(value.to(params[name].dtype))


def assert_no_pickles(folder: Path) -> None:
    """Refuse an export holding pickle files: loading one can run arbitrary code."""
    bad = [p.name for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if bad:
        raise RuntimeError(f"export {folder} holds pickle files {bad}: only safetensors may be exported")


def publish(local: Path, fs: Any, dest: str) -> None:
    """Move a finished local folder to ``dest`` (replacing it): rename on disk, copy to a URI."""
    import pyarrow.fs as pafs

    from se_ray.storage import before_commit

    before_commit()
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

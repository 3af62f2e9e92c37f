"""Stage 5 end to end: Ray Train + DeepSpeed ZeRO on 2 CPU workers of the shared test cluster.

Each test makes a tiny labels Parquet folder by hand and runs the real ``train_job``. Sizes
are kept tiny (the file should run in a few minutes on 2 cores):

* LoRA, ZeRO-2: learns to abstain. Trained on a handful of NQ questions all labeled with
  the abstention text, the exported merged model, loaded by vLLM (CPU build, greedy, the
  sampling prompt), answers "I don't know ..." where the base model answered something else.
* LoRA, ZeRO-3: the driver is SIGKILLed after its first checkpoint, and ``resume=True``
  carries on from that checkpoint's step, then finishes and exports the step that
  ``train.select_checkpoint: label_rate`` selected over both attempts' probes.
* full fine-tuning, ZeRO-3: exports a merged model in the base dtype.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from se_ray.config import ABSTENTION_TEXT, load_config
from tests.conftest import greedy_one_prompt_at_a_time

pytestmark = pytest.mark.slow

BASE_MODEL = "builtin:smollm2-135m-instruct"
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _questions(nq_dev: Path, n: int, skip: int = 0) -> list[str]:
    with nq_dev.open() as f:
        rows = [json.loads(line) for _, line in zip(range(skip + n), f, strict=False)]
    return [r["question"] for r in rows[skip:]]


def _write_labels(folder: Path, questions: list[str], targets: list[str]) -> Path:
    """A labels folder as the label stage commits it, plus temporary parts that must be skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = folder / "labels"
    labels.mkdir(parents=True)
    n = len(questions)
    table = pa.table(
        {
            "id": [f"q{i}" for i in range(n)],
            "question": questions,
            "context": pa.array([None] * n, pa.string()),
            "target": targets,
            "abstain": [t == ABSTENTION_TEXT for t in targets],
        }
    )
    pq.write_table(table, labels / "part-00000.parquet")
    (labels / "_part-00001.parquet").write_text("a part still being written")
    (labels / ".part-00002.parquet.tmp").write_text("a part still being written")
    return labels


def _overrides(address: str, **train) -> list[str]:
    return [f"ray.address={address}", f"sampling.model={BASE_MODEL}"] + [
        f"train.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in train.items()
    ]


def _read_metrics(output: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert lines[-1].get("summary") is True
    return lines[:-1], lines[-1]


def _assert_no_pickles(*folders: Path) -> None:
    for folder in folders:
        bad = [p.name for p in folder.rglob("*") if p.suffix in PICKLES]
        assert not bad, f"{folder} holds pickles {bad}"


def _safetensors_dtypes(path: Path) -> set[str]:
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def _assert_common_outputs(output: Path, summary: dict, steps: list[dict], cfg) -> None:
    assert [s["step"] for s in steps] == list(range(1, summary["steps"] + 1))
    for s in steps:
        assert {"step", "epoch", "loss", "lr", "tokens_per_s"} <= set(s)
        assert s["tokens_per_s"] > 0 and s["lr"] > 0
    assert (output / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(output / "train_config.yaml").model_dump() == cfg.model_dump()


def _is_abstention(answer: str) -> bool:
    return answer.strip().strip("\"'").replace("\u2019", "'").lower().startswith("i don't know")


VLLM_SCRIPT = textwrap.dedent(
    """
    import json, sys

    if __name__ == "__main__":
        from vllm import LLM, SamplingParams

        job = json.loads(open(sys.argv[1]).read())
        llm = LLM(model=job["model"], max_model_len=512, seed=0, enforce_eager=True)
        prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]  # vllm TokensPrompt
        outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))
        print("RESULT " + json.dumps([o.outputs[0].text for o in outputs]), flush=True)
    """
)


def _vllm_greedy(tmp_path: Path, model: str, prompts: list[list[int]]) -> list[str]:
    script = tmp_path / "vllm_greedy.py"
    script.write_text(VLLM_SCRIPT)
    job = tmp_path / "vllm_job.json"
    job.write_text(json.dumps({"model": model, "prompts": prompts}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    env.pop("RAY_ADDRESS", None)  # vLLM's CPU engine runs on its own, not on the test cluster
    proc = subprocess.run(
        [sys.executable, str(script), str(job)], env=env, capture_output=True, text=True, timeout=480
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"vLLM failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def _hf_greedy(model_dir: str, prompts: list[list[int]]) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    texts = [tokenizer.decode(ids) for ids in prompts]
    return greedy_one_prompt_at_a_time(model, tokenizer, texts, max_new_tokens=16)


def test_lora_zero2_learns_to_abstain(tmp_path, ray_address, nq_dev):
    from transformers import AutoTokenizer

    from se_ray.models import resolve_model
    from se_ray.prompts import question_prompt_ids
    from se_ray.train import train_job

    questions = _questions(nq_dev, 4)
    _write_labels(tmp_path / "run", questions, [ABSTENTION_TEXT] * len(questions))
    cfg = load_config(
        None,
        _overrides(
            ray_address,
            zero_stage=2,
            method="lora",
            num_workers=2,
            global_batch_size=2,
            micro_batch_size=1,
            epochs=5,
            learning_rate=3e-3,
            warmup_ratio=0.1,
            max_length=128,
        ),
    )
    output = tmp_path / "out"
    summary = train_job(
        cfg, labels=str(tmp_path / "run"), output=str(output)
    )  # the run folder holding labels/

    adapter, merged = output / "adapter", output / "merged"
    assert summary["adapter"] == str(adapter) and summary["merged"] == str(merged)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in merged.iterdir()}
    _assert_no_pickles(adapter, merged)
    base = resolve_model(BASE_MODEL)
    assert _safetensors_dtypes(merged / "model.safetensors") == _safetensors_dtypes(
        Path(base) / "model.safetensors"
    )
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8

    steps, final = _read_metrics(output)
    assert summary["steps"] == final["steps"] == 10  # 4 rows / (1 row x 2 workers) x 5 epochs
    assert final["steps_run"] == 10 and final["start_step"] == 1 and final["resumed_from_step"] is None
    _assert_common_outputs(output, final, steps, cfg)
    assert max(s["lr"] for s in steps) == pytest.approx(3e-3)
    assert steps[-1]["lr"] < steps[1]["lr"]  # cosine decay after the warm-up step
    assert steps[-1]["loss"] < 0.1 < 1.0 < steps[0]["loss"]
    assert summary["tokens_per_s"] > 0
    print(f"\nLoRA ZeRO-2: {summary['tokens_per_s']:.0f} tokens/s, fit {summary['fit_s']:.0f} s")

    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = [question_prompt_ids(tokenizer, q, cfg.sampling.answer_style) for q in questions]
    base_answers = _hf_greedy(base, prompts)
    assert not any(_is_abstention(a) for a in base_answers), base_answers
    tuned_answers = _vllm_greedy(tmp_path, str(merged), prompts)
    assert all(_is_abstention(a) for a in tuned_answers), tuned_answers


def _cli_train(labels: Path, output: Path, overrides: list[str]) -> list[str]:
    """The `se-ray train` command line (the console script of this virtualenv)."""
    cli = Path(sys.executable).with_name("se-ray")
    sets = [arg for item in overrides for arg in ("--set", item)]
    return [str(cli), "train", "--labels", str(labels), "--output", str(output), *sets]


def _wait_for_free_cpus(cpus: float, timeout: float = 180) -> None:
    import ray

    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < cpus:
        assert time.monotonic() < deadline, f"CPUs not freed: {ray.available_resources()}"
        time.sleep(1)


def test_lora_zero3_kill_driver_and_resume(tmp_path, ray_address, nq_dev):
    from safetensors import safe_open

    from se_ray.storage import filesystem
    from se_ray.train import train_job
    from se_ray.train.checkpoint import RUN_NAME, restore_point
    from se_ray.train.selection import closest_step

    questions = _questions(nq_dev, 4, skip=4)
    targets = [ABSTENTION_TEXT if i % 2 else "Paris" for i in range(len(questions))]
    labels = _write_labels(tmp_path / "run", questions, targets)
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"question": q}) + "\n" for q in _questions(nq_dev, 3, skip=8)))
    overrides = _overrides(
        ray_address,
        select_checkpoint="label_rate",
        select_every_steps=1,
        select_questions=str(held_out),
        zero_stage=3,
        method="lora",
        num_workers=2,
        global_batch_size=2,
        micro_batch_size=1,
        epochs=2,
        learning_rate=1e-3,
        max_length=96,
        checkpoint_every_steps=1,
        num_to_keep=2,
    )
    output = tmp_path / "out"
    run_path = output / "ray_train" / RUN_NAME
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(  # the driver: `se-ray train` on the shared cluster
        _cli_train(labels, output, overrides),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "RAY_ADDRESS": ray_address},
    )
    fs, _ = filesystem(str(output))
    try:
        deadline = time.monotonic() + 420
        while not (restore_point(fs, str(run_path)) or 0) >= 1:  # a checkpoint is registered
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]  # still training
            assert time.monotonic() < deadline, "no checkpoint registered in time"
            time.sleep(0.5)
    finally:
        driver.send_signal(signal.SIGKILL)  # the driver dies; its job's actors die with it
        driver.wait()
        log.close()
    assert not (output / "metrics.jsonl").exists()  # the killed run never finished
    _wait_for_free_cpus(2)
    assert "probe at step 1: abstains on" in (tmp_path / "driver.log").read_text()

    total = 4  # 4 rows / (1 row x 2 workers) x 2 epochs
    restored = restore_point(fs, str(run_path))
    assert restored is not None and 1 <= restored < total, restored
    cfg = load_config(None, overrides)
    with pytest.raises(FileExistsError, match="resume"):
        train_job(cfg, labels=str(labels), output=str(output))  # a fresh run refuses to clobber it
    summary = train_job(cfg, labels=str(labels), output=str(output), resume=True)

    assert summary["steps"] == total
    assert summary["resumed_from_step"] == restored
    assert summary["start_step"] == restored + 1  # the resumed run starts at the checkpoint's step
    assert summary["steps_run"] == total - restored < total  # fewer steps than a fresh run
    steps, final = _read_metrics(output)
    _assert_common_outputs(output, final, steps, cfg)
    killed = [s for s in steps if s["attempt"] == 0]
    resumed = [s for s in steps if s["attempt"] == 1]
    assert [s["step"] for s in killed] == list(range(1, restored + 1))
    assert resumed[0]["step"] == restored + 1
    # ZeRO-3 partitions every weight: the export must hold the gathered, trained LoRA matrices
    with safe_open(str(output / "adapter" / "adapter_model.safetensors"), "pt") as adapter:
        names = adapter.keys()
        tensors = {k: adapter.get_tensor(k) for k in names}
    assert tensors and all(t.dim() == 2 and t.numel() > 0 for t in tensors.values())
    assert {tuple(t.shape) for k, t in tensors.items() if "lora_A" in k} == {(8, 576)}
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # B starts at 0
    assert (output / "merged" / "model.safetensors").exists()
    _assert_no_pickles(output / "adapter", output / "merged")
    # Every step was probed, before the kill and after; the export is the closest to the labels
    selection = summary["selection"]
    assert selection["target_rate"] == 0.5 and selection["questions"] == 3
    probes = [(s["step"], s["abstention_rate"]) for s in steps]
    assert [list(p) for p in probes] == selection["probes"]
    assert all(rate in (0.0, 1 / 3, 2 / 3, 1.0) for _, rate in probes)
    assert summary["selected_step"] == closest_step(probes, 0.5)
    assert selection["selected_rate"] == dict(probes)[summary["selected_step"]]
    print(f"\nLoRA ZeRO-3: resumed at step {restored + 1}, {summary['tokens_per_s']:.0f} tokens/s")


def test_full_finetuning_zero3_exports_merged(tmp_path, ray_address, nq_dev):
    from safetensors import safe_open

    from se_ray.models import resolve_model
    from se_ray.train import train_job

    questions = _questions(nq_dev, 4, skip=12)
    _write_labels(tmp_path / "run", questions, [ABSTENTION_TEXT] * len(questions))
    cfg = load_config(
        None,
        _overrides(
            ray_address,
            zero_stage=3,
            method="full",
            num_workers=2,
            global_batch_size=2,
            micro_batch_size=1,
            epochs=1,
            learning_rate=1e-5,
            max_length=96,
        ),
    )
    output = tmp_path / "out"
    summary = train_job(cfg, labels=str(tmp_path / "run" / "labels"), output=str(output))

    assert summary["adapter"] is None and not (output / "adapter").exists()
    merged = output / "merged"
    _assert_no_pickles(merged)
    steps, final = _read_metrics(output)
    assert final["steps"] == 2
    _assert_common_outputs(output, final, steps, cfg)
    base = Path(resolve_model(BASE_MODEL)) / "model.safetensors"
    assert _safetensors_dtypes(merged / "model.safetensors") == _safetensors_dtypes(base)
    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(str(merged / "model.safetensors"), "pt") as tuned, safe_open(str(base), "pt") as orig:
        assert set(tuned.keys()) == set(orig.keys())
        assert not tuned.get_tensor(name).equal(orig.get_tensor(name))  # every weight was trained

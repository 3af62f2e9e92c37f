"""What lets training scale to an 8B model: the probe decoded in chunks with last-position logits and
every EOS id, ZeRO-3 loading each rank's shard only, the merged model in the base dtype from a task
with a training worker's resources, selected weights written once, LoRA trials without merged/."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from se_ray.config import load_config
from se_ray.train.selection import eos_token_ids, probe_chunks, until_eos
from tests.conftest import greedy_one_prompt_at_a_time

MODEL = "builtin:smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of France?",
    "In which country is the city of Lyon?",
    "2+2?",
    "What is the capital of Japan?",
    "Which continent is Kenya on?",
]


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("total", [1, 5, 7, 40, 65])
@pytest.mark.parametrize("chunk", [1, 2, 32])
def test_every_rank_makes_the_same_calls_and_covers_its_slice(world, total, chunk):
    slices = [len(range(total)[rank::world]) for rank in range(world)]
    plans = [probe_chunks(mine, total, world, chunk) for mine in slices]
    assert len({len(p) for p in plans}) == 1  # lockstep: one generate call per chunk on every rank
    for mine, plan in zip(slices, plans, strict=True):
        assert [i for start, stop in plan for i in range(start, stop)] == list(range(mine))
        assert all(stop - start <= chunk for start, stop in plan)


def test_every_eos_id_counts():
    from types import SimpleNamespace

    llama3 = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[128001, 128009]))
    assert eos_token_ids(llama3, SimpleNamespace(eos_token_id=128009)) == [128001, 128009]
    one = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=2))
    assert eos_token_ids(one, SimpleNamespace(eos_token_id=2)) == [2]
    assert eos_token_ids(SimpleNamespace(), SimpleNamespace(eos_token_id=7)) == [7]
    assert until_eos([5, 6, 9, 7, 8], [7, 9]) == [5, 6]  # cut at the first of any of them
    assert until_eos([5, 6], [7]) == [5, 6]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from se_ray.models import resolve_model

    torch.set_num_threads(1)
    path = resolve_model(MODEL)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


def _prompt_ids(tokenizer) -> list[list[int]]:
    from se_ray.prompts import question_prompt_ids

    return [question_prompt_ids(tokenizer, q, "short") for q in QUESTIONS]


def test_chunked_decoding_equals_one_batch_and_one_prompt_at_a_time(model_and_tokenizer):
    from se_ray.train.selection import probe_answers

    model, tokenizer = model_and_tokenizer
    ids = _prompt_ids(tokenizer)
    whole = probe_answers(model, tokenizer, ids, 0, 1, max_new_tokens=10, chunk_size=32)
    assert probe_answers(model, tokenizer, ids, 0, 1, max_new_tokens=10, chunk_size=2) == whole
    alone = greedy_one_prompt_at_a_time(model, tokenizer, [tokenizer.decode(i) for i in ids], 10)
    assert whole == alone
    # a rank's slice, chunked, is that slice of the answers
    assert probe_answers(model, tokenizer, ids, 1, 2, max_new_tokens=10, chunk_size=1) == whole[1::2]


def _count_forwards(model):
    """A forward hook recording what each forward of ``model`` was asked for and returned."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((kwargs.get("logits_to_keep"), tuple(output.logits.shape)))

    return calls, model.register_forward_hook(hook, with_kwargs=True)


def test_logits_are_computed_at_the_last_position_only(model_and_tokenizer):
    from se_ray.train.selection import greedy_answers

    model, tokenizer = model_and_tokenizer
    ids = _prompt_ids(tokenizer)[:3]
    calls, handle = _count_forwards(model)
    try:
        greedy_answers(model, tokenizer, ids, max_new_tokens=4)
    finally:
        handle.remove()
    assert calls and all(keep == 1 for keep, _ in calls)
    vocab = model.config.vocab_size
    assert all(shape == (3, 1, vocab) for _, shape in calls)  # the prompt's forward included


def test_any_eos_id_stops_decoding(model_and_tokenizer):
    from se_ray.train.selection import greedy_answers

    model, tokenizer = model_and_tokenizer
    ids = _prompt_ids(tokenizer)[:1]
    free = greedy_answers(model, tokenizer, ids, max_new_tokens=8)[0]
    first = tokenizer(free, add_special_tokens=False)["input_ids"][0]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first]  # Llama-3 style: two EOS ids
    calls, handle = _count_forwards(model)
    try:
        cut = greedy_answers(model, tokenizer, ids, max_new_tokens=8)[0]
    finally:
        handle.remove()
        model.generation_config.eos_token_id = saved
    assert free and cut == ""  # the first answer token is an EOS now: nothing before it
    assert len(calls) == 1  # and decoding stopped there, not after 8 steps


ZERO3_LOAD = textwrap.dedent(
    """
    import json, os, sys
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from transformers.integrations import is_deepspeed_zero3_enabled
    from se_ray.config import load_config
    from se_ray.train.plan import deepspeed_config
    from se_ray.train.weights import load_train_model

    out = {}
    for stage in (2, 3):
        job = load_config(None, ["sampling.model=builtin:smollm2-135m-instruct", f"train.zero_stage={stage}",
                                 "train.num_workers=1", "train.global_batch_size=4"])
        loaded = load_train_model(job, deepspeed_config(job.train, 1))
        base = [p for n, p in loaded.model.named_parameters() if "lora" not in n]
        out[stage] = {
            "hf_config": type(loaded.zero3_loading).__name__,
            "zero3_enabled": is_deepspeed_zero3_enabled(),
            "partitioned": sum(hasattr(p, "ds_id") for p in base),
            "params": len(base),
            "local_numel": sum(p.numel() for p in base),
            "full_numel": sum(getattr(p, "ds_numel", p.numel()) for p in base),
        }
        del loaded
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def test_zero3_loads_each_weight_into_its_partition(tmp_path):
    """Under ZeRO-3 the model is built inside ``deepspeed.zero.Init`` (``HfDeepSpeedConfig`` alive
    before ``from_pretrained``): every base weight is a partitioned ZeRO parameter from the start,
    holding no full tensor; under ZeRO-2 the model loads as usual."""
    from tests.conftest import _free_port

    script = tmp_path / "zero3_load.py"
    script.write_text(ZERO3_LOAD)
    proc = subprocess.run(
        [sys.executable, str(script), str(_free_port())],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[3],
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    zero2, zero3 = out["2"], out["3"]
    assert zero2["hf_config"] == "NoneType" and zero2["partitioned"] == 0
    assert zero2["local_numel"] == zero2["full_numel"] > 100_000_000
    assert zero3["hf_config"] == "HfDeepSpeedConfig" and zero3["zero3_enabled"]
    assert zero3["partitioned"] == zero3["params"] > 0
    assert zero3["local_numel"] == 0 and zero3["full_numel"] == zero2["full_numel"]


def test_the_merged_model_keeps_the_base_dtype_and_adds_the_update_once(tmp_path):
    """LoRA merged on the base in its own dtype: each weight is the fp32 sum rounded once."""
    import torch
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from se_ray.models import resolve_model
    from se_ray.train.export import export_merged
    from se_ray.train.plan import lora_config

    cfg = load_config(None, []).train
    base_path = resolve_model(MODEL)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
    dtype = base.dtype
    assert dtype == torch.bfloat16  # the built-in model's folder is bf16, as Llama-3-8B's is
    fp32 = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    peft_model = get_peft_model(fp32, lora_config(cfg))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    export_merged(cfg, base_path, tmp_path / "adapter", tmp_path / "merged")

    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert merged[name].dtype == dtype
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    expected = (base.state_dict()[name].float() + delta.detach()).to(dtype)
    assert torch.equal(merged[name], expected)
    assert not torch.equal(merged[name], base.state_dict()[name])


def test_a_merge_task_asks_for_what_a_training_worker_has():
    from se_ray.train.export import training_task_options

    gpu = load_config(None, ["train.use_gpu=true", "train.cpus_per_worker=6", "train.accelerator_type=H100"])
    assert training_task_options(gpu.train) == {"num_cpus": 6, "num_gpus": 1, "accelerator_type": "H100"}
    cpu = load_config(None, ["train.cpus_per_worker=1"])
    assert training_task_options(cpu.train) == {"num_cpus": 1, "num_gpus": 0}


def test_lora_trials_export_no_merged_model():
    from se_ray.run.trials import trial_train_config

    lora = load_config(None, ["train.method=lora", "train.export_merged=true"])
    assert trial_train_config(lora, 3).export_merged is False and trial_train_config(lora, 3).seed == 3
    full = load_config(None, ["train.method=full", "train.export_merged=true"])
    assert trial_train_config(full, 0).export_merged is True  # full fine-tuning: merged/ is the model


def test_trials_ask_for_a_cpu_by_default():
    """A trial with a CPU cannot land on a head that offers none (num_cpus=0)."""
    assert load_config(None, []).sweep.trial_num_cpus > 0


def test_selected_weights_are_written_once_and_stale_ones_dropped(tmp_path):
    import torch

    from se_ray.storage import filesystem
    from se_ray.train.checkpoint import SELECTED_FILE, selected_dir
    from se_ray.train.weights import publish_selected, restore_selected

    cfg = load_config(None, ["train.method=full"]).train
    fs, storage = filesystem(str(tmp_path / "ray_train"))
    for step in (2, 4, 6):
        publish_selected(None, cfg, {"w": torch.full((2,), float(step))}, fs, storage, step, {step, 2})
    root = tmp_path / "ray_train" / "selected"
    assert sorted(p.name for p in root.iterdir()) == ["step2", "step6"]  # 4: named by no checkpoint
    assert [p.name for p in (root / "step6").iterdir()] == ["model.safetensors"]
    restore_selected(None, cfg, fs, storage, 6, tmp_path / "absent")  # already there: nothing to do
    with pytest.raises(RuntimeError, match="selected step 8 are missing"):
        restore_selected(None, cfg, fs, storage, 8, tmp_path / "absent")
    from safetensors.torch import save_file

    legacy = tmp_path / SELECTED_FILE  # a checkpoint of the older layout carried them inside
    save_file({"w": torch.ones(2)}, str(legacy))
    restore_selected(None, cfg, fs, storage, 8, legacy)
    assert Path(selected_dir(storage, 8), "model.safetensors").exists()


def test_a_stored_folder_downloads_whole(tmp_path):
    import pyarrow.fs as pafs

    from se_ray.train.export import download

    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "adapter_config.json").write_text("{}")
    (tmp_path / "src" / "sub" / "w.safetensors").write_text("w")
    download(pafs.LocalFileSystem(), str(tmp_path / "src"), tmp_path / "local" / "adapter")
    got = sorted(str(p.relative_to(tmp_path / "local")) for p in (tmp_path / "local").rglob("*"))
    assert got == ["adapter", "adapter/adapter_config.json", "adapter/sub", "adapter/sub/w.safetensors"]


@pytest.mark.slow
def test_a_chosen_trial_gets_merged_once_by_a_task(tmp_path, ray_address):
    """``se-ray run`` with ``train.export_merged``: a chosen LoRA trial's merged/ is written by a
    Ray task (the trial folder holds only its adapter), in the base dtype, and reused after."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from se_ray.engine import Engines
    from se_ray.models import resolve_model
    from se_ray.run.plan import Rule, TrialSpec
    from se_ray.run.trials import MERGED_EXPORT_FILE, export_chosen_models
    from se_ray.storage import Store
    from se_ray.train.plan import lora_config

    cfg = load_config(
        None, [f"ray.address={ray_address}", f"sampling.model={MODEL}", "train.export_merged=true"]
    )
    store = Store(str(tmp_path / "trial-a"))
    base = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32)
    get_peft_model(base, lora_config(cfg.train)).save_pretrained(
        str(tmp_path / "trial-a" / "train" / "adapter")
    )
    spec = TrialSpec("a", "digest", 0, Rule("semantic_entropy", 1.0), "key", store)
    engines = Engines(cfg)
    merged = export_chosen_models(cfg, engines, [spec])
    assert merged == {"a": str(tmp_path / "trial-a" / "train" / "merged")}
    folder = Path(merged["a"])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert store.read_json(MERGED_EXPORT_FILE) == {"merged": merged["a"]}
    (folder / "config.json").unlink()  # a second call reuses the marker: no task rewrites it
    assert export_chosen_models(cfg, engines, [spec]) == merged and not (folder / "config.json").exists()
    lora_off = cfg.model_copy(update={"train": cfg.train.model_copy(update={"export_merged": False})})
    assert export_chosen_models(lora_off, engines, [spec]) == {}

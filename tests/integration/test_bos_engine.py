"""The real vLLM engine sees exactly one BOS on every path, and its teacher-forced log-probs match
Hugging Face's (issue 16 defect 4; issue 18's ``continuation_logprobs``).

One extra engine: SmolLM2's weights (symlinked) with a Llama-3-like tokenizer whose chat template
writes a BOS and whose post-processor adds one too (``tests/unit/test_bos.py``), float32 so that
its log-probs can be held to Hugging Face's to 1e-2, and LoRA on for the adapter check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from se_ray.config import ABSTENTION_TEXT, EntailmentConfig, EvalConfig
from se_ray.engine import Rejected, request_params
from se_ray.models import resolve_model
from se_ray.prompts import question_messages, question_prompt_ids
from tests.conftest import test_config as job_config
from tests.unit.test_bos import BOS_ID, MODEL, write_bos_tokenizer

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "In which country is the city of Lyon?"]


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory) -> Path:
    """A model folder: the real SmolLM2 weights, the BOS-adding tokenizer and template."""
    src = Path(resolve_model(MODEL))
    folder = write_bos_tokenizer(tmp_path_factory.mktemp("bos-model") / "smollm2-bos")
    for name in ("model.safetensors", "generation_config.json"):
        (folder / name).symlink_to(src / name)
    config = json.loads((src / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "bos_token_id": BOS_ID}))
    yield folder
    shutil.rmtree(folder.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def bos_engine(ray_address, bos_model):
    from se_ray.engine import acquire_engines

    cfg = job_config()
    sampling = cfg.sampling.model_copy(
        update=dict(model=str(bos_model), dtype="float32", max_model_len=256, kv_cache_space_gb=1.0)
    )
    pool = acquire_engines(sampling, cfg.ray.model_copy(update={"shared_engines": False}))
    yield pool
    pool.release()


@pytest.fixture(scope="module")
def tokenizer(bos_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bos_model)


def _seen(pool) -> list[list[int]]:
    import ray

    return ray.get(pool.actors[0].last_prompt_token_ids.remote())


def _one_bos_first(ids: list[int]) -> bool:
    return ids[:1] == [BOS_ID] and ids.count(BOS_ID) == 1


def test_vllm_gets_one_bos_on_every_path(bos_engine, tokenizer):
    from se_ray.judges.correctness import LLMJudge as CorrectnessJudge
    from se_ray.judges.entailment import LLMJudge as EntailmentJudge
    from se_ray.judges.entailment import Query

    # Sampling and evaluation: question prompts through EnginePool.chat.
    conversations = [question_messages(q, "short") for q in QUESTIONS]
    replies = bos_engine.chat(conversations, request_params(2, 1.0, 8))
    assert all(len(r) == 2 for r in replies)
    expected = [question_prompt_ids(tokenizer, q, "short") for q in QUESTIONS]
    assert _seen(bos_engine) == expected
    assert all(_one_bos_first(ids) for ids in expected)

    # The LLM entailment judge and the LLM correctness judge.
    EntailmentJudge(EntailmentConfig(judge="llm"), bos_engine).implications(
        [Query("Who wrote Hamlet?", "Shakespeare", "William Shakespeare")]
    )
    entailment_ids = _seen(bos_engine)
    assert len(entailment_ids) == 1 and _one_bos_first(entailment_ids[0])
    CorrectnessJudge(EvalConfig(judge="llm"), bos_engine).judge(
        ["Who wrote Hamlet?"], ["Shakespeare"], [["William Shakespeare"]]
    )
    correctness_ids = _seen(bos_engine)
    assert len(correctness_ids) == 1 and _one_bos_first(correctness_ids[0])

    # Teacher forcing: the prompt's ids, then the continuation's so far, one request per token.
    bos_engine.continuation_logprobs(conversations[:1], ABSTENTION_TEXT)
    tail = tokenizer(ABSTENTION_TEXT, add_special_tokens=False)["input_ids"]
    assert _seen(bos_engine) == [expected[0] + tail[:k] for k in range(len(tail))]


def _hf_continuation_logprob(model, prompt_ids: list[int], tail: list[int]) -> float:
    import torch

    ids = torch.tensor([prompt_ids + tail])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    n = len(prompt_ids)
    return float(sum(logprobs[n + k - 1, t] for k, t in enumerate(tail)))


def test_continuation_logprobs_are_hugging_faces_teacher_forcing(bos_engine, bos_model, tokenizer, tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    conversations = [question_messages(q, "short") for q in QUESTIONS]
    conversations.append(question_messages("why " * 300, "short"))  # over max_model_len=256
    tail = tokenizer(ABSTENTION_TEXT, add_special_tokens=False)["input_ids"]
    prompts = [question_prompt_ids(tokenizer, q, "short") for q in QUESTIONS]

    base = AutoModelForCausalLM.from_pretrained(bos_model, dtype=torch.float32).eval()
    got = bos_engine.continuation_logprobs(conversations, ABSTENTION_TEXT)
    assert isinstance(got[-1], Rejected) and "256" in got[-1].reason
    want = [_hf_continuation_logprob(base, p, tail) for p in prompts]
    print(f"\nvLLM {got[:-1]} vs HF {want}")
    assert got[:-1] == pytest.approx(want, abs=1e-2)
    assert all(v < 0 for v in want)

    # Through a LoRA adapter (random, non-zero B: it moves the log-probs).
    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(adapter)
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(bos_model, dtype=torch.float32), adapter
    ).eval()
    got_tuned = bos_engine.continuation_logprobs(conversations[:-1], ABSTENTION_TEXT, str(adapter))
    want_tuned = [_hf_continuation_logprob(tuned, p, tail) for p in prompts]
    print(f"adapter: vLLM {got_tuned} vs HF {want_tuned}")
    assert got_tuned == pytest.approx(want_tuned, abs=1e-2)
    assert max(abs(a - b) for a, b in zip(want_tuned, want, strict=True)) > 0.1

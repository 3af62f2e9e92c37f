"""Engine identity, request parameters and the judge engines, without starting an engine."""

from se_ray.config import EngineConfig, load_config
from se_ray.engine import Engines, engine_digest, engine_names, request_params


def test_engine_identity_is_the_whole_engine_config():
    cfg = load_config(None).sampling
    assert (
        engine_digest(cfg)
        == engine_digest(cfg.engine)
        == engine_digest(EngineConfig(cpu_reserved_cores=cfg.cpu_reserved_cores))
    )
    # per-request and pool settings do not change the engine; every engine field does
    for key, value in [("temperature", 0.5), ("num_samples", 3), ("batch_size", 4), ("num_engines", 2)]:
        assert engine_digest(cfg.model_copy(update={key: value})) == engine_digest(cfg)
    for key in EngineConfig.model_fields:
        value = getattr(cfg, key)
        if isinstance(value, bool):
            changed = not value
        elif isinstance(value, str):
            changed = value + "-other"
        elif isinstance(value, dict):
            changed = {**value, "OTHER": "1"}
        else:
            changed = value + 1 if value >= 1 or not isinstance(value, float) else value / 2 or 0.5
        assert engine_digest(cfg.model_copy(update={key: changed})) != engine_digest(cfg), key
    two = cfg.model_copy(update={"num_engines": 2})
    assert engine_names(two) == [f"se-ray-llm-{engine_digest(cfg)}-{i}" for i in (0, 1)]


def test_request_params_are_vllm_sampling_params():
    assert request_params(3, 1.0, 32, ["\n"]) == {
        "n": 3,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "max_tokens": 32,
        "stop": ["\n"],
    }
    assert request_params(1, 0.0, 10)["stop"] == []


def test_judge_engine_is_the_generation_engine_unless_another_model():
    cfg = load_config(None, ["sampling.enable_lora=true", "eval.judge=llm"])
    assert Engines(cfg).correctness_judge_cfg() is cfg.sampling
    other = load_config(None, ["eval.judge_model=some/judge", "eval.judge_tensor_parallel_size=4"])
    judge = Engines(other).correctness_judge_cfg()
    assert (judge.model, judge.enable_lora, judge.num_engines, judge.tensor_parallel_size) == (
        "some/judge",
        False,
        1,
        4,
    )


def test_the_llm_entailment_judge_runs_on_the_sampling_engine_unless_another_model():
    from se_ray.engine import judge_engine_config

    cfg = load_config(None).sampling
    assert judge_engine_config("", cfg) is cfg and judge_engine_config(cfg.model, cfg) is cfg
    assert judge_engine_config("other/model", cfg).model == "other/model"

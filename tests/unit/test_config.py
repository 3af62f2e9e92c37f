import pytest

from se_ray.config import ABSTENTION_TEXT, ConfigError, JobConfig, load_config, parse_override


def test_defaults_are_the_cpu_quickstart():
    cfg = load_config()
    assert cfg.sampling.model == "builtin:smollm2-135m-instruct"
    assert cfg.sampling.num_samples == 10
    assert cfg.sampling.temperature == 1.0 and cfg.sampling.standard_temperature == 0.1
    assert cfg.entailment.judge == "residual"  # model-free: keeps contradicting answers apart
    assert cfg.eval.judge == "contains"  # a 135M model answers in sentences: F1 would call them wrong
    assert cfg.labeling.abstention_text == ABSTENTION_TEXT
    assert cfg.ray.num_cpus == 2 and cfg.ray.address is None


def test_dotted_overrides_are_parsed_as_yaml_scalars():
    cfg = load_config(
        None,
        [
            "data.limit=64",
            "sampling.answer_style=sentence",
            "labeling.tau=0.5",
            "sampling.stop=[]",
            "entailment.judge=nli",
        ],
    )
    assert cfg.data.limit == 64
    assert cfg.sampling.answer_style == "sentence"
    assert cfg.labeling.tau == 0.5
    assert cfg.sampling.stop == []
    assert cfg.entailment.judge == "nli"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "sampling.num_samples=0",
            "config key sampling.num_samples: Input should be greater than or equal to 1 (got 0)",
        ),
        ("sampling.answer_style=long", "config key sampling.answer_style"),
        ("labeling.tau=-1", "config key labeling.tau"),
        ("entailment.judge=gpt4", "config key entailment.judge"),
        ("sampling.bogus=1", "config key sampling.bogus: unknown key"),
        ("nosuchsection.x=1", "config key nosuchsection: unknown key"),
        ("data.limit=abc", "config key data.limit"),
    ],
)
def test_bad_values_give_one_line_naming_key_and_value(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_bad_value_message_shows_the_value():
    with pytest.raises(ConfigError, match=r"'long'"):
        load_config(None, ["sampling.answer_style=long"])


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampling:\n  num_samples: 4\nlabeling:\n  tau: 0.7\n")
    cfg = load_config(path, ["labeling.tau=0.9"])
    assert cfg.sampling.num_samples == 4 and cfg.labeling.tau == 0.9


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_override_syntax():
    assert parse_override("a.b=1") == ("a.b", 1)
    assert parse_override("a=") == ("a", "")
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="global_batch_size"):
        load_config(None, ["train.global_batch_size=5", "train.micro_batch_size=2"])
    with pytest.raises(ConfigError) as info:
        load_config(None, ["entailment.num_actors=2", "entailment.max_actors=1"])
    assert str(info.value) == "config: entailment.max_actors=1 is below entailment.num_actors=2"
    assert load_config(None, ["entailment.max_actors=3"]).entailment.max_actors == 3


def test_resolved_config_round_trips():
    cfg = load_config(None, ["data.limit=3"])
    again = JobConfig.model_validate(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg


def test_results_key_leaves_out_only_operational_fields():
    from se_ray.config import results_key

    cfg = load_config()
    key = results_key(cfg.sampling)
    assert "temperature" in key and "model" in key and "num_samples" in key
    assert not {"batch_size", "num_engines", "num_cpus_per_engine", "request_timeout_s"} & set(key)
    faster = load_config(None, ["sampling.batch_size=4", "entailment.num_actors=2", "train.max_failures=3"])
    for section in ("sampling", "entailment", "train", "eval"):
        assert results_key(getattr(faster, section)) == results_key(getattr(cfg, section)), section
    hotter = load_config(None, ["sampling.temperature=0.7"])
    assert results_key(hotter.sampling) != results_key(cfg.sampling)


@pytest.mark.parametrize(
    "overrides, reserved",
    [
        ([], 0),  # the residual judge runs no model: the engine computes on every core
        (["entailment.judge=llm"], 0),  # the LLM judge asks the engines themselves
        (["entailment.judge=embedding"], 1),  # 0.5 CPU rounded up: one core for MiniLM
        (["entailment.judge=nli", "entailment.num_actors=3"], 2),  # 1.5 CPUs
        (["entailment.judge=nli", "entailment.num_actors=1", "entailment.max_actors=4"], 2),
        (["entailment.judge=embedding", "entailment.num_gpus=0.25"], 0),  # the judge is on a GPU
        (["entailment.judge=embedding", "sampling.cpu_reserved_cores=0"], 0),  # set: kept
        (["sampling.cpu_reserved_cores=3"], 3),
    ],
)
def test_cpu_engine_cores_are_reserved_for_a_judge_that_runs_a_model(overrides, reserved):
    assert load_config(None, overrides).sampling.cpu_reserved_cores == reserved


def test_the_derived_core_reservation_reaches_the_engine_config():
    cfg = load_config(None, ["entailment.judge=embedding"])
    assert cfg.sampling.engine.cpu_reserved_cores == 1

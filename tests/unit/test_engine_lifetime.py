"""The hung-engine clock (se_ray.engine_clock): queueing and start-up are not a hung call."""

from se_ray.engine_clock import Heartbeat, hung_cause


def test_a_call_is_hung_only_past_the_timeout_counted_from_its_start_of_work():
    assert hung_cause(Heartbeat(busy_s=59.0), 0.0, True, 60.0, 1800.0) is None
    cause = hung_cause(Heartbeat(busy_s=61.0), 0.0, True, 60.0, 1800.0)
    assert cause is not None and "request_timeout_s=60" in cause


def test_an_idle_engine_is_not_hung_however_long_the_caller_has_waited():
    assert hung_cause(Heartbeat(busy_s=None), 5.0, True, 60.0, 1800.0) is None


def test_start_up_silence_is_judged_by_the_start_timeout_not_the_request_timeout():
    assert hung_cause(None, 600.0, False, 60.0, 1800.0) is None
    cause = hung_cause(None, 1801.0, False, 60.0, 1800.0)
    assert cause is not None and "engine_start_timeout_s=1800" in cause


def test_a_started_engine_that_stops_answering_is_hung_after_the_request_timeout():
    cause = hung_cause(Heartbeat(busy_s=1.0), 61.0, True, 60.0, 1800.0)
    assert cause is not None and "no heartbeat" in cause


def test_no_timeouts_means_never_hung():
    assert hung_cause(Heartbeat(busy_s=1e9), 1e9, True, None, None) is None
    assert hung_cause(None, 1e9, False, None, None) is None


def test_engine_port_bases_stay_in_range_and_spread():
    import random

    from se_ray.engine_actor import ENGINE_PORT_RANGE, engine_port_base

    rng = random.Random(0)
    bases = [engine_port_base(rng) for _ in range(200)]
    low, high = ENGINE_PORT_RANGE
    assert all(low <= b < high and b % 64 == low % 64 for b in bases)
    assert len(set(bases)) > 150


def test_a_tensor_parallel_engine_asks_one_node_for_a_bundle_per_gpu():
    from se_ray.config import load_config
    from se_ray.engine_placement import tensor_parallel_bundles

    cfg = load_config(
        None,
        [
            "sampling.tensor_parallel_size=4",
            "sampling.num_gpus_per_engine=1",
            "sampling.num_cpus_per_engine=2",
            "sampling.accelerator_type=H100",
        ],
    )
    bundles = tensor_parallel_bundles(cfg.sampling)
    assert len(bundles) == 4
    assert bundles[0] == {"GPU": 1.0, "CPU": 2, "accelerator_type:H100": 0.001}
    assert bundles[1:] == [{"GPU": 1.0, "accelerator_type:H100": 0.001}] * 3


def test_shared_engines_are_named_in_the_configured_namespace():
    from se_ray.config import load_config
    from se_ray.engine import engine_namespace

    cfg = load_config(None, ["ray.shared_engines=true", "ray.namespace=team-a"])
    assert engine_namespace(cfg.ray) == "team-a"


def test_the_engines_of_a_verb_are_generation_then_the_llm_judges_once_each():
    from se_ray.config import load_config
    from se_ray.engine import engine_names
    from se_ray.engine_admin import verb_engine_configs

    plain = load_config(None, [])
    assert [engine_names(c) for c in verb_engine_configs(plain, "label")] == [engine_names(plain.sampling)]
    # An LLM judge on the sampling model is the generation engine itself.
    same = load_config(None, ["entailment.judge=llm"])
    assert [engine_names(c) for c in verb_engine_configs(same, "label")] == [engine_names(same.sampling)]
    judged = load_config(None, ["entailment.judge=llm", "entailment.model=org/judge-model", "eval.judge=llm"])
    label = verb_engine_configs(judged, "label")
    assert [c.model for c in label] == [judged.sampling.model, "org/judge-model"]
    evaluate = verb_engine_configs(judged, "evaluate")
    assert len(evaluate) == len({tuple(engine_names(c)) for c in evaluate}) >= 2

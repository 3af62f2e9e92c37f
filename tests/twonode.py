"""A two-node Ray cluster on this machine, for the multi-node and node-loss tests.

``ray start --head --block`` with the dashboard (and so the job server and the state API) on,
and a second ``ray start --block --address=...`` joining it as a worker node; both are child
processes of the test, each in its own process group, and are stopped by signalling them
(never ``ray stop``, which would stop every Ray cluster on the machine, the shared test
cluster included). Token authentication is on (``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN``).
The head carries the custom resource ``head``, the worker ``worker_node``; their CPU counts
are the caller's (default: 2 on the head, 1 on the worker).

Separate filesystems (``NodeHome``, ``hide_from_worker``): each node can get its own ``HOME``,
``SE_RAY_CACHE`` and ``TMPDIR``, and the worker node can be started in a mount namespace of its
own (``unshare --mount --propagation private``) with a private, empty tmpfs over the head's
folders, so a path on the head's (the driver's) disk is really missing where the worker runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import RAY_BIN, REPO

NODE_START_TIMEOUT_S = 300


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (all sockets held open together so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_ports() -> list[str]:
    """Ports that default to fixed numbers (or collide) when two nodes share one machine."""
    nm, om, agent_http, agent_grpc, metrics, runtime_env = _free_ports(6)
    return [
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
    ]


@dataclass(frozen=True)
class NodeHome:
    """One node's own ``HOME``, ``SE_RAY_CACHE`` and ``TMPDIR``, under ``root``."""

    root: Path

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def cache(self) -> Path:
        return self.home / ".cache" / "se-ray"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def make(self) -> NodeHome:
        for folder in (self.home, self.cache, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "SE_RAY_CACHE": str(self.cache), "TMPDIR": str(self.tmp)}


def _in_private_mounts(cmd: list[str], hidden: Sequence[Path]) -> list[str]:
    """``cmd`` in a mount namespace of its own, with an empty private tmpfs over each folder."""
    mounts = "".join(f"mount -t tmpfs -o size=1m se-ray-hidden {shlex.quote(str(d))}; " for d in hidden)
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        f"set -e; {mounts}exec {shlex.join(cmd)}",
    ]


class TwoNodeCluster:
    """A head (with the job server) and one worker node, as child processes of this test.

    ``env``: extra environment of both nodes; ``head_env``/``worker_env``: of one node (e.g. a
    ``NodeHome``'s); ``hide_from_worker``: folders the worker node must not see.
    """

    def __init__(
        self,
        workdir: Path,
        head_cpus: int = 2,
        worker_cpus: int = 1,
        env: dict[str, str] | None = None,
        head_env: dict[str, str] | None = None,
        worker_env: dict[str, str] | None = None,
        hide_from_worker: Sequence[Path] = (),
    ):
        self.workdir = workdir
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.head_env, self.worker_env = dict(head_env or {}), dict(worker_env or {})
        self.hide_from_worker = list(hide_from_worker)
        workdir.mkdir(parents=True, exist_ok=True)
        self.temp_dir = Path("/tmp") / f"semn-{os.getpid()}"  # Ray's socket paths must stay short
        self.gcs_port, self.dashboard_port, self.client_port = _free_ports(3)
        self.token = secrets.token_hex(32)
        self.procs: list[subprocess.Popen] = []
        self._logs: list = []
        venv_bin = str(Path(RAY_BIN).parent)
        extra_env = dict(env or {})
        env = {
            k: v
            for k, v in os.environ.items()
            # nothing of the shared test cluster or of ~/.ray's auth settings leaks in
            if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")
        }
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # a test cluster: stop at once on SIGTERM
            # the job's entrypoint `se-ray` is looked up on the nodes' PATH
            PATH=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        self.env = {**env, **extra_env}

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(
        self, name: str, args: list[str], env: dict[str, str], hidden: Sequence[Path] = ()
    ) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("w")
        self._logs.append(log)
        cmd = [RAY_BIN, "start", "--block", "--num-gpus=0", "--disable-usage-stats",
               "--object-store-memory=100000000", *_node_ports(), *args]  # fmt: skip
        if hidden:
            cmd = _in_private_mounts(cmd, hidden)  # unshare and sh exec: the pid stays ray's
        proc = subprocess.Popen(
            cmd,
            env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a last-resort kill reaches only it
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self._start(
            "head",
            ["--head", f"--port={self.gcs_port}", f"--ray-client-server-port={self.client_port}",
             f"--num-cpus={self.head_cpus}", '--resources={"head": 1}', f"--temp-dir={self.temp_dir}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dashboard_port}"],
            self.head_env,
        )  # fmt: skip
        self._wait(lambda: self.api("/api/version") is not None, "the head's dashboard")
        self._start(
            "worker",
            [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={self.worker_cpus}",
             '--resources={"worker_node": 1}'],
            self.worker_env,
            self.hide_from_worker,
        )  # fmt: skip
        self._wait(lambda: len(self.alive_nodes()) == 2, "the worker node to join")

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while not ready():
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"waiting for {what}: a `ray start` exited\n{self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waiting for {what}\n{self.logs()}")
            time.sleep(2)

    def api(self, path: str):
        """GET a dashboard endpoint with the cluster token; None while it does not answer."""
        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def alive_nodes(self) -> list[dict]:
        reply = self.api("/api/v0/nodes?limit=100&detail=true")
        if not reply or not reply.get("result"):
            return []
        return [n for n in reply["data"]["result"]["result"] if n.get("state") == "ALIVE"]

    def ray(self, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """The real `ray` CLI as a client of this cluster."""
        return subprocess.run(
            [RAY_BIN, *args], env=env or self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )

    def ray_json(self, *args: str):
        r = self.ray(*args, "--address", self.dashboard, "--format", "json")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return json.loads(r.stdout)

    def logs(self) -> str:
        out = []
        for name in ("head", "worker"):
            p = self.workdir / f"{name}.log"
            if p.exists():
                out.append(f"--- {name} ---\n" + p.read_text()[-3000:])
        return "\n".join(out)

    def stop(self) -> None:
        # SIGTERM to both at once: each `ray start --block` stops the processes it started.
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
            # Whatever of that node outlived it (it has its own process group): gone too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for log in self._logs:
            log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def two_node_cluster(
    workdir: Path, head_cpus: int = 2, worker_cpus: int = 1, **options: Any
) -> Iterator[TwoNodeCluster]:
    """A started two-node cluster, stopped on exit (``options``: ``TwoNodeCluster``'s).

    `ray start` gives its raylet a fixed 30 s to register with the GCS; on a loaded 2-core
    machine that can run out, so a failed start is retried once on fresh ports.
    """
    for attempt in (1, 2):
        c = TwoNodeCluster(workdir / f"cluster{attempt}", head_cpus, worker_cpus, **options)
        try:
            c.start()
        except (RuntimeError, TimeoutError) as e:
            c.stop()
            if attempt == 2:
                raise
            print(f"two-node cluster start failed, retrying: {str(e).splitlines()[0]}")
            continue
        try:
            yield c
        finally:
            c.stop()
        return

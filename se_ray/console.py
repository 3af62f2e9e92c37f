"""The CLI's process contract: stdout holds exactly the JSON summary; SIGINT/SIGTERM end a verb cleanly.

stdout: Ray forwards worker logs to the driver's stdout, and vLLM, DeepSpeed and progress
bars print, some from C. So the redirect is made on the file descriptor: fd 1 becomes a
copy of fd 2 for the whole process (and the children it starts), and the real stdout is
kept on a private, non-inheritable descriptor that only ``SummaryOutput.emit`` writes to.

Signals: ``ray.init`` replaces the SIGTERM handler twice. In Python it sets ``sys.exit(15)``
(or, when it starts a local cluster, a handler that kills the cluster, then exits 1); then
the C++ core worker installs absl's failure-signal handler at the OS level, which dumps a
native stack and aborts (exit 134): Python's handler never runs again, even though
``signal.getsignal`` still names it. ``install_signal_handlers`` makes SIGINT and SIGTERM
raise ``Interrupted`` in the main thread, so ``finally:`` blocks (which release engines and
leases) run; ``runtime.ensure_ray`` calls it again right after ``ray.init``. A watchdog ends
the process with the same one line and exit code if the cleanup has not finished within the
grace period, and a second signal ends it at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, TextIO

# Total budget after a signal is 15 s: cleanup gets this long before the watchdog exits.
DEFAULT_GRACE_S = 12.0

_state: dict[str, Any] = {"prog": "se-ray", "grace_s": DEFAULT_GRACE_S, "received": None}
_line_lock = threading.Lock()
_line_written = False


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException so that ``except Exception`` does not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def interrupted_message(signum: int) -> str:
    return f"interrupted by {signal.Signals(signum).name}; committed parts are kept, rerun to resume"


def interrupted_line(prog: str, signum: int) -> str:
    return f"{prog}: {interrupted_message(signum)}"


def write_line_once(line: str) -> None:
    """Write the closing line to stderr once, whichever of the main thread and the watchdog is first."""
    global _line_written
    with _line_lock:
        if _line_written:
            return
        _line_written = True
    with contextlib.suppress(OSError):
        sys.stderr.flush()
        os.write(2, (line + "\n").encode())


def _hard_exit(signum: int) -> None:
    write_line_once(interrupted_line(_state["prog"], signum))
    os._exit(128 + signum)


def arm_watchdog(signum: int, grace_s: float | None = None) -> None:
    """End the process with the closing line and ``128 + signum`` if cleanup outlasts ``grace_s``."""
    timer = threading.Timer(_state["grace_s"] if grace_s is None else grace_s, _hard_exit, args=(signum,))
    timer.daemon = True  # runs on through atexit handlers (ray.shutdown), which may hang too
    timer.start()


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state["received"] is not None:
        _hard_exit(signum)  # a second signal: the user does not want to wait for cleanup
    _state["received"] = signum
    arm_watchdog(signum)
    raise Interrupted(signum)


def install_signal_handlers(prog: str | None = None, grace_s: float | None = None) -> bool:
    """Make SIGINT and SIGTERM raise ``Interrupted`` in the main thread; idempotent.

    Call it again after ``ray.init`` (which installs its own SIGTERM handler). Returns False
    (and installs nothing) outside the main thread, where Python cannot set handlers.
    """
    if prog is not None:
        _state["prog"] = prog
    if grace_s is not None:
        _state["grace_s"] = grace_s
    if threading.current_thread() is not threading.main_thread():
        return False
    if "ignored" not in _state:
        # A signal ignored on entry stays ignored (POSIX convention: a shell starts background
        # jobs with SIGINT ignored, so that Ctrl-C in the terminal does not reach them).
        _state["ignored"] = {
            s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) == signal.SIG_IGN
        }
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Always set, even when getsignal already names _handler: a C library (Ray's core
        # worker) may have replaced the OS-level handler behind Python's back.
        signal.signal(signum, signal.SIG_IGN if signum in _state["ignored"] else _handler)
    return True


def received_signal() -> int | None:
    return _state["received"]


class SummaryOutput:
    """Points fd 1 (and ``sys.stdout``) at stderr; ``emit`` writes the summary to the real stdout.

    ``restore=True`` puts fd 1 back on ``close`` (for in-process callers such as tests); the
    CLI keeps the redirect until the process exits, because Ray prints while shutting down.
    """

    def __init__(self, restore: bool = False):
        self.restore = restore
        self._saved: int | None = None
        self._stdout: TextIO | None = None
        self._active = False

    def __enter__(self) -> SummaryOutput:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            sys.stdout.flush()
        try:
            self._saved = os.dup(1)  # non-inheritable: children never hold the real stdout
        except OSError:  # stdout closed (`se-ray ... >&-`): there is nowhere to write a summary
            self._saved = None
            return self
        os.dup2(2, 1)
        self._stdout = sys.stdout
        sys.stdout = sys.stderr
        self._active = True
        return self

    def emit(self, obj: Any) -> None:
        """Write ``obj`` as JSON to the real stdout and close it, so a reader sees EOF at once."""
        if not self._active:
            return
        assert self._saved is not None
        data = (json.dumps(obj, indent=2, default=str) + "\n").encode()
        view = memoryview(data)
        with contextlib.suppress(BrokenPipeError):  # the reader (`| head`) went away: not our failure
            while view:
                view = view[os.write(self._saved, view) :]
        self._close_saved()

    def _close_saved(self) -> None:
        if self._saved is None:
            return
        self._active = False
        if self.restore:
            sys.stderr.flush()
            os.dup2(self._saved, 1)
            if self._stdout is not None:
                sys.stdout = self._stdout
        os.close(self._saved)
        self._saved = None

    def __exit__(self, *exc: object) -> None:
        self._close_saved()

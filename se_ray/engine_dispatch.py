"""How a pool's calls run over its engines: one call in flight per engine, failing rows
isolated, a dead or hung engine restarted and its rows retried (``EnginePool.chat``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from se_ray.engine_actor import EngineFailedError, Rejected, control
from se_ray.engine_clock import Heartbeat, hung_cause

HEARTBEAT_EVERY_S = 2.0


def first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def _engine_died(e: BaseException) -> bool:
    """An error of the engine, not of a row: the actor died, or vLLM's core did."""
    import ray.exceptions as rex

    if isinstance(e, rex.RayActorError | rex.GetTimeoutError):
        return True
    return "EngineDeadError" in type(e).__name__ or "EngineDeadError" in str(e) or "EngineCore" in str(e)


def _actor_gone(e: BaseException) -> bool:
    import ray.exceptions as rex

    return isinstance(e, rex.RayActorError) and not isinstance(e, rex.ActorUnavailableError)


@dataclass
class _Watch:
    """What one engine's heartbeats said during one dispatch."""

    pending: Any = None
    sent_at: float = float("-inf")
    last: Heartbeat | None = None
    started: bool = False


class Dispatch:
    """Runs chunks of rows over a pool's engines: one call in flight per engine, a chunk that
    fails is split until the failing rows stand alone (they become ``Rejected``), an engine that
    dies or hangs is restarted and its chunk retried.

    Hung is judged from the engine's heartbeat (``hung_cause``): a call that has *run* longer
    than ``request_timeout_s`` by the engine's own count, or silence, within the start-up budget
    until the engine first answers; a call queued behind another caller's or behind start-up
    is not hung."""

    def __init__(self, pool: Any, conversations: list, params: list, adapter: str | None, out: list):
        self.pool, self.conversations, self.params, self.adapter, self.out = (
            pool,
            conversations,
            params,
            adapter,
            out,
        )
        self.failures: dict[int, int] = {}  # engine index -> restarts in this call
        self.watches: dict[int, _Watch] = {}

    def run(self, todo: list[list[int]]) -> None:
        import ray

        n = len(self.pool.actors)
        free = [(self.pool._cursor + k) % n for k in range(n)]
        self.pool._cursor += 1
        flight: dict[Any, tuple[int, list[int]]] = {}
        while todo or flight:
            while todo and free:
                k, rows = free.pop(0), todo.pop(0)
                ref = self.pool._call(
                    k, [self.conversations[i] for i in rows], [self.params[i] for i in rows], self.adapter
                )
                flight[ref] = (k, rows)
            ready, _ = ray.wait(list(flight), num_returns=1, timeout=1.0)
            for ref in ready:
                k, rows = flight.pop(ref)
                free.append(k)
                todo[:0] = self._settle(ref, k, rows)
            for ref, (k, rows) in list(flight.items()):
                cause = self._hung(k)
                if cause:
                    del flight[ref]
                    self._restart(k, cause)
                    free.append(k)
                    todo.insert(0, rows)

    def _hung(self, k: int) -> str | None:
        """Poll engine ``k``'s heartbeat (one in flight at a time); why it counts as hung, if it does."""
        import ray

        w = self.watches.setdefault(k, _Watch())
        now = time.monotonic()
        if w.pending is not None and ray.wait([w.pending], timeout=0)[0]:
            try:
                w.last, w.started = Heartbeat(**ray.get(w.pending)), True
            except Exception:  # the engine died: its call reports it; it starts over
                w.last, w.started = None, False
            w.pending = None
        if w.pending is None and now - w.sent_at >= HEARTBEAT_EVERY_S:
            w.pending, w.sent_at = control(self.pool.actors[k], "heartbeat").remote(), now
        silent_s = now - w.sent_at if w.pending is not None else 0.0
        return hung_cause(w.last, silent_s, w.started, self.pool.request_timeout_s, self.pool.start_timeout_s)

    def _settle(self, ref: Any, k: int, rows: list[int]) -> list[list[int]]:
        """Store a finished call's results; returns the chunks to run again."""
        import ray

        try:
            results = ray.get(ref)
        except Exception as e:
            if _engine_died(e):
                # An actor that died is already being restarted by Ray: wait for it, don't kill.
                self._restart(k, first_line(e), kill=not _actor_gone(e))
                return [rows]
            if len(rows) == 1:
                self.out[rows[0]] = Rejected(f"the engine call failed: {first_line(e)}")
                return []
            half = len(rows) // 2
            return [rows[:half], rows[half:]]
        for i, r in zip(rows, results, strict=True):
            self.out[i] = r
        return []

    def _restart(self, k: int, cause: str, kill: bool = True) -> None:
        self.failures[k] = self.failures.get(k, 0) + 1
        if self.failures[k] > self.pool.retries:
            raise EngineFailedError(
                f"engine {self.pool.names[k]} failed {self.failures[k]} times "
                f"(sampling.engine_retries={self.pool.retries}); last: {cause}"
            )
        self.watches.pop(k, None)
        self.pool.restart(k, cause, kill)

"""When an engine counts as hung: the pure clock behind the pool's hung-engine timeout.

The request timeout counts from the engine's own start of work on a call (its heartbeat
reports how long its current call has run), never from the request: a call queued behind
another caller's call, or behind the engine's start-up, is not a hung engine. Start-up has
its own, longer budget. No ray, torch or vllm here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Heartbeat:
    """What the engine answered: ``busy_s`` is how long its current call has run (None: idle)."""

    busy_s: float | None


def hung_cause(
    heartbeat: Heartbeat | None,
    silent_s: float,
    started: bool,
    request_timeout_s: float | None,
    start_timeout_s: float | None,
) -> str | None:
    """Why the engine counts as hung, or None while it does not.

    ``heartbeat``: its last answer (None: none yet); ``silent_s``: how long the pending
    heartbeat has gone unanswered; ``started``: whether it has ever answered (before that,
    silence is start-up, judged by ``start_timeout_s``; after, by ``request_timeout_s``).
    """
    busy_s = heartbeat.busy_s if heartbeat is not None else None
    if busy_s is not None and request_timeout_s and busy_s > request_timeout_s:
        return f"a call ran {busy_s:.0f} s, over sampling.request_timeout_s={request_timeout_s:g}"
    limit, key = (
        (request_timeout_s, "request_timeout_s") if started else (start_timeout_s, "engine_start_timeout_s")
    )
    if limit and silent_s > limit:
        what = "no heartbeat" if started else "not started"
        return f"{what} within sampling.{key}={limit:g}"
    return None

"""One way to wait for a condition with a deadline: poll, sleep, give up.

Used wherever the thing awaited is another process's file, an EC2 state or a /proc entry —
nothing a caller could block on. Stdlib only: the agent ships it.
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout_s: float, *, interval_s: float, what: str,
               clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep,
               on_poll: Callable[[float], None] | None = None,
               error: Callable[[], BaseException] | None = None,
               backoff: float = 1.0, max_interval_s: float | None = None) -> T:
    """Call ``predicate`` until it returns something truthy and return that.

    It is called at least once, and once more at the deadline, so a condition met during
    the last sleep is not missed. After ``timeout_s`` (``clock`` seconds): ``error()`` is
    raised, by default ``TimeoutError("<what>: not after <timeout_s> s")``. Exceptions from
    ``predicate`` pass through (a caller ends a wait early that way).

    ``on_poll(elapsed_s)`` runs after each miss that is not the last, before the sleep (a
    progress line, a point where a caller may raise to stop waiting). Sleeps start at
    ``interval_s`` and grow by ``backoff`` up to ``max_interval_s``; none runs past the deadline.
    """
    start = clock()
    interval = interval_s
    while True:
        value = predicate()
        if value:
            return value
        elapsed = clock() - start
        if elapsed >= timeout_s:
            raise error() if error is not None else TimeoutError(f"{what}: not after {timeout_s} s")
        if on_poll is not None:
            on_poll(elapsed)
        sleep(max(0.0, min(interval, timeout_s - elapsed)))
        interval *= backoff
        if max_interval_s is not None:
            interval = min(interval, max_interval_s)

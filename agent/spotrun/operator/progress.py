"""Long waits, shown the way a terminal user expects: what, for how long, current state.

On a TTY one line is rewritten in place; otherwise (pipes, CI, ``--json``) nothing is drawn
and one structured log event marks the start and the end of each wait.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from spotrun.errors import SpotrunError
from spotrun.operator.aws import oplog as _log
from spotrun.waiting import wait_until



class Reporter:
    def __init__(self, stream: TextIO | None = None, quiet: bool = False, interval_s: float = 2.0):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.interval_s = interval_s

    @property
    def interactive(self) -> bool:
        return not self.quiet and hasattr(self.stream, "isatty") and self.stream.isatty()

    def say(self, line: str) -> None:
        """A human progress line (TTY or not), suppressed in --json mode."""
        if not self.quiet:
            print(line, file=self.stream, flush=True)

    def wait(self, what: str, check: Callable[[], tuple[bool, str]], timeout_s: float) -> str:
        """Poll ``check() -> (done, state)`` until done; SpotrunError after ``timeout_s``."""
        start = time.monotonic()
        _log.info("wait_started", what=what)
        state = ""

        def done() -> bool:
            nonlocal state
            finished, state = check()
            return finished

        def show(elapsed: float) -> None:
            if self.interactive:
                self.stream.write(f"\r\033[Kwaiting for {what}: {state or '…'} ({elapsed:.0f}s so far)")
                self.stream.flush()

        def gave_up() -> SpotrunError:
            elapsed = time.monotonic() - start
            if self.interactive:
                self.stream.write("\n")
            _log.warning("wait_timed_out", what=what, state=state, elapsed_s=round(elapsed, 1))
            return SpotrunError(f"gave up waiting for {what} after {elapsed:.0f}s (still {state})")

        wait_until(done, timeout_s, interval_s=self.interval_s, what=what, on_poll=show, error=gave_up)
        elapsed = time.monotonic() - start
        if self.interactive:
            self.stream.write(f"\r\033[K{what}: {state} after {elapsed:.0f}s\n")
            self.stream.flush()
        _log.info("wait_finished", what=what, state=state, elapsed_s=round(elapsed, 1))
        return state

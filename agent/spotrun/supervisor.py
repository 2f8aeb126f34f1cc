"""Supervision of the trainer: restart a crashed one with exponential backoff up to a limit,
and report every step as an event object, so the lifecycle can wait on one queue for
"trainer exited", "interruption notice" and "stop requested" alike.

A trainer stopped by someone else (an operator's ``kill``, ``systemctl kill``, a wrapper's
OOM path: exit 75, or 0 without its completion record) is restarted like a crash, with
the same backoff, and counts toward ``max_restarts``: it resumes from its checkpoint, and
a loop of such stops still ends in the failure policy rather than billing forever."""
from __future__ import annotations

import enum
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

from spotrun.log import get_logger
from spotrun.trainerproc import (Outcome, TrainerError, TrainerProcess, TrainerState,
                                 TrainerStateError)

log = get_logger("trainer")

# A drain waits for the trainer in slices this long, kicking the watchdog between them.
DRAIN_KICK_S = 5.0


class SupervisorOutcome(enum.Enum):
    FINISHED = "finished"
    PREEMPTED = "preempted"  # stopped by request_stop()/drain(), while running or in backoff
    GAVE_UP = "gave_up"      # crashed more than max_restarts times in a row, or cannot start


@dataclass(frozen=True)
class SupervisorResult:
    outcome: SupervisorOutcome
    restarts: int
    returncode: int | None = None
    reason: str = ""
    killed: bool = False  # the last trainer ignored SIGTERM and was killed at the deadline
    completion: dict | None = None  # the finished trainer's completion record, if it wrote one


# Events handed to ``on_event`` (the lifecycle puts them on the queue it waits on).
@dataclass(frozen=True)
class TrainerStarted:
    pid: int
    attempt: int


@dataclass(frozen=True)
class TrainerExited:
    pid: int | None
    returncode: int | None
    outcome: Outcome
    restarts: int


@dataclass(frozen=True)
class TrainerRestartScheduled:
    delay_s: float
    restarts: int
    reason: str


@dataclass(frozen=True)
class SupervisorDone:
    result: SupervisorResult


def describe_exit(proc: TrainerProcess) -> str:
    if proc.start_error:
        return proc.start_error
    code = proc.returncode
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if proc.state is TrainerState.EXITED and proc.outcome() is Outcome.STOPPED:
        return f"exit code {code}, stopped, not done" + (" (no completion record)" if code == 0 else "")
    return f"exit code {code}"


class Supervisor:
    """Runs trainers from ``factory`` until one finishes, a stop is requested, or it gives up.

    A run that lasted ``healthy_after_s`` or more resets the crash count and the backoff: the
    limit is for crash loops, not for a job that makes progress between rare crashes.
    """

    def __init__(self, factory: Callable[[], TrainerProcess], *, max_restarts: int = 3,
                 backoff_s: float = 10.0, backoff_max_s: float = 300.0, healthy_after_s: float = 600.0,
                 on_event: Callable[[object], None] | None = None):
        self._factory = factory
        self.max_restarts = max_restarts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.healthy_after_s = healthy_after_s
        self._on_event = on_event or (lambda event: None)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._done = threading.Event()
        self._current: TrainerProcess | None = None
        self._restarts = 0
        self._agent_stopping = False
        self._result: SupervisorResult | None = None
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> TrainerProcess | None:
        return self._current

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def agent_stopping(self) -> bool:
        return self._agent_stopping

    @property
    def result(self) -> SupervisorResult | None:
        return self._result

    def start(self) -> None:
        if self._thread is not None:
            raise TrainerStateError("the supervisor was already started")
        self._thread = threading.Thread(target=self._run, name="trainer-supervisor", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> SupervisorResult | None:
        self._done.wait(timeout)
        return self._result

    def checkpoint_now(self) -> bool:
        with self._lock:
            proc = self._current
            return bool(proc and proc.state is TrainerState.RUNNING and proc.checkpoint_now())

    def note_agent_stopping(self) -> None:
        """The agent itself got SIGTERM (a shutdown signals the whole unit at once): an exit
        from now on is not a completion, whatever the trainer says. Safe in a signal
        handler: one assignment, no lock. The next boot resumes and confirms a real finish."""
        self._agent_stopping = True

    def request_stop(self) -> None:
        """SIGTERM the running trainer and start no other (also cuts a backoff short)."""
        with self._lock:
            self._stop.set()
            proc = self._current
            if proc is not None and proc.state in (TrainerState.RUNNING, TrainerState.DRAINING):
                proc.request_stop()

    def drain(self, deadline: float, clock: Callable[[], float] = time.monotonic, *,
              kick: Callable[[], object] = lambda: None,
              kick_every_s: float | None = None) -> SupervisorResult:
        """request_stop(), wait for the trainer until ``deadline`` (``clock`` time), SIGKILL after.
        ``kick``: called at least every few seconds of the wait (the systemd watchdog)."""
        self.request_stop()
        proc = self._current
        if proc is not None and proc.state is not TrainerState.CREATED:
            # The budget in ``clock`` time, waited out in real time, in slices between kicks.
            end = time.monotonic() + max(0.0, deadline - clock())
            exited = None
            while True:
                kick()
                exited = proc.wait(min(kick_every_s or DRAIN_KICK_S, max(0.0, end - time.monotonic())))
                if exited is not None or time.monotonic() >= end:
                    break
            if exited is None:
                log.warning("trainer_drain_deadline_passed", pid=proc.pid)
                proc.kill()
        result = self.wait(10.0 if self._thread else 0.0)
        if result is None:  # never started, or a process that outlived SIGKILL (D state)
            result = SupervisorResult(SupervisorOutcome.PREEMPTED, self._restarts,
                                      reason="trainer did not exit after SIGKILL" if proc else "never started",
                                      killed=bool(proc and proc.killed))
        return result

    def _emit(self, event: object) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("supervisor_on_event_failed", event=type(event).__name__)

    def _run(self) -> None:
        try:
            result = self._loop()
        except Exception as exc:  # a bug here must still end in a result the lifecycle sees
            log.exception("supervisor_failed")
            result = SupervisorResult(SupervisorOutcome.GAVE_UP, self._restarts, reason=f"supervisor error: {exc}")
        self._result = result
        log.info("supervisor_done", outcome=result.outcome.value, restarts=result.restarts,
                 returncode=result.returncode, reason=result.reason, killed=result.killed)
        self._done.set()
        self._emit(SupervisorDone(result))

    def _loop(self) -> SupervisorResult:
        crashes_in_a_row = 0
        attempt = 0
        while True:
            with self._lock:
                if self._stop.is_set():
                    return SupervisorResult(SupervisorOutcome.PREEMPTED, self._restarts,
                                            reason="stopped before the trainer was (re)started")
                attempt += 1
                proc = self._current = self._factory()
                try:
                    proc.start()
                except TrainerError as exc:  # configuration: restarting cannot help
                    return SupervisorResult(SupervisorOutcome.GAVE_UP, self._restarts, reason=str(exc))
            if proc.pid is not None:
                self._emit(TrainerStarted(proc.pid, attempt))
            proc.wait(None)
            outcome = proc.outcome()
            self._emit(TrainerExited(proc.pid, proc.returncode, outcome, self._restarts))
            if outcome is Outcome.FINISHED and self._agent_stopping:
                log.warning("trainer_exit_during_agent_stop", pid=proc.pid, exit=describe_exit(proc))
                return SupervisorResult(SupervisorOutcome.PREEMPTED, self._restarts, proc.returncode,
                                        reason="exited while the agent was stopping")
            if outcome is Outcome.FINISHED:
                return SupervisorResult(SupervisorOutcome.FINISHED, self._restarts, 0,
                                        completion=proc.completion)
            if outcome is Outcome.PREEMPTED or self._stop.is_set():
                return SupervisorResult(SupervisorOutcome.PREEMPTED, self._restarts, proc.returncode,
                                        killed=proc.killed)
            if outcome is Outcome.STOPPED:
                log.warning("trainer_stopped_not_done", pid=proc.pid, exit=describe_exit(proc),
                            returncode=proc.returncode)
            ran_s = (proc.exited_at or 0.0) - (proc.started_at or proc.exited_at or 0.0)
            if ran_s >= self.healthy_after_s:
                crashes_in_a_row = 0
            crashes_in_a_row += 1
            reason = describe_exit(proc)
            if crashes_in_a_row > self.max_restarts:
                return SupervisorResult(
                    SupervisorOutcome.GAVE_UP, self._restarts, proc.returncode,
                    reason=f"trainer crashed {crashes_in_a_row} times in a row; last: {reason}")
            self._restarts += 1
            delay = min(self.backoff_s * 2 ** (crashes_in_a_row - 1), self.backoff_max_s)
            log.warning("trainer_restart_scheduled", reason=reason, delay_s=delay,
                        restarts=self._restarts, max_restarts=self.max_restarts)
            self._emit(TrainerRestartScheduled(delay, self._restarts, reason))
            if self._stop.wait(delay):
                return SupervisorResult(SupervisorOutcome.PREEMPTED, self._restarts, proc.returncode,
                                        reason="stopped during restart backoff")

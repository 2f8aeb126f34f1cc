"""How the agent judges a trainer's exit, and whom it sends SIGUSR1: real processes, real
signals, the protocol's real files (spotrun_trainer.protocol), as an unprivileged user.

Invariant 5: only success cancels, and success is a positive act. A signal, whoever sent it,
never finishes a job: an operator's ``kill``, ``systemctl kill``, a wrapper's OOM path.
"""
from __future__ import annotations

import io
import json
import os
import queue
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))

from testkit import wait_until  # noqa: E402
from trainer_procs import drain_events, procs, state_dir, sups, supervisor  # noqa: E402,F401
from trainer_procs import make as make_trainer  # noqa: E402

from spotrun import log  # noqa: E402
from spotrun.supervisor import (SupervisorOutcome, TrainerExited, TrainerRestartScheduled,  # noqa: E402
                                TrainerStarted)
from spotrun.trainerproc import Outcome, TrainerError, TrainerProcess, TrainerState  # noqa: E402
from spotrun_trainer import protocol  # noqa: E402


def protocol_files(state_dir: Path) -> dict:
    """What the lifecycle gives a trainer: the two files' paths, in its env and to the agent."""
    hello, done = state_dir / protocol.HELLO_FILE, state_dir / protocol.COMPLETION_FILE
    return {"env": {protocol.HELLO_ENV: str(hello), protocol.COMPLETION_ENV: str(done)},
            "hello_file": hello, "completion_file": done}


def make(state_dir, procs, mode, **kwargs) -> TrainerProcess:
    """The fixture trainer, given the protocol's two files as the lifecycle gives them."""
    return make_trainer(state_dir, procs, mode, **{**protocol_files(state_dir), **kwargs})


def ready(state_dir: Path, pid: int) -> None:
    wait_until(lambda: (state_dir / f"ready-{pid}").exists(), what=f"trainer {pid} ready")


def outside_signal(proc: TrainerProcess, sig: signal.Signals, target: str) -> None:
    """What an operator's kill (the pid) or `systemctl kill` (every process) does."""
    if target == "pid":
        os.kill(proc.pid, sig)
    else:
        os.killpg(proc.pid, sig)


# -- the outcome rules --------------------------------------------------------------------

@pytest.mark.parametrize("target", ["pid", "group"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
@pytest.mark.parametrize("mode", ["aware", "aware-term-exit0"])
def test_a_signal_from_outside_never_finishes_a_trainer(state_dir, procs, mode, sig, target):
    """aware-term-exit0 is SpotCheckpoint as it was: checkpoint, then exit 0 after SIGTERM."""
    proc = make(state_dir, procs, mode)
    proc.start()
    ready(state_dir, proc.pid)
    assert proc.hello() is not None and proc.speaks_protocol()
    outside_signal(proc, sig, target)
    assert proc.wait(10) is not None
    assert proc.outcome() in (Outcome.STOPPED, Outcome.CRASHED), (proc.returncode, proc.outcome())
    assert proc.completion is None
    if sig is signal.SIGTERM:  # it checkpointed and said "stopped, not done"
        assert proc.outcome() is Outcome.STOPPED
        assert proc.returncode == (0 if mode == "aware-term-exit0" else protocol.STOPPED_EXIT_CODE)
    if sig is signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL and proc.outcome() is Outcome.CRASHED


def test_finished_means_exit_0_and_a_completion_record_of_its_own(state_dir, procs):
    done = make(state_dir, procs, "aware-finish")
    done.start()
    assert done.wait(10) == 0 and done.outcome() is Outcome.FINISHED
    assert done.completion["metrics"] == {"loss": 0.5} and done.completion["pid"] == done.pid

    # The same record, now older than the next trainer: not that trainer's completion.
    later = make(state_dir, procs, "aware-exit0")
    later.start()
    assert later.wait(10) == 0
    assert (state_dir / protocol.COMPLETION_FILE).exists()
    assert later.outcome() is Outcome.STOPPED and later.completion is None

    stopped = make(state_dir, procs, "aware-stop")
    stopped.start()
    assert stopped.wait(10) == protocol.STOPPED_EXIT_CODE and stopped.outcome() is Outcome.STOPPED


def test_a_trainer_without_the_protocol_keeps_the_plain_rule(state_dir, procs):
    plain = make(state_dir, procs, "exit0")
    plain.start()
    assert plain.wait(10) == 0 and not plain.speaks_protocol()
    assert plain.outcome() is Outcome.FINISHED  # exit 0 without our stop request
    killed = make(state_dir, procs, "plain")
    killed.start()
    ready(state_dir, killed.pid)
    os.kill(killed.pid, signal.SIGTERM)
    assert killed.wait(10) == -signal.SIGTERM and killed.outcome() is Outcome.CRASHED
    # trainer.protocol = "none": the hello is not looked at; exit 0 is done.
    told_none = make(state_dir, procs, "aware-exit0", protocol="none")
    told_none.start()
    assert told_none.wait(10) == 0 and told_none.outcome() is Outcome.FINISHED


def test_protocol_spotrun_needs_the_record_even_without_a_hello(state_dir, procs):
    proc = make(state_dir, procs, "exit0", protocol="spotrun")
    proc.start()
    assert proc.wait(10) == 0 and proc.outcome() is Outcome.STOPPED
    with pytest.raises(TrainerError, match="trainer.protocol must be one of auto, spotrun, none"):
        make(state_dir, procs, "exit0", protocol="maybe")


def test_our_own_stop_stays_a_preemption_whatever_the_exit(state_dir, procs):
    proc = make(state_dir, procs, "aware")
    proc.start()
    ready(state_dir, proc.pid)
    assert proc.stop(time.monotonic() + 10) is Outcome.PREEMPTED
    assert proc.returncode == protocol.STOPPED_EXIT_CODE and not proc.killed


# -- SIGUSR1 only to a trainer that asked for it ------------------------------------------

def test_a_rebalance_sends_nothing_to_a_script_without_a_hello(state_dir, procs):
    # A hello left by an earlier trainer does not speak for this one.
    protocol.write_hello(state_dir / protocol.HELLO_FILE)
    proc = make(state_dir, procs, "plain")
    proc.start()
    ready(state_dir, proc.pid)
    assert proc.checkpoint_now() is False
    # Had SIGUSR1 been sent, it would have killed the script (-10), and pending with the
    # SIGTERM below it would still be delivered first (lower number).
    assert proc.stop(time.monotonic() + 10) is Outcome.PREEMPTED
    assert proc.returncode == -signal.SIGTERM


def test_sigusr1_goes_only_where_the_hello_lists_it(state_dir, procs):
    term_only = make(state_dir, procs, "hello-term-only")
    term_only.start()
    ready(state_dir, term_only.pid)
    assert term_only.hello() is not None and term_only.checkpoint_now() is False
    term_only.stop(time.monotonic() + 10)
    assert term_only.returncode == -signal.SIGTERM

    asked = make(state_dir, procs, "aware")
    asked.start()
    ready(state_dir, asked.pid)
    child_pid = state_dir / "child-pid"
    child = int(wait_until(lambda: child_pid.exists() and child_pid.read_text(), what="the child's pid"))
    ready(state_dir, child)
    assert asked.checkpoint_now() is True
    wait_until(lambda: all((state_dir / f"usr1-{p}").exists() for p in (asked.pid, child)),
               what="SIGUSR1 in the trainer and its child")
    assert asked.state is TrainerState.RUNNING
    assert asked.stop(time.monotonic() + 10) is Outcome.PREEMPTED


def test_protocol_none_never_sends_sigusr1(state_dir, procs):
    proc = make(state_dir, procs, "aware", protocol="none")
    proc.start()
    ready(state_dir, proc.pid)
    assert proc.hello() is None and proc.checkpoint_now() is False
    assert not list(state_dir.glob("usr1-*"))
    proc.stop(time.monotonic() + 10)


# -- the supervisor ----------------------------------------------------------------------

def supervise(sups, state_dir, modes, events, **kwargs):
    """A supervisor of fixture trainers given the protocol's files; -> (supervisor, made)."""
    return supervisor(sups, state_dir, modes, events, protocol_files(state_dir), **kwargs)


@pytest.mark.parametrize("target", ["pid", "group"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_an_outside_stop_is_restarted_and_the_job_finishes_later(state_dir, sups, sig, target):
    events = queue.Queue()
    sup, made = supervise(sups, state_dir, ["aware-term-exit0", "aware-finish"], events, max_restarts=3)
    sup.start()
    first = events.get(timeout=10)
    assert isinstance(first, TrainerStarted)
    ready(state_dir, first.pid)
    outside_signal(made[0], sig, target)
    result = sup.wait(20)
    assert result.outcome is SupervisorOutcome.FINISHED and result.restarts == 1
    assert result.completion["metrics"] == {"loss": 0.5}
    seen = drain_events(events)
    exits = [e for e in seen if isinstance(e, TrainerExited)]
    assert [e.outcome for e in exits][-1] is Outcome.FINISHED
    assert exits[0].outcome in (Outcome.STOPPED, Outcome.CRASHED)
    restart = next(e for e in seen if isinstance(e, TrainerRestartScheduled))
    assert ("stopped, not done" in restart.reason) == (sig is signal.SIGTERM), restart.reason


def test_a_loop_of_outside_stops_ends_in_the_failure_policy(state_dir, sups):
    """An OOM-killing wrapper that SIGTERMs the trainer at every start must not bill forever."""
    events = queue.Queue()
    sup, made = supervise(sups, state_dir, ["aware-stop"], events, max_restarts=2)
    sup.start()
    result = sup.wait(20)
    assert result.outcome is SupervisorOutcome.GAVE_UP and len(made) == 3
    assert "3 times in a row; last: exit code 75, stopped, not done" in result.reason


def test_an_exit_while_the_agent_itself_is_stopping_is_not_a_completion(state_dir, sups):
    """The shutdown race: systemd signals the whole unit at once; the agent's handler notes it
    before a trainer that exits 0 on SIGTERM (no protocol) can be taken as finished."""
    events = queue.Queue()
    sup, made = supervise(sups, state_dir, ["obey"], events)
    sup.start()
    first = events.get(timeout=10)
    ready(state_dir, first.pid)
    sup.note_agent_stopping()
    os.killpg(first.pid, signal.SIGTERM)
    result = sup.wait(20)
    assert made[0].returncode == 0 and made[0].outcome() is Outcome.FINISHED  # by the plain rule
    assert result.outcome is SupervisorOutcome.PREEMPTED and len(made) == 1


def test_the_log_names_an_outside_stop(state_dir, sups):
    out = io.StringIO()
    log.configure(stream=out)  # the suite's autouse fixture restores the default afterwards
    events = queue.Queue()
    sup, made = supervise(sups, state_dir, ["aware-stop"], events, max_restarts=0)
    sup.start()
    assert sup.wait(20).outcome is SupervisorOutcome.GAVE_UP
    lines = [json.loads(line[3:]) for line in out.getvalue().splitlines() if line.startswith("<4>{")]
    stopped = [e for e in lines if e.get("event") == "trainer_stopped_not_done"]
    assert stopped and stopped[0]["exit"] == "exit code 75, stopped, not done", lines

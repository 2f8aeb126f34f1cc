"""spotrun.trainerproc with real processes, a real unprivileged user and real signals."""
from __future__ import annotations

import grp
import json
import pwd
import queue
import signal
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))

from testkit import wait_until  # noqa: E402
from trainer_procs import USER, drain_events, procs, state_dir, sups, supervisor  # noqa: E402,F401
from trainer_procs import make as make_trainer  # noqa: E402

from spotrun.supervisor import (Supervisor, SupervisorDone, SupervisorOutcome, TrainerExited,  # noqa: E402
                                TrainerRestartScheduled, TrainerStarted)
from spotrun.trainerproc import (Outcome, TrainerError, TrainerProcess, TrainerState,  # noqa: E402
                                 TrainerStateError)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def make(state_dir, procs, mode, **kwargs) -> TrainerProcess:
    """The fixture trainer with the job's env unless the test gives its own."""
    kwargs.setdefault("env", {"SPOTRUN_JOB_ID": "job-1"})
    return make_trainer(state_dir, procs, mode, **kwargs)


def ready_pids(state_dir: Path, count: int) -> list[int]:
    files = wait_until(lambda: (lambda f: f if len(f) >= count else None)(sorted(state_dir.glob("ready-*"))),
                       what=f"{count} ready processes")
    return [int(f.name.split("-")[1]) for f in files]


def test_exit0_is_finished_as_the_user_with_a_clean_env(state_dir, procs, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "agent-only")
    monkeypatch.setenv("LANG", "C.UTF-8")
    proc = make(state_dir, procs, "exit0", path_prepend=["/opt/conda/envs/tf/bin"],
                env={"SPOTRUN_JOB_ID": "job-1", "SPOTRUN_CHECKPOINT_DIR": "/dltraining/checkpoints"},
                log_path=state_dir / "trainer.log")
    assert proc.state is TrainerState.CREATED
    proc.start()
    assert proc.wait(10) == 0
    assert proc.state is TrainerState.EXITED and proc.outcome() is Outcome.FINISHED
    seen = json.loads((state_dir / "env.json").read_text())
    account = pwd.getpwnam(USER)
    assert seen["uid"] == account.pw_uid and seen["gid"] == account.pw_gid
    expected_groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if USER in g.gr_mem}
    assert set(seen["groups"]) <= expected_groups  # the agent's own (root) groups are dropped
    assert seen["pgid"] == proc.pid and seen["sid"] == proc.pid  # its own session and group
    assert seen["cwd"] == str(state_dir)
    env = seen["env"]
    assert env["SPOTRUN_JOB_ID"] == "job-1" and env["SPOTRUN_CHECKPOINT_DIR"] == "/dltraining/checkpoints"
    assert env["PATH"].startswith("/opt/conda/envs/tf/bin:")
    assert env["HOME"] == account.pw_dir and env["USER"] == USER and env["LANG"] == "C.UTF-8"
    assert "AWS_SECRET_ACCESS_KEY" not in env  # the agent's environment does not leak
    assert "trainer says hello" in (state_dir / "trainer.log").read_text()


def test_output_goes_to_the_journal_stream_with_its_identifier(state_dir, procs):
    journal = state_dir / "journal.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(journal))
    server.listen(1)
    journal.chmod(0o777)
    try:
        proc = make(state_dir, procs, "exit0", journal_socket=str(journal), log_identifier="spotrun-trainer")
        proc.start()
        conn, _ = server.accept()
        with conn:
            received = b""
            while chunk := conn.recv(4096):
                received += chunk
        assert proc.wait(10) == 0
    finally:
        server.close()
    header, _, body = received.decode().partition("0\n0\n0\n")
    assert header == "spotrun-trainer\n\n6\n1\n"
    assert body == "trainer says hello\n"


def test_obeying_trainer_is_preempted_and_sigusr1_reaches_the_group(state_dir, procs):
    # trainer.protocol = "spotrun": SIGUSR1 without a hello (tests/agent/test_trainer_protocol.py
    # has the hello's cases).
    proc = make(state_dir, procs, "obey", protocol="spotrun")
    with pytest.raises(TrainerStateError):
        proc.request_stop()  # cannot drain before start
    proc.start()
    assert proc.state is TrainerState.RUNNING
    pids = ready_pids(state_dir, 2)
    child = int((state_dir / "child-pid").read_text())
    assert child in pids and proc.pid in pids
    assert proc.checkpoint_now()
    wait_until(lambda: all((state_dir / f"usr1-{p}").exists() for p in pids), what="SIGUSR1 in both")
    assert proc.state is TrainerState.RUNNING
    assert proc.request_stop()
    assert proc.state is TrainerState.DRAINING
    assert proc.wait(10) == 0
    assert proc.outcome() is Outcome.PREEMPTED and not proc.killed
    assert (state_dir / "checkpoint").read_text() == "saved"
    wait_until(lambda: not alive(child), what="the child to be gone")
    assert not proc.request_stop() and not proc.kill()  # after exit: nothing to signal


def test_trainer_ignoring_sigterm_is_killed_with_its_children(state_dir, procs):
    proc = make(state_dir, procs, "ignore-term")
    proc.start()
    ready_pids(state_dir, 2)
    child = int((state_dir / "child-pid").read_text())
    deadline = time.monotonic() + 0.5
    assert proc.stop(deadline) is Outcome.PREEMPTED
    assert time.monotonic() >= deadline
    assert proc.killed and proc.returncode == -signal.SIGKILL
    wait_until(lambda: not alive(child), what="the child (ignoring SIGTERM too) to be gone")


def test_children_left_behind_after_exit_are_killed(state_dir, procs):
    proc = make(state_dir, procs, "leave-child")
    proc.start()
    assert proc.wait(10) == 0 and proc.outcome() is Outcome.FINISHED
    child = int((state_dir / "child-pid").read_text())
    wait_until(lambda: not alive(child), what="the straggler to be gone")


def test_crash_and_start_errors(state_dir, procs):
    proc = make(state_dir, procs, "crash")
    proc.start()
    assert proc.wait(10) == 3 and proc.outcome() is Outcome.CRASHED
    missing = TrainerProcess(["/no/such/python"], user=USER, cwd=state_dir, env={})
    missing.start()
    assert missing.returncode == 127 and missing.outcome() is Outcome.CRASHED
    assert "cannot execute '/no/such/python'" in missing.start_error
    with pytest.raises(TrainerError, match="trainer.user 'no-such-user-x' does not exist"):
        TrainerProcess(["true"], user="no-such-user-x", cwd=state_dir, env={}).start()
    with pytest.raises(TrainerError, match="working directory /nonexistent does not exist"):
        TrainerProcess(["true"], user=USER, cwd=Path("/nonexistent"), env={}).start()
    with pytest.raises(TrainerStateError):
        proc.start()  # one process, one start


def test_supervisor_restarts_crashes_with_backoff_then_gives_up(state_dir, sups):
    events = queue.Queue()
    sup, made = supervisor(sups, state_dir, ["crash"], events, max_restarts=2)
    started = time.monotonic()
    sup.start()
    result = sup.wait(20)
    assert result.outcome is SupervisorOutcome.GAVE_UP
    assert result.restarts == 2 and len(made) == 3 and result.returncode == 3
    assert "crashed 3 times in a row; last: exit code 3" in result.reason
    assert time.monotonic() - started >= 0.05 + 0.1  # backoff doubled: 0.05, then 0.1
    seen = drain_events(events)
    delays = [e.delay_s for e in seen if isinstance(e, TrainerRestartScheduled)]
    assert delays == [0.05, 0.1]
    assert sum(isinstance(e, TrainerStarted) for e in seen) == 3
    assert isinstance(seen[-1], SupervisorDone) and seen[-1].result == result


def test_supervisor_crash_then_finish(state_dir, sups):
    events = queue.Queue()
    sup, made = supervisor(sups, state_dir, ["crash", "exit0"], events, max_restarts=3)
    sup.start()
    result = sup.wait(20)
    assert result.outcome is SupervisorOutcome.FINISHED and result.restarts == 1
    exits = [e for e in drain_events(events) if isinstance(e, TrainerExited)]
    assert [e.outcome for e in exits] == [Outcome.CRASHED, Outcome.FINISHED]


def test_supervisor_drain_while_running_and_kill_at_deadline(state_dir, sups):
    events = queue.Queue()
    sup, made = supervisor(sups, state_dir, ["ignore-term"], events, {"protocol": "spotrun"})
    sup.start()
    started = events.get(timeout=10)
    assert isinstance(started, TrainerStarted)
    ready_pids(state_dir, 2)
    assert sup.checkpoint_now()
    wait_until(lambda: (state_dir / f"usr1-{started.pid}").exists(), what="SIGUSR1")
    result = sup.drain(time.monotonic() + 0.3)
    assert result.outcome is SupervisorOutcome.PREEMPTED and result.killed
    assert len(made) == 1 and made[0].state is TrainerState.EXITED


def test_supervisor_drain_during_backoff_ends_at_once(state_dir, sups):
    events = queue.Queue()
    sup, made = supervisor(sups, state_dir, ["crash"], events, max_restarts=5, backoff_s=60.0, backoff_max_s=60.0)
    sup.start()
    wait_until(lambda: any(isinstance(e, TrainerRestartScheduled) for e in drain_events(events)) or None,
             what="a restart to be scheduled")
    begun = time.monotonic()
    result = sup.drain(time.monotonic() + 5)
    assert time.monotonic() - begun < 30.0  # not the 60 s backoff (half of it: a loaded machine is slow, not that slow)
    assert result.outcome is SupervisorOutcome.PREEMPTED
    assert result.reason == "stopped during restart backoff" and len(made) == 1


def test_supervisor_gives_up_on_a_configuration_error(state_dir, sups):
    events = queue.Queue()
    sup = Supervisor(lambda: TrainerProcess(["true"], user="no-such-user-x", cwd=state_dir, env={}),
                     on_event=events.put, max_restarts=3, backoff_s=0.01, backoff_max_s=0.01)
    sup.start()
    result = sup.wait(10)
    assert result.outcome is SupervisorOutcome.GAVE_UP and result.restarts == 0
    assert "trainer.user 'no-such-user-x' does not exist" in result.reason

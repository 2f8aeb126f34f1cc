"""Real trainer processes for the trainerproc and trainer-protocol tests: the fixture trainer
(tests/agent/fixtures/trainer.py) run as an unprivileged user, and fixtures that never leave a
trainer or a supervisor behind. Import the fixtures by name into a test module to use them."""
from __future__ import annotations

import os
import pwd
import queue
import time
from pathlib import Path

import pytest

from spotrun.supervisor import Supervisor
from spotrun.trainerproc import TrainerProcess, TrainerState

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "trainer.py"
PYTHON = "/usr/bin/python3"  # the venv's interpreter lives under /root, out of nobody's reach
AS_ROOT = os.geteuid() == 0
USER = "nobody" if AS_ROOT else pwd.getpwuid(os.geteuid()).pw_name


@pytest.fixture
def state_dir(shared_tmp):
    shared_tmp.chmod(0o777)  # the trainer's user writes here (its hello, records), not only traverses
    return shared_tmp


@pytest.fixture
def procs():
    started: list[TrainerProcess] = []
    yield started
    for proc in started:  # never leave a trainer behind, whatever the test did
        if proc.state in (TrainerState.RUNNING, TrainerState.DRAINING):
            proc.kill()
            proc.wait(10)


@pytest.fixture
def sups():
    made: list[Supervisor] = []
    yield made
    for sup in made:  # stop any supervisor a failed test left running, and its trainer
        sup.drain(time.monotonic())


def make(state_dir: Path, procs: list, mode: str, **kwargs) -> TrainerProcess:
    """The fixture trainer in ``mode``, as USER in ``state_dir`` (not started)."""
    proc = TrainerProcess([PYTHON, str(FIXTURE), mode, str(state_dir)], user=USER, cwd=state_dir, **kwargs)
    procs.append(proc)
    return proc


def supervisor(sups: list, state_dir: Path, modes: list[str], events: queue.Queue,
               proc_kwargs: dict | None = None, **kwargs):
    """A supervisor whose factory hands out fixture trainers in the given modes (the last one
    repeats), each made with ``proc_kwargs`` (default: an empty env); -> (supervisor, made)."""
    made: list[TrainerProcess] = []

    def factory():
        mode = modes[min(len(made), len(modes) - 1)]
        proc = TrainerProcess([PYTHON, str(FIXTURE), mode, str(state_dir)], user=USER, cwd=state_dir,
                              **{"env": {}, **(proc_kwargs or {})})
        made.append(proc)
        return proc

    kwargs.setdefault("backoff_s", 0.05)
    kwargs.setdefault("backoff_max_s", 0.2)
    sups.append(Supervisor(factory, on_event=events.put, **kwargs))
    return sups[-1], made


def drain_events(events: queue.Queue) -> list:
    out = []
    while True:
        try:
            out.append(events.get_nowait())
        except queue.Empty:
            return out

"""The trainer side of the agent ↔ trainer protocol: how a trainer says "I speak the protocol"
and "I have finished", and how it says "I was stopped, not done".

Standard library only: the agent imports this module to read what the trainer wrote.

- **Hello** (``$SPOTRUN_PROTOCOL_FILE``): written when training starts by a trainer that
  handles the agent's signals (``SIGTERM`` = checkpoint and exit, ``SIGUSR1`` = checkpoint and
  go on). The agent sends ``SIGUSR1`` only to a trainer whose hello is newer than its start:
  Python's default action for ``SIGUSR1`` kills a script that does not handle it.
- **Completion record** (``$SPOTRUN_COMPLETION_FILE``): written, fsynced and renamed into place
  after the last step (and the final checkpoint) of a run that was not stopped by a signal.
  For a trainer that said hello, exit status 0 *and* a completion record newer than its start
  is "finished"; anything else is not, so a signal, whoever sent it, can never complete a job.
- **Stopped, not done**: a trainer stopped by a signal exits with ``STOPPED_EXIT_CODE`` (75,
  ``EX_TEMPFAIL``: "try again later") after its checkpoint is durable, and removes any
  completion record an earlier ``fit`` of the same process wrote.

A script that knows nothing of this (the seed's own, say) writes neither file; for it the
agent keeps the plain rule: exit 0 without having been signalled is done, death by a signal
is not.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Union

from .jsonfile import write_json_atomic

PROTOCOL_VERSION = 1
HELLO_ENV = "SPOTRUN_PROTOCOL_FILE"
COMPLETION_ENV = "SPOTRUN_COMPLETION_FILE"
# Names the agent gives those files, in the checkpoints directory.
HELLO_FILE = ".spotrun-trainer.json"
COMPLETION_FILE = ".spotrun-trainer-completed.json"
STOPPED_EXIT_CODE = 75
HANDLED_SIGNALS = ("SIGTERM", "SIGUSR1")

PathLike = Union[str, os.PathLike]


def _write_atomic(path: Path, data: dict, *, fsync: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, data, fsync=fsync)


def hello_path() -> Path | None:
    """Where to announce the protocol: ``$SPOTRUN_PROTOCOL_FILE``; None outside the agent."""
    named = os.environ.get(HELLO_ENV)
    return Path(named) if named else None


def completion_path(default_dir: PathLike | None = None) -> Path | None:
    """``$SPOTRUN_COMPLETION_FILE``, else ``<default_dir>/.spotrun-trainer-completed.json``."""
    named = os.environ.get(COMPLETION_ENV)
    if named:
        return Path(named)
    return Path(default_dir) / COMPLETION_FILE if default_dir is not None else None


def write_hello(path: PathLike, *, handles: tuple[str, ...] = HANDLED_SIGNALS, **fields: Any) -> None:
    """Announce that this process speaks the protocol (not fsynced: it is about this boot)."""
    _write_atomic(Path(path), {"protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                               "handles": list(handles), "time": time.time(), **fields},
                  fsync=False)


def write_completion(path: PathLike, **fields: Any) -> None:
    """The positive act of finishing: durable before the trainer exits 0."""
    _write_atomic(Path(path), {"protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                               "time": time.time(), **fields}, fsync=True)


def withdraw_completion(path: PathLike) -> None:
    """A stop by a signal after an earlier ``fit`` of this process finished: not done."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _read_fresh(path: PathLike, since: float | None) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("protocol") != PROTOCOL_VERSION:
        return None
    written = data.get("time")
    if not isinstance(written, (int, float)):
        return None
    if since is not None and written < since:
        return None  # an earlier trainer's (the previous instance's, or one that crashed)
    return data


def read_hello(path: PathLike, since: float | None = None) -> dict | None:
    """The hello written at or after ``since`` (a wall-clock time), else None."""
    return _read_fresh(path, since)


def read_completion(path: PathLike, since: float | None = None) -> dict | None:
    """The completion record written at or after ``since``, else None."""
    return _read_fresh(path, since)

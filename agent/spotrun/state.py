"""The agent's state file (a report for `spotrun status`, never the source of truth) and the
clean-up of a trainer left behind by a previous agent process.
"""
from __future__ import annotations

import json
import os
import signal
from datetime import datetime, timezone
from pathlib import Path

from spotrun.log import get_logger
from spotrun.waiting import wait_until
from spotrun_trainer.store import write_json_atomic

log = get_logger("state")

# A trainer left by a crashed agent gets this long to checkpoint on SIGTERM before SIGKILL.
LEFTOVER_TRAINER_GRACE_S = 30.0


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None.

    With the pid it identifies a process even after pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


class StateFile:
    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write(self, data: dict) -> None:
        data = dict(data, updated=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        trainer = data.get("trainer")
        if trainer and trainer.get("pid"):
            trainer["start_ticks"] = process_start_ticks(trainer["pid"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A report, rewritten on every phase change: atomic, but not worth an fsync.
        write_json_atomic(self.path, json.loads(json.dumps(data, default=str)), fsync=False)


def kill_leftover_trainer(previous_state: dict, grace_s: float = LEFTOVER_TRAINER_GRACE_S) -> bool:
    """A trainer whose agent died (SIGKILL, OOM) must not run beside the one we start next:
    two trainers would write the same checkpoint directory. Ask it to checkpoint and stop."""
    trainer = previous_state.get("trainer") or {}
    pid, ticks = trainer.get("pid"), trainer.get("start_ticks")
    if not pid or ticks is None or process_start_ticks(pid) != ticks:
        return False
    log.warning("leftover_trainer_found", pid=pid)
    try:
        os.killpg(pid, signal.SIGTERM)  # the trainer leads its own process group
    except ProcessLookupError:
        return False
    try:  # not our child: no wait() is possible, so poll its /proc entry
        wait_until(lambda: process_start_ticks(pid) != ticks, grace_s, interval_s=0.1,
                   what=f"leftover trainer {pid} to stop")
    except TimeoutError:
        pass
    if process_start_ticks(pid) == ticks:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    log.info("leftover_trainer_stopped", pid=pid)
    return True

"""Small JSON files written atomically: a temporary file in the same directory, then rename.

Standard library only, like the store (the agent imports both).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Union


def fsync_dir(path: Union[str, os.PathLike]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Union[str, os.PathLike], data: Any, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` as JSON: temp file in the same dir, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, sort_keys=True)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def write_progress(path: Union[str, os.PathLike], *, global_step: int, epoch: int = 0,
                   epochs: int | None = None, step: int | None = None,
                   steps_per_epoch: int | None = None,
                   last_checkpoint_time: float | None = None,
                   metrics: dict | None = None) -> None:
    """The progress record the agent reads from ``$SPOTRUN_PROGRESS_FILE`` (its status line,
    the volume's progress tag, the step a drain reached, the learning curves it publishes).
    A report, rewritten often: atomic but not fsynced. ``time`` is when it was written: the
    agent ignores a record older than the trainer it supervises. ``metrics``: the latest
    values Keras logged (loss, accuracy, val_*), finite numbers only."""
    record = {
        "epoch": epoch, "epochs": epochs, "step": global_step if step is None else step,
        "steps_per_epoch": steps_per_epoch, "global_step": global_step, "time": time.time(),
        "last_checkpoint_time": last_checkpoint_time}
    numbers = finite_metrics(metrics or {})
    if numbers:
        record["metrics"] = numbers
    write_json_atomic(path, record, fsync=False)


def finite_metrics(logs: dict) -> dict:
    """``logs`` with only the finite numbers, as floats (tensors and numpy scalars too)."""
    out = {}
    for name, value in logs.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if isinstance(name, str) and number == number and abs(number) != float("inf"):
            out[name] = number
    return out

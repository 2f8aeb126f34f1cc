"""What the trainer says about itself, read back for the reports (systemd STATUS=, the state
file, the volume's progress tag): its progress file, the newest verified checkpoint."""
from __future__ import annotations

import json
import time
from pathlib import Path

from spotrun import tags as T
from spotrun.log import get_logger

PROGRESS_FILE = ".spotrun-progress.json"  # in the checkpoints directory, written by the trainer

log = get_logger("lifecycle")


def read_progress(checkpoints: Path, trainer_started_wall: float | None) -> dict:
    """The current trainer's progress; {} until it has written the file. Before that the file
    on the volume is an earlier trainer's (the previous instance's, or one that crashed) and
    says nothing about how far this one got."""
    try:
        data = json.loads((checkpoints / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    written = data.get("time")
    if trainer_started_wall is not None and isinstance(written, (int, float)) \
            and written < trainer_started_wall:
        return {}
    return data


def latest_checkpoint(checkpoints: Path) -> dict:
    """Step and time of the newest verified spotrun checkpoint on the volume ({} if none).

    Scripts that keep their own checkpoints (the seed's, say) have none here: that is fine."""
    try:
        from spotrun_trainer.store import CheckpointStore

        checkpoint = CheckpointStore(checkpoints).latest_valid()
    except Exception as exc:  # a report: an incompatible or unreadable store is the trainer's call
        log.warning("checkpoint_unreadable", error=str(exc))
        return {}
    if checkpoint is None:
        return {}
    return {"checkpoint_step": checkpoint.step, "checkpoint_time": checkpoint.manifest.get("time")}


def epoch_step(progress: dict) -> str:
    """"epoch 3/10, step 120/390": how far a trainer got, the totals where known, "?" for an
    epoch not reported; "" when the record says neither. One wording for every report (the
    agent's systemd STATUS=, ``spotrun status`` and a sweep's rows)."""
    if not isinstance(progress, dict):
        return ""
    epoch, step = progress.get("epoch"), progress.get("step")
    if epoch is None and step is None:
        return ""
    text = f"epoch {'?' if epoch is None else epoch}" + (
        f"/{progress['epochs']}" if progress.get("epochs") else "")
    if step is not None:
        text += f", step {step}" + (
            f"/{progress['steps_per_epoch']}" if progress.get("steps_per_epoch") else "")
    return text


def training_status(progress: dict) -> str | None:
    """"training epoch 3/10, step 120, last checkpoint 12 s ago" (None without progress)."""
    if not progress:
        return None
    parts = [" ".join(filter(None, ("training", epoch_step(progress))))]
    when = progress.get("last_checkpoint_time")
    if isinstance(when, (int, float)):
        parts.append(f"last checkpoint {max(0.0, time.time() - float(when)):.0f} s ago")
    return ", ".join(parts)


def progress_tag(progress: dict) -> str:
    keep = {k: progress[k] for k in ("epoch", "epochs", "step", "global_step", "last_checkpoint_time")
            if k in progress}
    return json.dumps(keep, separators=(",", ":"))[:T.MAX_VALUE]

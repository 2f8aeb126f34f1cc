"""Is this mounted volume the job's? The marker file written on first use (job id and
generation) and, after a migration, the newest checkpoint readable: the proof that the copy
holds the job's data before its source may be deleted (invariant 2)."""
from __future__ import annotations

import json
from datetime import datetime, timezone

from spotrun.config import Config
from spotrun.errors import SpotrunError
from spotrun.log import get_logger
from spotrun_trainer.store import write_json_atomic

MARKER = ".spotrun-volume.json"
MARKER_FORMAT = 1


log = get_logger("volumes")


class VolumeError(SpotrunError):
    """The job's volume cannot be used; the message names the volume and what is wrong."""


def verify_volume(config: Config, volume_id: str, generation: int, *, migrated: bool,
                  marker_expected: bool, dataset_snapshot: str = "") -> None:
    """Check (and on first use write) the marker; after a migration, the latest checkpoint.
    ``marker_expected`` is false on first use and for a copy of a volume spotrun never
    mounted: its source had no marker, so the copy's first use writes one.
    ``dataset_snapshot``: the first use of a volume made from the sweep's dataset snapshot,
    which must hold the dataset only (no job's marker, no checkpoints to resume from)."""
    marker = config.mount_point / MARKER
    if dataset_snapshot:
        check_dataset_only(config, volume_id, dataset_snapshot)
    if marker.exists():
        try:
            data = json.loads(marker.read_text())
            job = data["job"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VolumeError(f"volume {volume_id}: {marker} is unreadable ({exc})") from None
        if job != config.job.id:
            raise VolumeError(f"volume {volume_id} is tagged for job {config.job.id!r} "
                              f"but its {marker} says job {job!r}; not using it")
    elif marker_expected:
        raise VolumeError(f"volume {volume_id} (migrated) has no {marker}: the copy is not "
                          f"the job's data; the source volume is kept")
    else:
        data = {"job": config.job.id, "format": MARKER_FORMAT,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if migrated:
        verify_latest_checkpoint(config, volume_id)
    if data.get("generation") != generation or not marker.exists():
        data["generation"] = generation
        write_json_atomic(marker, data)
    log.info("volume_verified", volume_id=volume_id, generation=generation, migrated=migrated)


def check_dataset_only(config: Config, volume_id: str, snapshot_id: str) -> None:
    """A sweep's dataset volume is the seed's: a filesystem with the datasets directory. A
    marker or checkpoints on it would make every experiment another job's continuation."""
    checkpoints = config.checkpoints_path
    found = [str(p) for p in (config.mount_point / MARKER,) if p.exists()]
    if checkpoints.is_dir():
        found += [str(p) for p in sorted(checkpoints.iterdir())[:3]]
    if found:
        raise VolumeError(
            f"volume {volume_id} was made from the sweep's dataset snapshot {snapshot_id}, which "
            f"holds more than a dataset ({', '.join(found)}): sweep.dataset_volume must hold the "
            "datasets directory only. Fix that volume, delete the snapshot (spotrun teardown "
            "--delete-snapshots) and the experiments' volumes made from it, and run spotrun init "
            "again")


def verify_latest_checkpoint(config: Config, volume_id: str) -> None:
    try:
        from spotrun_trainer.store import CheckpointError, CheckpointStore, IncompatibleCheckpoint
    except ImportError:  # the trainer library is not installed with this agent
        log.warning("checkpoint_verify_skipped", reason="spotrun_trainer not importable")
        return
    store = CheckpointStore(config.checkpoints_path)
    if not store.list():
        return
    try:
        latest = store.latest_valid()
    except IncompatibleCheckpoint as exc:  # readable, by another library version
        log.warning("checkpoint_other_format", reason=str(exc))
        return
    except CheckpointError as exc:
        latest = None
        log.warning("checkpoint_unreadable", reason=str(exc))
    if latest is None:
        raise VolumeError(f"volume {volume_id} (migrated): no checkpoint under "
                          f"{config.checkpoints_path} verifies; the source volume is kept")
    log.info("checkpoint_verified", step=latest.step, path=str(latest.path))

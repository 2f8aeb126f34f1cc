"""The job's volume decision and the journaled, resumable cross-AZ migration.

The journal is the tags, written atomically with each resource (TagSpecifications) or
right after a step, so whoever comes next (this agent restarted, or an instance in a third
AZ) reads the same state from EC2 and continues:

- source volume S (generation g, ``spotrun:mounts`` = m, bumped before every mount)
- snapshot of S tagged ``spotrun:source-volume`` = S and ``spotrun:mounts`` = m: it is
  *fresh* (holds S's latest data) while S's mounts tag is still m. A drain snapshot made
  ahead of need by ``release()`` is such a snapshot, so a replacement reuses it.
- new volume N in this AZ, tagged at creation with ``spotrun:source-volume`` = S,
  generation g+1, ``spotrun:create-token`` (derived from S, m and the AZ: one volume per
  migration attempt, whoever retries) and ``spotrun:migration-step``; after N is attached,
  mounted and its marker and latest checkpoint verified, the step becomes ``verified`` —
  only then is S deleted (invariant 2) — and ``done``.

Reading it back (:func:`resolve`): one volume is the job's volume. Several are only
accepted when they are one source and its migrated copies; a verified copy is the job's
volume (the source is a leftover), otherwise the source is, and unverified copies that are
not this attempt's are leftovers (they never held training writes: training starts only
after the migration completes). Anything else is an error that touches nothing.

Plans go stale: :func:`delete_volume` re-reads the volume right before deleting it and raises
:class:`StalePlan` (plan again) if its journal changed or it is attached. ``guard`` (the
lease's fencing check) runs right before every mutating call.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable

from spotrun import ec2 as ec2mod
from spotrun import snapshots
from spotrun import tags as T
from spotrun.crashpoints import crashpoint, pausepoint
from spotrun.errors import SpotrunError
from spotrun.log import get_logger


log = get_logger("migration")


# Journal tag keys (volumes.py and the lead's lifecycle read them through this module).
SOURCE_VOLUME = "spotrun:source-volume"
# On a copy: the source's mount count when copied (mounted since, the source is newer).
SOURCE_MOUNTS = "spotrun:source-mounts"
STEP = "spotrun:migration-step"
CREATE_TOKEN = "spotrun:create-token"
MOUNTS = "spotrun:mounts"
MOUNT_STATE = "spotrun:mount-state"  # "clean" after a clean unmount, else "mounted:<instance>"
ORIGIN = "spotrun:origin"
CREATED_EMPTY = {ORIGIN: "created-empty"}  # the agent made it as the job's first volume
# ... from volume.source_snapshot (a sweep's dataset snapshot): the dataset, nothing else.
FROM_DATASET = {ORIGIN: "dataset-snapshot"}
CLEAN = "clean"

ROLE_VOLUME = "volume"
ROLE_MIGRATION_SNAPSHOT = "migration-snapshot"
ROLE_DRAIN_SNAPSHOT = "drain-snapshot"
ROLE_DATASET_SNAPSHOT = T.DATASET_SNAPSHOT_ROLE  # the sweep's, never the agent's to delete

STEP_CREATED = "created"
STEP_ATTACHED = "attached"
STEP_MOUNTED = "mounted"
STEP_VERIFIED = "verified"
STEP_DONE = "done"
PROVEN_STEPS = (STEP_VERIFIED, STEP_DONE)

_GONE_STATES = ("deleting", "deleted")
# Tags never copied from the source to its migrated copy.
_NOT_COPIED = {SOURCE_VOLUME, SOURCE_MOUNTS, STEP, CREATE_TOKEN, MOUNTS, MOUNT_STATE,
               T.GENERATION, ORIGIN, snapshots.FRESH_SNAPSHOT, snapshots.SNAPSHOT_INTENT}
# What a decision about a volume rests on: if any differs when it is re-read, replan.
JOURNAL_KEYS = (STEP, T.GENERATION, MOUNTS, SOURCE_VOLUME)

Guard = Callable[[], None]


def _no_guard() -> None:
    return None


def _no_stop(where: str) -> None:
    return None


class VolumeDecisionError(SpotrunError):
    """The job's volumes are in a shape spotrun will not guess about."""


class StalePlan(SpotrunError):
    """What a plan was made from changed before it was acted on: plan again."""


def changes(planned: dict, fresh: dict) -> list[str]:
    """The journal tags of ``planned`` that ``fresh`` (the same volume, re-read) no longer has."""
    before, now = tags_of(planned), tags_of(fresh)
    return [f"{k} {before.get(k, '-')} -> {now.get(k, '-')}" for k in JOURNAL_KEYS
            if before.get(k) != now.get(k)]


@dataclass
class Plan:
    current: dict  # the volume that holds the job's data now
    source: dict | None = None  # when ``current`` is a verified copy: the source still there
    unverified: list[dict] = field(default_factory=list)  # copies of ``current`` not proven


def tags_of(resource: dict) -> dict[str, str]:
    return T.as_dict(resource.get("Tags"))


def generation(resource: dict) -> int:
    value = tags_of(resource).get(T.GENERATION, "1")
    try:
        return int(value)
    except ValueError:
        raise VolumeDecisionError(f"{resource.get('VolumeId', resource.get('SnapshotId'))}: "
                                  f"tag {T.GENERATION}={value!r} is not a number") from None


def mounts(volume: dict) -> int:
    try:
        return int(tags_of(volume).get(MOUNTS, "0"))
    except ValueError:
        return 0


def never_used(volume: dict) -> bool:
    """Made by an agent as the job's first volume and never mounted since: there is nothing
    on it to carry to another AZ. Made empty, or from the sweep's dataset snapshot (which a
    boot anywhere else makes its own volume from). (A volume the operator created may hold
    data put there by hand; one restored from another snapshot holds the snapshot's.)"""
    if mounts(volume) != 0:
        return False
    origin = tags_of(volume).get(ORIGIN)
    if origin == CREATED_EMPTY[ORIGIN]:
        return not volume.get("SnapshotId")
    return origin == FROM_DATASET[ORIGIN] and bool(volume.get("SnapshotId"))


def token(*parts: str) -> str:
    """An idempotency token (EC2 ClientToken: at most 64 ASCII characters)."""
    return "spotrun-" + hashlib.sha256("/".join(parts).encode()).hexdigest()[:40]


def _describe(volumes: list[dict]) -> str:
    return "; ".join(
        f"{v['VolumeId']} ({v['AvailabilityZone']}, {v['State']}, generation "
        f"{tags_of(v).get(T.GENERATION, '?')}, source {tags_of(v).get(SOURCE_VOLUME, '-')})"
        for v in volumes)


def resolve(volumes: list[dict]) -> Plan | None:
    """The job's volume decision from its tagged volumes (see the module docstring)."""
    live = [v for v in volumes if v["State"] not in _GONE_STATES]
    broken = [v for v in live if v["State"] == "error"]
    if broken:
        raise VolumeDecisionError(
            f"job volume {broken[0]['VolumeId']} is in state 'error' (EC2 could not create or "
            f"restore it); nothing was changed. Inspect it, restore from a snapshot of the job if "
            f"needed, and delete or untag it. All: {_describe(live)}")
    if not live:
        return None
    if len(live) == 1:
        return Plan(current=live[0])
    by_id = {v["VolumeId"]: v for v in live}
    roots = [v for v in live if tags_of(v).get(SOURCE_VOLUME) not in by_id]
    copies = [v for v in live if tags_of(v).get(SOURCE_VOLUME) in by_id]
    if len(roots) != 1 or any(tags_of(c)[SOURCE_VOLUME] != roots[0]["VolumeId"] for c in copies):
        raise VolumeDecisionError(
            "several volumes carry this job's tags and no migration journal links them, so "
            f"spotrun will not guess which holds the data; nothing was changed: {_describe(live)}. "
            "Keep the right one and delete or untag the others.")
    root = roots[0]
    for copy in copies:
        if generation(copy) != generation(root) + 1:
            raise VolumeDecisionError(
                f"volume {copy['VolumeId']} says it was migrated from {root['VolumeId']} but its "
                f"generation is not the next one; nothing was changed: {_describe(live)}")
    proven = [c for c in copies if tags_of(c).get(STEP) in PROVEN_STEPS]
    if len(proven) > 1:
        raise VolumeDecisionError(f"two verified copies of {root['VolumeId']}; nothing was "
                                  f"changed: {_describe(live)}")
    if proven:
        others = [c for c in copies if c is not proven[0]]
        return Plan(current=proven[0], source=root, unverified=others)
    return Plan(current=root, unverified=copies)


# -- snapshots ----------------------------------------------------------------------------

def job_snapshots(ec2, job_id: str, **tag_filters: str) -> list[dict]:
    filters = T.job_filters(job_id)
    filters += [{"Name": f"tag:{k}", "Values": [v]} for k, v in tag_filters.items()]
    found = []
    for page in ec2.get_paginator("describe_snapshots").paginate(OwnerIds=["self"], Filters=filters):
        found += page["Snapshots"]
    return found


def fresh_snapshot(ec2, job_id: str, volume: dict, settle_s: float = 0.0) -> dict | None:
    """A snapshot of ``volume`` made since its last mount (pending or completed), if any:
    listed, or recorded on the volume (looked up by id for ``settle_s``: EC2 may not list a
    snapshot made seconds ago)."""
    candidates = [s for s in job_snapshots(ec2, job_id, **{SOURCE_VOLUME: volume["VolumeId"],
                                                           MOUNTS: str(mounts(volume))})
                  if s["State"] in ("pending", "completed")]
    # Prefer a completed one, then the oldest (the one kept when duplicates are found).
    candidates.sort(key=lambda s: (s["State"] != "completed", s["StartTime"], s["SnapshotId"]))
    if candidates:
        return candidates[0]
    return snapshots.recorded(ec2, volume, mounts(volume), settle_s=settle_s)


def snapshot_tags(job_id: str, volume: dict, role: str) -> dict[str, str]:
    vt = tags_of(volume)
    return {
        T.NAME: f"{vt.get(T.NAME, 'spotrun')} {role} of {volume['VolumeId']}",
        T.JOB: job_id, T.ROLE: role, SOURCE_VOLUME: volume["VolumeId"],
        T.GENERATION: str(generation(volume)), MOUNTS: str(mounts(volume)),
        MOUNT_STATE: vt.get(MOUNT_STATE, CLEAN),
        CREATE_TOKEN: token("snapshot", volume["VolumeId"], str(mounts(volume))),
    }


def start_snapshot(ec2, ec2_once, job_id: str, volume: dict, role: str, *,
                   guard: Guard = _no_guard, window_s: float = ec2mod.CONSISTENCY_WINDOW_S,
                   optional: bool = False) -> dict | None:
    """Start (or find, if a previous try got that far) the snapshot of ``volume``'s current
    data: exactly one (see :mod:`spotrun.snapshots`). ``optional`` (the drain's snapshot):
    None rather than risk a second one or the drain's time."""
    tags = snapshot_tags(job_id, volume, role)

    def with_token() -> list[dict]:
        return job_snapshots(ec2, job_id, **{CREATE_TOKEN: tags[CREATE_TOKEN]})

    existing = fresh_snapshot(ec2, job_id, volume,
                              settle_s=min(window_s, snapshots.OPTIONAL_SETTLE_S))
    if existing is None and not optional:
        # An earlier holder's snapshot that it began and did not record. Not in a drain
        # (optional): its two minutes are worth more than a duplicate, which is pruned.
        existing = snapshots.await_begun(
            volume, mounts(volume), window_s, guard=guard,
            listed=lambda: next((s for s in with_token()
                                 if s["State"] in ("pending", "completed")), None))
    if existing is not None:
        log.info("snapshot_reused", snapshot_id=existing["SnapshotId"], volume_id=volume["VolumeId"],
                 state=existing["State"])
        return existing
    params = {"VolumeId": volume["VolumeId"], "Description": tags[T.NAME][:255],
              "TagSpecifications": [{"ResourceType": "snapshot", "Tags": T.as_list(tags)}]}

    stated: list[bool] = []

    def state_intent() -> None:
        if not stated:  # once: a retried create is the same snapshot
            snapshots.record_intent(ec2, volume["VolumeId"], mounts(volume), guard=guard)
            stated.append(True)

    snapshot = snapshots.create_exactly_once(
        ec2_once, what=f"snapshot of {volume['VolumeId']}", params=params, with_token=with_token,
        window_s=window_s, optional=optional, guard=guard, before_create=state_intent)
    if snapshot is None:
        return None
    log.info("snapshot_started", snapshot_id=snapshot["SnapshotId"], volume_id=volume["VolumeId"],
             role=role)
    kept = snapshots.keep_one(ec2, with_token() or [snapshot], guard=guard) or snapshot
    snapshots.record_on_volume(ec2, volume["VolumeId"], kept["SnapshotId"], mounts(volume),
                               guard=guard)
    return kept


# -- the migration steps ------------------------------------------------------------------

def migrate_here(ec2, ec2_once, config, identity, source: dict, *, deadline_create_s: float,
                 guard: Guard = _no_guard, safe_point: Callable[[str], None] = _no_stop) -> dict:
    """Snapshot ``source`` and make its copy in this AZ; returns the new volume, available.

    Resumable: a fresh snapshot and a volume with this attempt's create token are reused.
    ``safe_point`` (it may raise to stop here: spotrun.boot) runs only where the journal is
    whole: after a step's resource exists with its tags, and between polls of the waits.
    """
    pausepoint("migration.started")
    job_id = config.job.id
    log.info("migration_start", source_volume=source["VolumeId"],
             source_az=source["AvailabilityZone"], target_az=identity.availability_zone,
             generation=generation(source))
    window = config.aws.consistency_window_s
    snapshot = start_snapshot(ec2, ec2_once, job_id, source, ROLE_MIGRATION_SNAPSHOT, guard=guard,
                              window_s=window)
    crashpoint("migration.snapshot_requested")
    safe_point("migration.snapshot_requested")
    snapshot = ec2mod.wait_for_snapshot(ec2, snapshot["SnapshotId"], config.volume.snapshot_timeout_s,
                                        missing_ok_s=window, safe_point=safe_point)
    # Duplicates (a create that answered 5xx, then a lookup EC2 had not caught up with): one
    # is kept, the oldest completed, and the volume is made from that one.
    snapshot = snapshots.keep_one(ec2, job_snapshots(ec2, job_id, **{
        CREATE_TOKEN: tags_of(snapshot)[CREATE_TOKEN]}) if CREATE_TOKEN in tags_of(snapshot)
        else [snapshot], guard=guard) or snapshot
    log.info("snapshot_completed", snapshot_id=snapshot["SnapshotId"])
    crashpoint("migration.snapshot_completed")
    safe_point("migration.snapshot_completed")
    create_token = token("migrate", source["VolumeId"], str(mounts(source)),
                         identity.availability_zone)
    tags = {k: v for k, v in tags_of(source).items()
            if not k.startswith("aws:") and k not in _NOT_COPIED}
    tags.update({T.JOB: job_id, T.ROLE: ROLE_VOLUME, T.GENERATION: str(generation(source) + 1),
                 SOURCE_VOLUME: source["VolumeId"], SOURCE_MOUNTS: str(mounts(source)),
                 STEP: STEP_CREATED, CREATE_TOKEN: create_token,
                 MOUNTS: "0", MOUNT_STATE: tags_of(snapshot).get(MOUNT_STATE, CLEAN)})
    params = {
        "AvailabilityZone": identity.availability_zone, "SnapshotId": snapshot["SnapshotId"],
        "VolumeType": source["VolumeType"], "Size": source["Size"],
        "ClientToken": create_token,
        "TagSpecifications": [{"ResourceType": "volume", "Tags": T.as_list(tags)}],
    }
    if source["VolumeType"] in ("io1", "io2", "gp3") and source.get("Iops"):
        params["Iops"] = source["Iops"]
    if source["VolumeType"] == "gp3" and source.get("Throughput"):
        params["Throughput"] = source["Throughput"]
    if source.get("Encrypted"):
        params["Encrypted"] = True
        if source.get("KmsKeyId"):
            params["KmsKeyId"] = source["KmsKeyId"]

    def find() -> dict | None:
        found = ec2.describe_volumes(Filters=T.job_filters(job_id) + [
            {"Name": f"tag:{CREATE_TOKEN}", "Values": [create_token]}])["Volumes"]
        return next((v for v in found if v["State"] not in _GONE_STATES), None)

    def create() -> dict:
        guard()
        return ec2_once.create_volume(**params)

    created = ec2mod.create_once(f"volume from {snapshot['SnapshotId']}", create, find)
    log.info("migration_volume_created", new_volume=created["VolumeId"],
             snapshot_id=snapshot["SnapshotId"], az=identity.availability_zone)
    volume = ec2mod.wait_for_volume(ec2, created["VolumeId"], ("available", "in-use"),
                                    deadline_create_s, missing_ok_s=window, safe_point=safe_point)
    crashpoint("migration.volume_created")
    safe_point("migration.volume_created")
    return volume


def this_attempts_token(source: dict, az: str) -> str:
    return token("migrate", source["VolumeId"], str(mounts(source)), az)


def set_step(ec2, volume_id: str, step: str, *, guard: Guard = _no_guard, **extra: str) -> None:
    guard()
    tags = {STEP: step, **extra}
    ec2mod.call_retrying(f"tagging {volume_id}", lambda: ec2.create_tags(
        Resources=[volume_id], Tags=T.as_list(tags)),
        settled=lambda: ec2mod.volume_has_tags(ec2, volume_id, tags))
    log.info("migration_step", volume_id=volume_id, step=step)


def delete_volume(ec2, volume: dict, why: str, deadline_s: float, *,
                  guard: Guard = _no_guard) -> None:
    """Delete a job volume that is proven redundant; waits until EC2 has it gone.

    ``volume`` is the volume as the decision saw it: it is re-read right before the call, and
    if it is attached anywhere or its journal tags changed, StalePlan is raised instead."""
    volume_id = volume["VolumeId"]
    fresh = ec2mod.describe_volume(ec2, volume_id)
    if fresh is None or fresh["State"] in _GONE_STATES:  # an earlier try (or attempt) did it
        ec2mod.wait_for_volume_deleted(ec2, volume_id, deadline_s, poll_s=1.0)
        return
    att = ec2mod.attachment_of(fresh)
    if att is not None:
        raise StalePlan(f"volume {volume_id} is {att['State']} to {att['InstanceId']}; it was "
                        f"to be deleted as {why}")
    changed = changes(volume, fresh)
    if changed:
        raise StalePlan(f"volume {volume_id} changed since it was planned for deletion as {why}: "
                        + ", ".join(changed))
    guard()

    def gone() -> bool:
        current = ec2mod.describe_volume(ec2, volume_id)
        return current is None or current["State"] in _GONE_STATES

    try:
        ec2mod.call_retrying(f"deleting {volume_id}", lambda: ec2.delete_volume(VolumeId=volume_id),
                             settled=gone)
    except Exception as exc:  # noqa: BLE001 - NotFound after a performed-then-5xx is success
        if ec2mod.error_code(exc) not in ("InvalidVolume.NotFound",):
            raise
    log.info("volume_deleted", volume_id=volume_id, reason=why)
    ec2mod.wait_for_volume_deleted(ec2, volume_id, deadline_s, poll_s=1.0)


def finish(ec2, source: dict, new_volume_id: str, deadline_s: float, *,
           guard: Guard = _no_guard) -> None:
    """The copy is proven: record it, then (and only then) delete the source — ``source`` as
    it was when the copy was decided on, and only if it was not mounted after the copy."""
    copy = ec2mod.describe_volume(ec2, new_volume_id)
    if copy is None or tags_of(copy).get(SOURCE_VOLUME) != source["VolumeId"]:
        raise StalePlan(f"volume {new_volume_id}, the copy of {source['VolumeId']}, is gone or "
                        "no longer names it as its source")
    copied_at = tags_of(copy).get(SOURCE_MOUNTS, str(mounts(source)))
    now = ec2mod.describe_volume(ec2, source["VolumeId"])
    if now is not None and str(mounts(now)) != copied_at:
        raise VolumeDecisionError(
            f"volume {source['VolumeId']} was mounted after {new_volume_id} was copied from it "
            f"(mounts {copied_at} then, {mounts(now)} now); neither is deleted: keep the newer")
    if tags_of(copy).get(STEP) not in PROVEN_STEPS:
        set_step(ec2, new_volume_id, STEP_VERIFIED, guard=guard)
    crashpoint("migration.before_delete")
    delete_volume(ec2, source, f"migrated to {new_volume_id}", deadline_s, guard=guard)
    crashpoint("migration.after_delete")
    set_step(ec2, new_volume_id, STEP_DONE, guard=guard)
    log.info("migration_done", source_volume=source["VolumeId"], new_volume=new_volume_id)


def delete_snapshot(ec2, snapshot_id: str, *, guard: Guard = _no_guard) -> None:
    """Delete one snapshot; "not found" on a retry means an earlier try (answered 5xx) did it."""
    snapshots.delete(ec2, snapshot_id, guard=guard)


def prune_snapshots(ec2, job_id: str, live_volume_ids: set[str], retention_days: float, *,
                    guard: Guard = _no_guard) -> list[str]:
    """Delete the job's snapshots that are past retention and not worth keeping.

    Kept: pending ones; the newest completed snapshot of each live volume (later snapshots
    of it are incremental); anything younger than the retention. Only snapshots tagged with
    a spotrun role for this job are ever considered (invariant 6).
    """
    now = datetime.now(timezone.utc)
    keep_after = now - timedelta(days=retention_days)
    snapshots = [s for s in job_snapshots(ec2, job_id)
                 if tags_of(s).get(T.ROLE) in (ROLE_MIGRATION_SNAPSHOT, ROLE_DRAIN_SNAPSHOT)]
    def age(snapshot: dict) -> tuple:
        # The mount count orders snapshots of one volume even within one clock second.
        return mounts(snapshot), snapshot["StartTime"]

    newest: dict[str, dict] = {}
    for s in snapshots:
        source = tags_of(s).get(SOURCE_VOLUME, "")
        if s["State"] == "completed" and source in live_volume_ids:
            if source not in newest or age(s) > age(newest[source]):
                newest[source] = s
    deleted = []
    for s in snapshots:
        if s["State"] == "pending" or s in newest.values():
            continue
        if retention_days and s["StartTime"] > keep_after:
            continue
        delete_snapshot(ec2, s["SnapshotId"], guard=guard)
        deleted.append(s["SnapshotId"])
    if deleted:
        log.info("snapshots_pruned", snapshot_ids=deleted, retention_days=retention_days)
    return deleted

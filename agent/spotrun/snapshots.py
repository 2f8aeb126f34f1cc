"""CreateSnapshot exactly once.

CreateSnapshot has no idempotency token, and an answer of 5xx (or a dropped connection) may
come after EC2 made the snapshot; EC2 may then leave it out of a filtered DescribeSnapshots
for a while (eventual consistency). A blind retry therefore makes a second snapshot. So:

- every snapshot carries its create token from the start (TagSpecifications: atomic with the
  create), derived from the volume and its mount count, so every try of the same snapshot,
  in this process or after a restart, looks for the same token;
- after a failure that may have been performed, the lookup by token is repeated for the
  consistency window before another create (:func:`spotrun.ec2.create_once`); a snapshot
  that is only worth having (the drain's ahead-of-need one) is not tried again at all;
- if duplicates appear anyway, one is kept -- the oldest completed one, else the oldest --
  and the others carrying the same token (this job's, this volume's, this mount count's)
  are deleted.
"""
from __future__ import annotations

import time
from typing import Callable

from spotrun import ec2 as ec2mod
from spotrun.log import get_logger
from spotrun.waiting import wait_until

# The drain's snapshot is ahead of need and the drain has about two minutes: after a create
# that may have been performed, look for it this long at most, then go on without it.
OPTIONAL_SETTLE_S = 10.0


log = get_logger("migration")


def create_exactly_once(ec2_once, *, what: str, params: dict,
                        with_token: Callable[[], list[dict]], window_s: float,
                        optional: bool, guard: Callable[[], None],
                        before_create: Callable[[], None] = lambda: None) -> dict | None:
    """The snapshot carrying the create token in ``params``' tags, made if there is none.

    ``with_token()`` lists the snapshots carrying that token. None only when ``optional`` and
    a create that may have been performed did not show up within the settle time.
    ``before_create()`` runs right before each CreateSnapshot (the intent on the volume)."""
    def create() -> dict:
        guard()
        before_create()
        return ec2_once.create_snapshot(**params)

    def find() -> dict | None:
        return next((s for s in with_token() if s["State"] != "error"), None)

    settle_s = min(window_s, OPTIONAL_SETTLE_S) if optional else window_s
    try:
        return ec2mod.create_once(what, create, find, settle_s=settle_s,
                                  retry_unknown=not optional)
    except ec2mod.CreateOutcomeUnknown as exc:
        log.warning("snapshot_outcome_unknown", what=what, error=str(exc))
        return None


def keep_one(ec2, found: list[dict], *, guard: Callable[[], None]) -> dict | None:
    """Of snapshots sharing one create token: keep the oldest completed one (else the oldest)
    and delete the rest. Returns the one kept."""
    usable = [s for s in found if s["State"] != "error"]
    if not usable:
        return None
    usable.sort(key=lambda s: (s["State"] != "completed", s["StartTime"], s["SnapshotId"]))
    kept, extra = usable[0], usable[1:]
    for duplicate in extra:
        delete(ec2, duplicate["SnapshotId"], guard=guard)
    if extra:
        log.warning("duplicate_snapshots_deleted", kept=kept["SnapshotId"],
                    deleted=[s["SnapshotId"] for s in extra])
    return kept


def delete(ec2, snapshot_id: str, *, guard: Callable[[], None]) -> None:
    """Delete one snapshot; "not found" means an earlier try (answered 5xx) did it."""
    guard()
    try:
        ec2mod.call_retrying(f"deleting {snapshot_id}",
                             lambda: ec2.delete_snapshot(SnapshotId=snapshot_id))
    except Exception as exc:  # noqa: BLE001 - only NotFound is success
        if ec2mod.error_code(exc) != "InvalidSnapshot.NotFound":
            raise


# -- the snapshot's id on its volume ------------------------------------------------------
# A replacement in another AZ looks for the drain's snapshot seconds after it was made, when
# EC2 may still leave it out of every filtered DescribeSnapshots: without its id it would make
# a second one. So the id, with the mount count it belongs to, is recorded on the volume (a
# volume's tags show at once) and the next agent describes the snapshot by id.
FRESH_SNAPSHOT = "spotrun:fresh-snapshot"


def record_on_volume(ec2, volume_id: str, snapshot_id: str, mounts: int, *,
                     guard: Callable[[], None]) -> None:
    """Best effort: without the record, the next agent may make a duplicate that is pruned."""
    try:
        _tag_volume(ec2, volume_id, {FRESH_SNAPSHOT: f"{snapshot_id}/{mounts}"},
                    f"recording {snapshot_id} on {volume_id}", guard=guard)
    except Exception as exc:  # noqa: BLE001 - an optimisation; the snapshot is made either way
        log.warning("snapshot_record_failed", snapshot_id=snapshot_id, volume_id=volume_id,
                    error=str(exc)[:200])


def _tag_volume(ec2, volume_id: str, tags: dict[str, str], what: str, *,
                guard: Callable[[], None]) -> None:
    """One CreateTags for the record or the intent, retried for OPTIONAL_SETTLE_S at most."""
    guard()
    ec2mod.call_retrying(what, lambda: ec2.create_tags(
        Resources=[volume_id], Tags=[{"Key": k, "Value": v} for k, v in tags.items()]),
        deadline_s=OPTIONAL_SETTLE_S, settled=lambda: ec2mod.volume_has_tags(ec2, volume_id, tags))


def recorded(ec2, volume: dict, mounts: int, *, settle_s: float,
             sleep: Callable[[float], None] | None = None) -> dict | None:
    """The snapshot recorded on ``volume`` for its current mount count, pending or completed;
    looked up by id for ``settle_s`` (it may be too new for EC2 to show yet)."""
    import time

    tags = {t["Key"]: t["Value"] for t in volume.get("Tags") or []}
    snapshot_id, _, at = tags.get(FRESH_SNAPSHOT, "").partition("/")
    if not snapshot_id or at != str(mounts):
        return None
    deadline = time.monotonic() + settle_s
    while True:
        try:
            found = ec2mod.describe_snapshot(ec2, snapshot_id)
        except Exception as exc:  # noqa: BLE001 - transient errors: look again
            if not ec2mod.is_transient(exc):
                raise
            found = None
        if found is not None:
            own = {t["Key"]: t["Value"] for t in found.get("Tags") or []}
            usable = (own.get("spotrun:source-volume") == volume["VolumeId"]
                      and own.get("spotrun:mounts") == at
                      and found["State"] in ("pending", "completed"))
            return found if usable else None
        if time.monotonic() >= deadline:
            return None
        (sleep or time.sleep)(0.5)  # EC2 catching up with a new resource: polled


# -- a snapshot begun and never recorded ----------------------------------------------------
# An agent cut short between CreateSnapshot and the record above (a drain terminated as the
# notice ran out, or whose create answered 5xx and which went on without it) leaves a snapshot
# nobody recorded, which EC2 may leave out of filtered lists for a while: the next agent would
# make a second one (long soak, seed 7, job 85). So the intent goes on the volume right before
# the CreateSnapshot (one CreateTags), and a later agent that finds the intent and no record
# looks for the snapshot by its token until the consistency window since the intent has passed,
# before it makes its own. Right before, not earlier: an intent stated before the drain's
# lookups made a replacement wait out the whole window for a drain killed before it created
# anything (long soak, seed 7, job 56: 110 s).
SNAPSHOT_INTENT = "spotrun:snapshot-intent"


def intent_tags(mounts: int, *, now: Callable[[], float] = time.time) -> dict[str, str]:
    return {SNAPSHOT_INTENT: f"{mounts}/{int(now())}"}


def record_intent(ec2, volume_id: str, mounts: int, *, guard: Callable[[], None]) -> None:
    """Best effort, like the record: without it a later agent may make a duplicate (pruned)."""
    try:
        _tag_volume(ec2, volume_id, intent_tags(mounts), f"stating a snapshot of {volume_id}",
                    guard=guard)
    except Exception as exc:  # noqa: BLE001 - an optimisation; the snapshot is made either way
        if ec2mod.is_transient(exc) or isinstance(exc, TimeoutError):
            log.warning("snapshot_intent_failed", volume_id=volume_id, error=str(exc)[:200])
        else:
            raise


def unlisted_for_s(volume: dict, mounts: int, window_s: float, *,
                   now: Callable[[], float] = time.time) -> float:
    """How much longer a snapshot the last holder began at this mount count may stay unlisted
    (0: none was begun, or EC2 lists it by now). Wall-clock time: the intent was written by
    another instance (EC2 instances keep their clocks in sync)."""
    tags = {t["Key"]: t["Value"] for t in volume.get("Tags") or []}
    at, _, since = tags.get(SNAPSHOT_INTENT, "").partition("/")
    if at != str(mounts) or not since.isdigit():
        return 0.0
    return max(0.0, int(since) + window_s - now())


def await_begun(volume: dict, mounts: int, window_s: float, listed: Callable[[], dict | None], *,
                guard: Callable[[], None]) -> dict | None:
    """The snapshot the last holder began (``listed()`` finds it by token) if EC2 lists it
    before the consistency window since the intent ends; None if none was begun or it never
    showed (a drain cut short before its CreateSnapshot)."""
    left = unlisted_for_s(volume, mounts, window_s)
    if left <= 0:
        return None
    log.info("snapshot_awaited", volume_id=volume["VolumeId"], up_to_s=round(left, 1),
             why="the last holder began a snapshot and did not record it")
    try:
        return wait_until(listed, left, interval_s=1.0, backoff=1.5, max_interval_s=5.0,
                          what=f"the last holder's snapshot of {volume['VolumeId']}",
                          on_poll=lambda _elapsed: guard())
    except TimeoutError:
        log.info("snapshot_not_begun", volume_id=volume["VolumeId"])
        return None

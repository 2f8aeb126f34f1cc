"""Snapshots counted at creation, from the call ledger: every drain or migration makes exactly
one, a performed-then-5xx CreateSnapshot included (what it made counts even though its caller
never saw the id). Hand-written ledgers in the local cloud's record format."""
from __future__ import annotations

from spotrun import tags as T
from spotrun.harness.soakledger import duplicate_snapshots, snapshot_creations

JOB = "soak-7-0"
VOL, COPY = "vol-0aaaaaaaaaaaaaaaa", "vol-0bbbbbbbbbbbbbbbb"
A, B = "i-0aaaaaaaaaaaaaaaa", "i-0bbbbbbbbbbbbbbbb"


class Ledger:
    def __init__(self):
        self.records = []

    def call(self, action, instance, resources=(), created=(), status=200, injected=None,
             tags=None, checker=False):
        self.records.append({"seq": len(self.records) + 1, "service": "ec2", "action": action,
                             "instance": instance, "resources": list(resources),
                             "created": list(created), "status": status, "injected": injected,
                             "tags": tags or {}, "checker": checker})
        return self

    def create_volume(self, instance, volume):
        return self.call("CreateVolume", instance, created=[volume], tags={T.JOB: JOB})

    def attach(self, instance, volume):
        return self.call("AttachVolume", instance, [volume, instance])

    def snapshot(self, instance, volume, snap, **fault):
        created = [snap] if snap else []
        return self.call("CreateSnapshot", instance, [volume], created=created,
                         tags={T.JOB: JOB, "spotrun:source-volume": volume}, **fault)


PERFORMED_500 = {"status": 500, "injected": {"kind": "performed_then_5xx", "performed": True}}


def a_drain_then_a_cross_az_migration(ledger, migration_snapshots):
    ledger.create_volume(A, VOL).attach(A, VOL)
    ledger.snapshot(A, VOL, "snap-0000000000000001")            # the drain's, ahead of need
    ledger.call("DetachVolume", A, [VOL])
    for snap in migration_snapshots:                               # the replacement, other AZ
        ledger.snapshot(B, VOL, snap)
    ledger.call("CreateVolume", B, [f"snap-0000000000000001"], created=[COPY],
                tags={T.JOB: JOB}).attach(B, COPY)
    ledger.snapshot(B, COPY, "snap-0000000000000009")            # the next drain, of the copy
    return ledger.records


def test_a_clean_run_has_one_snapshot_per_drain_and_migration():
    records = a_drain_then_a_cross_az_migration(Ledger(), migration_snapshots=[])
    assert duplicate_snapshots(records, JOB) == []
    assert snapshot_creations(records, JOB)["created"] == 2
    # By volume ids as well as by the job's tag.
    assert duplicate_snapshots(records, {VOL, COPY}) == []


def test_a_retried_create_snapshot_that_made_a_second_one_is_a_duplicate():
    ledger = Ledger()
    ledger.create_volume(A, VOL).attach(A, VOL)
    # Performed, answered 500; the retry did not find it and made another.
    ledger.snapshot(A, VOL, "snap-0000000000000001", **PERFORMED_500)
    ledger.snapshot(A, VOL, "snap-0000000000000002")
    ledger.call("DetachVolume", A, [VOL])
    [violation] = duplicate_snapshots(ledger.records, JOB)
    assert VOL in violation and "2 snapshots" in violation
    assert "snap-0000000000000001" in violation and "snap-0000000000000002" in violation
    assert snapshot_creations(ledger.records, JOB)["created"] == 2


def test_the_migration_making_its_own_after_the_drains_is_a_duplicate():
    records = a_drain_then_a_cross_az_migration(Ledger(), ["snap-0000000000000002"])
    [violation] = duplicate_snapshots(records, JOB)
    assert f"by {A}" in violation and f"by {B}" in violation


def test_a_performed_then_5xx_snapshot_reused_is_one():
    ledger = Ledger()
    ledger.create_volume(A, VOL).attach(A, VOL)
    ledger.snapshot(A, VOL, "snap-0000000000000001", **PERFORMED_500)
    # The retry found it by its token: only reads, no second create. A dropped retry that
    # was never performed made nothing either.
    ledger.call("DescribeSnapshots", A)
    ledger.snapshot(A, VOL, None, status=0, injected={"kind": "dropped_before", "performed": False})
    ledger.call("DetachVolume", A, [VOL])
    ledger.attach(B, VOL)                       # the next boot, same AZ: a new drain
    ledger.snapshot(B, VOL, "snap-0000000000000003")
    assert duplicate_snapshots(ledger.records, JOB) == []
    assert snapshot_creations(ledger.records, JOB)["created"] == 2


def test_other_jobs_and_the_checker_are_not_counted():
    ledger = Ledger()
    ledger.create_volume(A, VOL).attach(A, VOL)
    ledger.snapshot(A, VOL, "snap-0000000000000001")
    ledger.call("CreateSnapshot", None, [VOL], created=["snap-0000000000000002"], checker=True)
    other = "vol-0cccccccccccccccc"
    ledger.call("CreateSnapshot", A, [other], created=["snap-0000000000000003"])
    ledger.call("CreateSnapshot", A, [other], created=["snap-0000000000000004"])
    assert duplicate_snapshots(ledger.records, JOB) == []
    assert snapshot_creations(ledger.records, JOB)["created"] == 1

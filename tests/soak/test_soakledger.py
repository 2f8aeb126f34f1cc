"""The soak's race checks (spotrun.harness.soakledger) judged on hand-written ledgers: a clean race
passes, and each ledger that breaks exactly one invariant gets one sentence naming it."""
from __future__ import annotations

import pytest

from spotrun.harness import soakledger

JOB = "soak-1-0"
TABLE = "soak-leases"


class Ledger:
    """Records shaped as spotrun.localcloud.ledger writes them, numbered in order."""

    def __init__(self):
        self.records: list[dict] = []

    def add(self, action, instance=None, *, service="ec2", resources=(), tags=None, created=(),
            status=200, error=None, checker=False, **extra):
        self.records.append({"seq": len(self.records) + 1, "t": float(len(self.records)),
                             "service": service, "action": action, "instance": instance,
                             "resources": list(resources), "tags": tags or {},
                             "created": list(created), "status": status, "error": error,
                             "injected": None, "checker": checker, **extra})
        return self

    def lease(self, instance, holder, generation, *, refused=False, draining=False):
        item = {"job": JOB, "generation": str(generation), "az": "us-east-1a"}
        if holder:
            item["holder"] = holder
        if draining:
            item["draining"] = "now"
        # As the ledger writes a PutItem: the key is inside the item.
        if refused:
            return self.add("PutItem", instance, service="dynamodb", resources=[TABLE],
                            table=TABLE, item=item, status=400,
                            error="ConditionalCheckFailedException")
        return self.add("PutItem", instance, service="dynamodb", resources=[TABLE], table=TABLE,
                        item=item)

    def read_lease(self, instance):
        return self.add("GetItem", instance, service="dynamodb", resources=[TABLE], table=TABLE,
                        key={"job": JOB})

    def create_volume(self, instance, vol, snap=None, step=None):
        tags = {"spotrun:job": JOB, "spotrun:role": "volume"}
        if step:
            tags["spotrun:migration-step"] = step
        return self.add("CreateVolume", instance, resources=[snap] if snap else [], tags=tags,
                        created=[vol])

    def snapshot(self, instance, vol, snap):
        return self.add("CreateSnapshot", instance, resources=[vol],
                        tags={"spotrun:job": JOB, "spotrun:role": "migration-snapshot"},
                        created=[snap])

    def attach(self, instance, vol):
        return self.add("AttachVolume", instance, resources=[vol, instance])

    def detach(self, instance, vol):
        return self.add("DetachVolume", instance, resources=[vol])

    def step(self, instance, vol, step):
        return self.add("CreateTags", instance, resources=[vol],
                        tags={"spotrun:migration-step": step})

    def delete(self, instance, vol):
        return self.add("DeleteVolume", instance, resources=[vol])

    def terminate(self, instance):
        return self.add("TerminateInstances", None, resources=[instance], checker=True)


def migration_with_a_race() -> Ledger:
    """i-old trains on vol-a and drains; i-new and i-lost race; i-new wins and migrates
    vol-a to vol-b by a snapshot; i-lost only reads and has its CAS refused."""
    led = Ledger()
    led.lease("i-old", "i-old", 1).create_volume("i-old", "vol-a").attach("i-old", "vol-a")
    led.add("CreateTags", "i-old", resources=["vol-a"], tags={"spotrun:phase": "training"})
    led.lease("i-old", "i-old", 1, draining=True).detach("i-old", "vol-a")
    led.lease("i-old", None, 1).terminate("i-old")
    led.read_lease("i-new").read_lease("i-lost")
    led.lease("i-new", "i-new", 2).lease("i-lost", "i-lost", 2, refused=True)
    led.read_lease("i-lost").add("DescribeInstances", "i-lost", resources=["i-new"])
    led.snapshot("i-new", "vol-a", "snap-1").create_volume("i-new", "vol-b", "snap-1", "created")
    led.attach("i-new", "vol-b").step("i-new", "vol-b", "attached").step("i-new", "vol-b", "mounted")
    led.step("i-new", "vol-b", "verified").delete("i-new", "vol-a").step("i-new", "vol-b", "done")
    led.terminate("i-lost")
    return led


RACE = {"kind": "two_replacements", "winner": "i-new", "loser": "i-lost", "since_seq": 0}


def check(led: Ledger, races=None, attached_now=None):
    return soakledger.check(led.records, JOB, TABLE, races=[dict(r) for r in races or [RACE]],
                            attached_now=attached_now)


def test_a_clean_race_and_migration_break_no_invariant():
    led = migration_with_a_race()
    assert soakledger.job_resources(led.records, JOB) == ({"vol-a", "vol-b"}, {"snap-1"})
    assert check(led, attached_now={"vol-b": "i-new"}) == []


def test_two_job_volumes_attached_at_once_is_named():
    led = migration_with_a_race()
    # A second winner makes its own copy and attaches it while i-new trains on vol-b.
    led.create_volume("i-two", "vol-c", "snap-1", "created").attach("i-two", "vol-c")
    [violation] = soakledger.attachment_violations(led.records, {"vol-a", "vol-b", "vol-c"})
    assert violation.startswith("inv1 never two volumes attached")
    assert "vol-b" in violation and "vol-c" in violation


def test_two_volumes_attached_in_the_cloud_at_the_end_is_named():
    led = migration_with_a_race()
    [violation] = soakledger.attachment_violations(
        led.records, {"vol-a", "vol-b"}, {"vol-a": "i-x", "vol-b": "i-new"})
    assert "inv1 never two volumes attached" in violation and "at the end" in violation


def test_an_attachment_ends_with_its_instance_terminated():
    """A killed instance's volume is not in use after its termination: the replacement's
    copy attached later is not a second attached volume."""
    led = Ledger().lease("i-a", "i-a", 1).create_volume("i-a", "vol-a").attach("i-a", "vol-a")
    led.terminate("i-a").lease("i-b", "i-b", 2).snapshot("i-b", "vol-a", "snap-1")
    led.create_volume("i-b", "vol-b", "snap-1", "created").attach("i-b", "vol-b")
    assert soakledger.check(led.records, JOB, TABLE) == []


def test_deleting_the_proven_copy_trained_on_from_a_stale_plan_is_named():
    """Defect 2: the replacement planned to delete the copy as unproven, waited, and deleted
    it after the old instance had proven it, trained on it and let it go."""
    led = Ledger()
    led.create_volume("i-old", "vol-a").attach("i-old", "vol-a").detach("i-old", "vol-a")
    led.snapshot("i-mid", "vol-a", "snap-1").create_volume("i-mid", "vol-b", "snap-1", "created")
    led.attach("i-mid", "vol-b").step("i-mid", "vol-b", "verified")
    led.add("CreateTags", "i-mid", resources=["vol-b"], tags={"spotrun:phase": "training"})
    led.detach("i-mid", "vol-b").delete("i-new", "vol-b")
    [violation] = soakledger.deletion_violations(led.records, {"vol-a", "vol-b"})
    assert violation.startswith("inv1 no newest copy deleted") and "vol-b" in violation


def test_deleting_an_unproven_copy_or_the_migrated_source_is_not_a_violation():
    led = Ledger()
    led.create_volume("i-old", "vol-a").attach("i-old", "vol-a").detach("i-old", "vol-a")
    # A copy attached and mounted, never verified (its agent killed): only vol-a's data.
    led.snapshot("i-mid", "vol-a", "snap-1").create_volume("i-mid", "vol-b", "snap-1", "created")
    led.attach("i-mid", "vol-b").step("i-mid", "vol-b", "mounted").terminate("i-mid")
    led.delete("i-new", "vol-b")
    assert soakledger.deletion_violations(led.records, {"vol-a", "vol-b"}) == []
    # But deleting the source while it is the only copy with its data is.
    led.delete("i-new", "vol-a")
    [violation] = soakledger.deletion_violations(led.records, {"vol-a", "vol-b"})
    assert "inv1 no newest copy deleted" in violation and "vol-a" in violation


def test_a_loser_mutating_call_after_the_winners_acquisition_is_named_from_the_ledger():
    led = migration_with_a_race()
    led.records.insert(-1, {"seq": 0, "t": 0.0, "service": "ec2", "action": "CreateTags",
                            "instance": "i-lost", "resources": ["vol-b"],
                            "tags": {"spotrun:instance": "i-lost"}, "created": [],
                            "status": 200, "error": None, "injected": None, "checker": False})
    for seq, record in enumerate(led.records, start=1):
        record["seq"] = seq
    races = [dict(RACE)]
    [violation] = check(led, races)
    assert violation.startswith("inv1 two replacements: the one that did not win (i-lost)")
    assert "CreateTags" in violation and races[0] is not None


def test_a_refused_delete_by_the_loser_still_counts():
    led = migration_with_a_race()
    led.add("DeleteVolume", "i-lost", resources=["vol-b"], status=400, error="VolumeInUse")
    [violation] = check(led)
    assert "did not win (i-lost)" in violation and "DeleteVolume" in violation


def test_a_takeover_from_a_live_holder_is_named():
    """Defect 1: one NotFound and the racer took the lease from a running holder."""
    led = Ledger().lease("i-a", "i-a", 1).create_volume("i-a", "vol-a").attach("i-a", "vol-a")
    led.add("DescribeInstances", "i-b", resources=["i-a"], status=400,
            error="InvalidInstanceID.NotFound")
    led.lease("i-b", "i-b", 2)
    [violation] = soakledger.check(led.records, JOB, TABLE)
    assert violation.startswith("inv1 lease taken over from a live holder") and "i-a" in violation


def test_a_mutating_call_by_an_instance_without_the_lease_is_named():
    led = Ledger().lease("i-a", "i-a", 1).create_volume("i-a", "vol-a").attach("i-a", "vol-a")
    led.add("CreateSnapshot", "i-b", resources=["vol-a"], tags={"spotrun:job": JOB},
            created=["snap-9"])
    [violation] = soakledger.check(led.records, JOB, TABLE)
    assert violation.startswith("inv1 no mutating call without the lease") and "i-b" in violation


@pytest.mark.parametrize("other_job_call", [
    {"action": "CreateTags", "resources": ["vol-other"], "tags": {"spotrun:job": "other"}},
    {"action": "DeleteVolume", "resources": ["vol-other"]},
])
def test_calls_on_another_jobs_resources_are_not_this_jobs_business(other_job_call):
    led = migration_with_a_race()
    led.add(instance="i-lost", **other_job_call)
    assert check(led) == []


def test_a_loser_that_takes_the_job_after_the_winner_let_go_is_not_a_violation():
    """The winner finished and released; the waiting loser acquired then and acted: that is
    the lease handed on, not a loser acting."""
    led = migration_with_a_race()
    led.records.pop()  # i-lost is not terminated: it goes on waiting
    led.lease("i-new", "i-new", 2, draining=True).detach("i-new", "vol-b").lease("i-new", None, 2)
    led.lease("i-lost", "i-lost", 3).attach("i-lost", "vol-b")
    assert check(led) == []
    # Without the release, the same calls are a loser acting on the job.
    led = migration_with_a_race()
    led.records.pop()
    led.add("AttachVolume", "i-lost", resources=["vol-b", "i-lost"])
    [violation] = check(led)
    assert "did not win (i-lost)" in violation and "AttachVolume" in violation


def test_a_write_after_letting_go_is_named_and_one_after_taking_the_lease_back_is_not():
    """Caught in the long soak: an agent whose maintenance drain was called off tagged the
    released volume "acquiring-volume" before taking its lease back."""
    def released() -> Ledger:
        led = Ledger().lease("i-a", "i-a", 1).create_volume("i-a", "vol-a").attach("i-a", "vol-a")
        return led.detach("i-a", "vol-a").lease("i-a", None, 1)

    led = released().add("CreateTags", "i-a", resources=["vol-a"],
                         tags={"spotrun:phase": "acquiring-volume"})
    [violation] = soakledger.check(led.records, JOB, TABLE)
    assert violation.startswith("inv1 no mutating call after letting go") and "CreateTags@" in violation
    led = released().lease("i-a", "i-a", 2).add("CreateTags", "i-a", resources=["vol-a"],
                                                tags={"spotrun:phase": "acquiring-volume"})
    assert soakledger.check(led.records, JOB, TABLE) == []

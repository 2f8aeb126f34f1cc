"""Invariants 2, 5 and 6 (spotrun.harness.soakwitness) judged on hand-written ledgers shaped like the
local cloud's: a clean job passes, and each ledger that breaks exactly one of them gets one
sentence naming it. The completion record is read from a real ext4 image (mkfs.ext4 -d, read
back with debugfs: no mount, no loop device)."""
from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from spotrun.harness import soakcheck, soakwitness

JOB = "soak-1-0"
FLEET = "sfr-0123456789abcdef0"
DECOY_VOL, DECOY_SNAP = "vol-dec0dec0dec0dec0d", "snap-dec0dec0dec0dec0d"
T0 = 1_800_000_000.0
INSTANCES = {"i-aaaaaaaaaaaaaaaaa", "i-bbbbbbbbbbbbbbbbb"}
A, B = sorted(INSTANCES)
VOL_A, VOL_B, SNAP_1 = "vol-aaaaaaaaaaaaaaaaa", "vol-bbbbbbbbbbbbbbbbb", "snap-11111111111111111"


class Ledger:
    """Records as spotrun.localcloud.ledger writes them; record n is at time T0 + n."""

    def __init__(self):
        self.records: list[dict] = []

    def add(self, action, instance=None, *, service="ec2", resources=(), tags=None, created=(),
            status=200, error=None, checker=False, **extra):
        seq = len(self.records) + 1
        self.records.append({"seq": seq, "t": T0 + seq, "service": service, "action": action,
                             "instance": instance, "resources": list(resources),
                             "tags": tags or {}, "created": list(created), "status": status,
                             "error": error, "injected": None, "checker": checker, **extra})
        return self

    def step(self, instance, volume, step):
        return self.add("CreateTags", instance, resources=[volume],
                        tags={"spotrun:migration-step": step})

    def index(self, action, resource=None) -> int:
        return next(i for i, r in enumerate(self.records) if r["action"] == action
                    and (resource is None or resource in r["resources"]))

    def renumber(self):
        for seq, r in enumerate(self.records, start=1):
            r["seq"], r["t"] = seq, T0 + seq
        return self


def job_tags(**more):
    return {"spotrun:job": JOB, **more}


def clean_job() -> Ledger:
    """i-a trains on vol-a and drains to snap-1; i-b migrates it to vol-b (attach, verify,
    delete the source, done, delete the snapshot), finishes and cancels its fleet."""
    led = Ledger()
    led.add("CreateVolume", checker=True, tags={"spotrun:job": "other"}, created=[DECOY_VOL])
    led.add("CreateSnapshot", checker=True, resources=[DECOY_VOL], created=[DECOY_SNAP],
            tags={"spotrun:job": "other", "spotrun:role": "migration-snapshot"})
    led.add("PutItem", A, service="dynamodb", resources=["soak-leases"], table="soak-leases",
            item={"job": JOB, "holder": A, "generation": "1"})
    led.add("CreateVolume", A, tags=job_tags(**{"spotrun:role": "volume"}), created=[VOL_A])
    led.add("AttachVolume", A, resources=[VOL_A, A])
    led.add("CreateTags", A, resources=[VOL_A, A], tags={"spotrun:instance": A})
    led.add("CreateSnapshot", A, resources=[VOL_A], created=[SNAP_1],
            tags=job_tags(**{"spotrun:role": "drain-snapshot", "spotrun:source-volume": VOL_A}))
    led.add("DetachVolume", A, resources=[VOL_A, A])
    led.add("TerminateInstances", resources=[A], checker=True)
    led.add("CreateVolume", B, resources=[SNAP_1, A, VOL_A], created=[VOL_B],
            tags=job_tags(**{"spotrun:role": "volume", "spotrun:migration-step": "created"}))
    led.add("AttachVolume", B, resources=[VOL_B, B])
    led.step(B, VOL_B, "attached").step(B, VOL_B, "mounted").step(B, VOL_B, "verified")
    led.add("DeleteVolume", B, resources=[VOL_A])
    led.step(B, VOL_B, "done")
    led.add("DeleteSnapshot", B, resources=[SNAP_1])
    led.add("CreateTags", B, resources=[VOL_B], tags={"spotrun:phase": "done",
                                                       "spotrun:completed": "now"})
    led.add("DetachVolume", B, resources=[VOL_B, B])
    led.add("CancelSpotFleetRequests", B, resources=[FLEET])
    led.add("TerminateInstances", resources=[B], checker=True)
    return led


def completion_before(led: Ledger, action="CancelSpotFleetRequests") -> dict:
    """The record as the agent writes it: whole seconds, two ledger records before the cancel."""
    t = led.records[led.index(action)]["t"] - 2
    return {"time": datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
            .replace("+00:00", "Z"), "instance_id": B}


def check(led: Ledger, completion="auto", *, volumes=(VOL_B, DECOY_VOL), snapshots=(DECOY_SNAP,),
          **kwargs) -> list[str]:
    if completion == "auto":
        completion = completion_before(clean_job())
    return soakwitness.check(led.records, JOB, INSTANCES, {FLEET}, completion=completion,
                             final_volumes={VOL_B}, existing_volumes=set(volumes),
                             existing_snapshots=set(snapshots), **kwargs)


def test_a_clean_job_breaks_none_of_invariants_2_5_6():
    assert check(clean_job()) == []


# -- inv6 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("call, named", [
    ({"action": "CreateSnapshot", "resources": [DECOY_VOL], "created": ["snap-99999999999999999"],
      "tags": job_tags(**{"spotrun:role": "drain-snapshot"})}, DECOY_VOL),
    ({"action": "DeleteTags", "resources": ["vol-0ther0ther0ther0t"]}, "vol-0ther0ther0ther0t"),
    ({"action": "CancelSpotFleetRequests", "resources": ["sfr-0ther0ther0ther0t"]},
     "sfr-0ther0ther0ther0t"),
    ({"action": "CreateTags", "resources": [DECOY_VOL], "tags": {"spotrun:job": JOB}}, DECOY_VOL),
    ({"action": "CreateVolume", "resources": [DECOY_SNAP], "created": ["vol-99999999999999999"],
      "tags": job_tags()}, DECOY_SNAP),
    ({"action": "DetachVolume", "resources": [VOL_B, "i-0ther0ther0ther0t"]},
     "i-0ther0ther0ther0t"),
    ({"action": "PutItem", "service": "dynamodb", "resources": ["soak-leases"],
      "item": {"job": "other", "holder": B}}, "lease item of job other"),
], ids=["snapshot-of-decoy", "delete-tags-elsewhere", "cancel-another-fleet",
        "tag-decoy-as-ours", "volume-from-decoy-snapshot", "detach-from-another-instance",
        "another-jobs-lease"])
def test_a_call_on_a_resource_not_the_jobs_is_named(call, named):
    led = clean_job()
    call = dict(call)
    led.add(call.pop("action"), B, **call)
    [violation] = check(led)
    assert violation.startswith("inv6 only the job's own resources") and named in violation
    assert B in violation


def test_tagging_a_foreign_volume_with_the_job_tag_does_not_make_it_the_jobs():
    """The adopting CreateTags is itself the violation, and so is what follows on it."""
    led = clean_job()
    led.add("CreateTags", B, resources=[DECOY_VOL], tags={"spotrun:job": JOB})
    led.add("DeleteVolume", B, resources=[DECOY_VOL])
    [violation] = check(led, volumes=(VOL_B,))
    assert "inv6 only the job's own resources" in violation
    assert "CreateTags" in violation and "DeleteVolume" in violation


def test_the_operator_may_adopt_a_volume_into_the_job():
    led = clean_job()
    led.add("CreateTags", None, resources=["vol-0pera0pera0pera0"], tags={"spotrun:job": JOB})
    led.add("CreateTags", B, resources=["vol-0pera0pera0pera0"], tags={"spotrun:phase": "x"})
    assert check(led) == []


def test_an_untagged_snapshot_left_behind_is_named():
    led = clean_job()
    led.add("CreateSnapshot", B, resources=[VOL_B], created=["snap-0rphan0rphan0rph"])
    [violation] = check(led, snapshots=(DECOY_SNAP, "snap-0rphan0rphan0rph"))
    assert violation.startswith("inv6 every snapshot accounted for")
    assert "snap-0rphan0rphan0rph" in violation
    # Deleted by the end, it is accounted for.
    assert check(led) == []


def test_a_kept_drain_snapshot_with_the_jobs_tag_is_accounted_for():
    assert check(clean_job(), snapshots=(DECOY_SNAP, SNAP_1)) == []


def test_a_volume_left_behind_that_is_not_the_final_one_is_named():
    """A copy whose create was answered 5xx after it was performed: the ledger keeps it."""
    led = clean_job()
    led.add("CreateVolume", B, resources=[SNAP_1], created=["vol-1eft1eft1eft1eft"], status=503,
            error="ServiceUnavailable", tags=job_tags())
    led.records[-1]["injected"] = {"performed": True}
    [violation] = check(led, volumes=(VOL_B, DECOY_VOL, "vol-1eft1eft1eft1eft"))
    assert violation.startswith("inv6 every volume accounted for")
    assert "vol-1eft1eft1eft1eft" in violation


# -- inv5 -----------------------------------------------------------------------------------

def test_a_cancel_when_the_image_holds_no_completion_record_is_named():
    [violation] = check(clean_job(), completion=None)
    assert violation.startswith("inv5 only success cancels") and FLEET in violation
    assert ".spotrun-completed.json" in violation


def test_a_cancel_before_the_completion_record_was_written_is_named():
    led = clean_job()
    late = completion_before(led)
    late["time"] = datetime.fromtimestamp(led.records[-1]["t"] + 5, timezone.utc).isoformat()
    [violation] = check(led, completion=late)
    assert violation.startswith("inv5 cancel after the completion record") and FLEET in violation


def test_an_auto_scaling_group_update_is_a_cancel():
    led = clean_job()
    led.records.pop(led.index("CancelSpotFleetRequests"))
    led.add("UpdateAutoScalingGroup", B, service="autoscaling", resources=[FLEET])
    [violation] = check(led.renumber(), completion=None)
    assert violation.startswith("inv5 only success cancels")
    assert "UpdateAutoScalingGroup" in violation


def test_a_completed_job_whose_fleet_was_never_cancelled_is_named():
    led = clean_job()
    completion = completion_before(led)
    led.records.pop(led.index("CancelSpotFleetRequests"))
    [violation] = check(led.renumber(), completion=completion)
    assert violation.startswith("inv5 success cancels") and "no agent cancelled" in violation
    # Unless the soak cancelled it itself (the job ran out of time: reported elsewhere).
    assert check(led, completion=completion, expect_cancel=False) == []


def test_a_cancel_with_an_unreadable_image_is_named():
    [violation] = check(clean_job(), completion=None, image_error="vol-b.img: not ext4")
    assert violation.startswith("inv5 only success cancels") and "not ext4" in violation


# -- inv2 -----------------------------------------------------------------------------------

def test_deleting_the_old_volume_before_the_copy_is_verified_is_named():
    led = clean_job()
    verified = next(i for i, r in enumerate(led.records)
                    if r["tags"].get("spotrun:migration-step") == "verified")
    led.records.insert(verified, led.records.pop(led.index("DeleteVolume", VOL_A)))
    [violation] = check(led.renumber())
    assert violation.startswith("inv2 copy before delete") and VOL_A in violation
    assert f"{VOL_B}: attached" in violation


@pytest.mark.parametrize("copy_held,named", [(41, False), (40, True), (None, True)])
def test_the_old_volume_goes_only_once_the_copys_image_holds_its_newest_checkpoint(copy_held, named):
    """By the bytes the cloud read when the delete arrived (spotrun.harness.soakdeletes), not by the
    agent's "verified" tag: the clean ledger, with the copy's image behind the source's."""
    seen = {VOL_A: {VOL_A: 41, VOL_B: copy_held}}
    found = check(clean_job(), image_at_delete=seen)
    assert bool(found) is named, found
    if named:
        assert found[0].startswith("inv2 copy before delete") and "no copy's image held" in found[0]
    missed = check(clean_job(), image_at_delete={})
    assert missed and "no image was read" in missed[0]


def test_deleting_the_old_volume_before_the_copy_is_attached_is_named():
    """A verified tag on a copy never attached proves nothing."""
    led = clean_job()
    led.records.pop(led.index("AttachVolume", VOL_B))
    led.add("AttachVolume", B, resources=[VOL_B, B])
    # The snapshot deleted before the (late) attach is the same invariant, named too.
    violation, snapshot = check(led.renumber())
    assert violation.startswith("inv2 copy before delete") and f"{VOL_B}: not attached" in violation
    assert snapshot.startswith("inv2 migration snapshot kept") and SNAP_1 in snapshot


def test_deleting_the_migration_snapshot_before_the_copy_is_verified_is_named():
    led = clean_job()
    led.records.insert(led.index("AttachVolume", VOL_B),
                       led.records.pop(led.index("DeleteSnapshot", SNAP_1)))
    [violation] = check(led.renumber())
    assert violation.startswith("inv2 migration snapshot kept") and SNAP_1 in violation


def test_an_abandoned_migration_may_delete_its_copy_and_snapshot():
    """The copy never proven is deleted, then its snapshot: the source still holds the data."""
    led = Ledger()
    led.add("CreateVolume", A, tags=job_tags(), created=[VOL_A])
    led.add("CreateSnapshot", A, resources=[VOL_A], created=[SNAP_1],
            tags=job_tags(**{"spotrun:role": "migration-snapshot"}))
    led.add("CreateVolume", B, resources=[SNAP_1], created=[VOL_B], tags=job_tags())
    led.add("AttachVolume", B, resources=[VOL_B, B]).step(B, VOL_B, "attached")
    led.add("DeleteVolume", B, resources=[VOL_B]).add("DeleteSnapshot", B, resources=[SNAP_1])
    assert soakwitness.migration_violations(led.records, JOB) == []


# -- the completion record, read from a real ext4 image --------------------------------------

def _image(tmp_path, files: dict[str, bytes]):
    if not shutil.which("mkfs.ext4") or not shutil.which("debugfs"):
        pytest.fail("mkfs.ext4 and debugfs (e2fsprogs) are needed: apt-get install e2fsprogs")
    root = tmp_path / "root"
    root.mkdir()
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    image = tmp_path / "vol.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(image), "8M"], check=True)
    return SimpleNamespace(dataplane=SimpleNamespace(volume_path=lambda volume_id: image))


def test_the_completion_record_is_read_from_the_volume_image(tmp_path):
    record = {"time": "2027-01-15T08:00:00Z", "instance_id": B}
    cloud = _image(tmp_path, {".spotrun-completed.json": json.dumps(record).encode(),
                              "other.txt": b"x"})
    assert soakcheck.final_completion(cloud, [{"VolumeId": VOL_B}]) == (record, None)


def test_an_image_without_the_record_reads_as_none(tmp_path):
    cloud = _image(tmp_path, {"other.txt": b"x"})
    assert soakcheck.final_completion(cloud, [{"VolumeId": VOL_B}]) == (None, None)


def test_an_unreadable_image_is_an_error_not_an_absent_record(tmp_path):
    bad = tmp_path / "bad.img"
    bad.write_bytes(b"\0" * 65536)
    cloud = SimpleNamespace(dataplane=SimpleNamespace(volume_path=lambda volume_id: bad))
    record, error = soakcheck.final_completion(cloud, [{"VolumeId": VOL_B}])
    assert record is None and error and "bad.img" in error


def test_a_cancel_on_the_agents_record_alone_is_named_when_the_trainer_keeps_one():
    """The agent's own record is its word: a trainer that speaks the protocol leaves its
    record too (found by a broken agent that took a stopped trainer for a finished one)."""
    [violation] = check(clean_job(), require_trainer_record=True, trainer_completion=None)
    assert violation.startswith("inv5 only success cancels") and "trainer's own" in violation
    assert check(clean_job(), require_trainer_record=True,
                 trainer_completion={"time": "2027-01-15T08:00:00Z"}) == []


def test_both_records_are_read_from_the_volume_image(tmp_path):
    agent = {"time": "2027-01-15T08:00:00Z", "instance_id": B}
    trainer = {"time": "2027-01-15T07:59:59Z", "metrics": {"loss": 0.5}}
    cloud = _image(tmp_path, {".spotrun-completed.json": json.dumps(agent).encode(),
                              "checkpoints/.spotrun-trainer-completed.json": json.dumps(trainer).encode()})
    assert soakcheck.final_records(cloud, [{"VolumeId": VOL_B}]) == (agent, trainer, None)


def test_the_resume_check_reads_the_trainers_own_lines_priority_prefix_and_all(tmp_path):
    """inv4's "reached" comes from what the trainer wrote (its stop line, its store's saves),
    not from the agent's events; the store's lines carry a journal priority prefix."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "trainer.log").write_text(
        '{"event": "trainer_start", "resume_step": 32, "runs": 2}\n'
        '<6>{"event":"checkpoint_saved","component":"store","step":40}\n'
        'Traceback (most recent call last): not JSON\n'
        '<6>{"event":"checkpoint_saved","component":"store","step":59}\n'
        '{"event": "trainer_preempted", "step": 59}\n')
    job = SimpleNamespace(cloud=SimpleNamespace(instance=lambda _: SimpleNamespace(state_dir=state)))
    assert [e["step"] for e in soakcheck._trainer_said(job, "i-1", "checkpoint_saved")] == [40, 59]
    assert soakcheck._trainer_said(job, "i-1", "trainer_preempted") == [{"event": "trainer_preempted", "step": 59}]
    assert soakcheck._trainer_said(job, "i-1", "trainer_start")[0]["resume_step"] == 32

"""Issue 21, decisions from fresh state, on moto's real EC2: a volume is deleted only as the plan
saw it (re-read right before DeleteVolume), a source mounted after its copy was made is never
deleted, and the lease's fencing check runs before every call that changes the job."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from c2_world import JOB, aws, clients, job_volume, launch, make_config  # noqa: E402,F401

from spotrun import migration as M  # noqa: E402
from spotrun import tags as T  # noqa: E402
from spotrun.lease import LeaseLost  # noqa: E402


def live(ec2) -> dict[str, dict]:
    volumes = ec2.describe_volumes(Filters=T.job_filters(JOB))["Volumes"]
    return {v["VolumeId"]: v for v in volumes if v["State"] not in ("deleting", "deleted")}


def described(ec2, volume_id: str) -> dict:
    return ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]


def lost() -> None:
    raise LeaseLost("taken")


def test_a_copy_planned_as_unproven_is_not_deleted_once_it_was_proven(aws):
    """Defect 2 at its root: the plan saw the copy at step 'mounted'; by the time of the delete
    its owner had proven it ('done'). Before: deleted anyway."""
    ec2, _ = clients(aws)
    copy = job_volume(ec2, "us-east-1b", **{M.SOURCE_VOLUME: "vol-gone", T.GENERATION: "2",
                                            M.STEP: M.STEP_MOUNTED})
    planned = described(ec2, copy["VolumeId"])
    ec2.create_tags(Resources=[copy["VolumeId"]], Tags=[{"Key": M.STEP, "Value": M.STEP_DONE}])
    with pytest.raises(M.StalePlan, match="migration-step mounted -> done"):
        M.delete_volume(ec2, planned, "unproven copy", 10)
    assert copy["VolumeId"] in live(ec2)


def test_a_volume_attached_since_the_plan_is_not_deleted(aws):
    ec2, _ = clients(aws)
    here = launch(ec2, "us-east-1b")
    volume = job_volume(ec2, "us-east-1b")
    planned = described(ec2, volume["VolumeId"])
    ec2.attach_volume(VolumeId=volume["VolumeId"], InstanceId=here.instance_id, Device="/dev/sdf")
    with pytest.raises(M.StalePlan, match=f"to {here.instance_id}"):
        M.delete_volume(ec2, planned, "leftover", 10)
    assert volume["VolumeId"] in live(ec2)


def test_a_source_mounted_after_its_copy_was_made_is_kept(aws):
    ec2, _ = clients(aws)
    config = make_config(aws)
    source = job_volume(ec2, "us-east-1a", **{M.MOUNTS: "3"})
    copy = M.migrate_here(ec2, ec2, config, launch(ec2, "us-east-1b"), source, deadline_create_s=30)
    assert M.tags_of(copy)[M.SOURCE_MOUNTS] == "3"
    ec2.create_tags(Resources=[source["VolumeId"]], Tags=[{"Key": M.MOUNTS, "Value": "4"}])
    with pytest.raises(M.VolumeDecisionError, match="was mounted after"):
        M.finish(ec2, source, copy["VolumeId"], 10)
    left = live(ec2)
    assert set(left) == {source["VolumeId"], copy["VolumeId"]}
    assert M.tags_of(left[copy["VolumeId"]])[M.STEP] == M.STEP_CREATED, "copy marked proven"


def test_the_fencing_check_comes_before_every_change(aws):
    ec2, _ = clients(aws)
    config = make_config(aws, volume={"snapshot_retention_days": 0.0})
    source = job_volume(ec2, "us-east-1a", **{M.MOUNTS: "1"})
    here = launch(ec2, "us-east-1b")
    with pytest.raises(LeaseLost):
        M.migrate_here(ec2, ec2, config, here, source, deadline_create_s=30, guard=lost)
    assert M.job_snapshots(ec2, JOB) == [], "snapshot started by an agent that lost the job"

    copy = M.migrate_here(ec2, ec2, config, here, source, deadline_create_s=30)
    with pytest.raises(LeaseLost):  # the snapshot is reused; the copy in us-east-1c is refused
        M.migrate_here(ec2, ec2, config, launch(ec2, "us-east-1c"), source, deadline_create_s=30,
                       guard=lost)
    assert len(live(ec2)) == 2, "volume created by an agent that lost the job"
    with pytest.raises(LeaseLost):
        M.set_step(ec2, copy["VolumeId"], M.STEP_VERIFIED, guard=lost)
    with pytest.raises(LeaseLost):
        M.finish(ec2, source, copy["VolumeId"], 10, guard=lost)
    with pytest.raises(LeaseLost):
        M.delete_volume(ec2, described(ec2, source["VolumeId"]), "test", 10, guard=lost)
    assert M.tags_of(live(ec2)[copy["VolumeId"]])[M.STEP] == M.STEP_CREATED
    assert source["VolumeId"] in live(ec2)
    [snapshot] = M.job_snapshots(ec2, JOB)
    with pytest.raises(LeaseLost):
        M.prune_snapshots(ec2, JOB, set(), 0.0, guard=lost)
    assert [s["SnapshotId"] for s in M.job_snapshots(ec2, JOB)] == [snapshot["SnapshotId"]]

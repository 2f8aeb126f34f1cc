"""The migration journal: the volume decision from tags, and each step on moto's real server
(snapshot → volume in this AZ → verified → delete source), idempotent when repeated."""
from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from c2_world import JOB, NAME, aws, clients, job_volume, launch, make_config  # noqa: E402,F401

from spotrun import migration as M  # noqa: E402
from spotrun import tags as T  # noqa: E402


def vol(vid, az="us-east-1a", state="available", **tags):
    base = {T.NAME: NAME, T.JOB: JOB, T.GENERATION: "1"}
    base.update(tags)
    return {"VolumeId": vid, "AvailabilityZone": az, "State": state,
            "CreateTime": datetime.now(timezone.utc), "Tags": T.as_list(base)}


def test_resolve_none_and_single():
    assert M.resolve([]) is None
    assert M.resolve([vol("vol-1", state="deleting")]) is None
    plan = M.resolve([vol("vol-1")])
    assert plan.current["VolumeId"] == "vol-1" and plan.source is None and not plan.unverified


def test_resolve_unverified_copy_keeps_source_as_current():
    copy = vol("vol-2", az="us-east-1b", **{T.GENERATION: "2", M.SOURCE_VOLUME: "vol-1",
                                            M.STEP: M.STEP_MOUNTED})
    plan = M.resolve([vol("vol-1"), copy])
    assert plan.current["VolumeId"] == "vol-1"
    assert [v["VolumeId"] for v in plan.unverified] == ["vol-2"]
    assert plan.source is None


def test_resolve_verified_copy_is_current_and_source_is_leftover():
    copy = vol("vol-2", az="us-east-1b", **{T.GENERATION: "2", M.SOURCE_VOLUME: "vol-1",
                                            M.STEP: M.STEP_VERIFIED})
    other = vol("vol-3", az="us-east-1c", **{T.GENERATION: "2", M.SOURCE_VOLUME: "vol-1",
                                             M.STEP: M.STEP_CREATED})
    plan = M.resolve([vol("vol-1"), copy, other])
    assert plan.current["VolumeId"] == "vol-2"
    assert plan.source["VolumeId"] == "vol-1"
    assert [v["VolumeId"] for v in plan.unverified] == ["vol-3"]


def test_resolve_copy_whose_source_is_gone_is_the_volume():
    copy = vol("vol-2", **{T.GENERATION: "2", M.SOURCE_VOLUME: "vol-1", M.STEP: M.STEP_VERIFIED})
    assert M.resolve([copy]).current["VolumeId"] == "vol-2"


@pytest.mark.parametrize("volumes, words", [
    ([vol("vol-1"), vol("vol-2", az="us-east-1b")], "no migration journal links them"),
    ([vol("vol-1"), vol("vol-2", **{M.SOURCE_VOLUME: "vol-1", T.GENERATION: "5"})],
     "generation is not the next one"),
    ([vol("vol-1", state="error")], "vol-1 is in state 'error'"),
    ([vol("vol-1"), vol("vol-2", **{M.SOURCE_VOLUME: "vol-1", T.GENERATION: "2", M.STEP: "verified"}),
      vol("vol-3", **{M.SOURCE_VOLUME: "vol-1", T.GENERATION: "2", M.STEP: "done"})],
     "two verified copies"),
])
def test_resolve_refuses_to_guess(volumes, words):
    with pytest.raises(M.VolumeDecisionError, match=words):
        M.resolve(volumes)


def test_token_is_a_valid_client_token_and_stable():
    assert M.token("a", "b") == M.token("a", "b") != M.token("a", "c")
    assert len(M.token("x" * 500)) <= 64


def test_migration_steps_on_moto_are_idempotent(aws):
    ec2, _ = clients(aws)
    config = make_config(aws, volume={"snapshot_retention_days": 0.0})
    source = job_volume(ec2, "us-east-1a", **{M.MOUNTS: "3", T.PHASE: "training"})
    here = launch(ec2, "us-east-1b")

    first = M.migrate_here(ec2, ec2, config, here, source, deadline_create_s=30)
    again = M.migrate_here(ec2, ec2, config, here, source, deadline_create_s=30)
    assert first["VolumeId"] == again["VolumeId"], "a repeated step made a second volume"
    assert first["AvailabilityZone"] == "us-east-1b"
    assert (first["Size"], first["VolumeType"], first["Iops"], first["Throughput"], first["Encrypted"]) \
        == (8, "gp3", 3000, 125, True)
    tags = M.tags_of(first)
    assert tags[M.SOURCE_VOLUME] == source["VolumeId"]
    assert tags[T.GENERATION] == "2" and tags[M.STEP] == M.STEP_CREATED
    assert tags[T.PHASE] == "training", "progress tags follow the data"
    snaps = M.job_snapshots(ec2, JOB)
    assert len(snaps) == 1 and M.tags_of(snaps[0])[M.MOUNTS] == "3"
    assert len(ec2.describe_volumes(Filters=T.job_filters(JOB))["Volumes"]) == 2

    plan = M.resolve(ec2.describe_volumes(Filters=T.job_filters(JOB, NAME))["Volumes"])
    assert plan.current["VolumeId"] == source["VolumeId"]

    M.finish(ec2, source, first["VolumeId"], deadline_s=30)
    left = ec2.describe_volumes(Filters=T.job_filters(JOB, NAME))["Volumes"]
    assert [v["VolumeId"] for v in left] == [first["VolumeId"]]
    assert M.tags_of(left[0])[M.STEP] == M.STEP_DONE
    assert M.prune_snapshots(ec2, JOB, {first["VolumeId"]}, 0.0) == [snaps[0]["SnapshotId"]]
    assert M.job_snapshots(ec2, JOB) == []


def test_snapshot_is_fresh_only_until_the_next_mount(aws):
    ec2, _ = clients(aws)
    source = job_volume(ec2, "us-east-1a", **{M.MOUNTS: "1"})
    snap = M.start_snapshot(ec2, ec2, JOB, source, M.ROLE_DRAIN_SNAPSHOT)
    assert M.fresh_snapshot(ec2, JOB, source)["SnapshotId"] == snap["SnapshotId"]
    ec2.create_tags(Resources=[source["VolumeId"]], Tags=[{"Key": M.MOUNTS, "Value": "2"}])
    remounted = ec2.describe_volumes(VolumeIds=[source["VolumeId"]])["Volumes"][0]
    assert M.fresh_snapshot(ec2, JOB, remounted) is None
    newer = M.start_snapshot(ec2, ec2, JOB, remounted, M.ROLE_MIGRATION_SNAPSHOT)
    assert newer["SnapshotId"] != snap["SnapshotId"]
    # The older one is past retention 0 and not the newest of the live volume.
    assert M.prune_snapshots(ec2, JOB, {source["VolumeId"]}, 0.0) == [snap["SnapshotId"]]
    # Retention keeps young snapshots of deleted volumes.
    assert M.prune_snapshots(ec2, JOB, set(), 1.0) == []

"""The timing model: durations the EBS overlay replays, and their validation."""
from __future__ import annotations

import time

import pytest

from spotrun.localcloud import TimingModel


def test_fast_is_sub_second_and_aws_like_is_not():
    fast, aws = TimingModel.fast(), TimingModel.aws_like()
    durations = ("volume_create_s", "snapshot_s", "attach_s", "detach_s",
                 "detach_after_terminate_s")
    assert all(getattr(fast, name) < 1.5 for name in durations)
    assert all(getattr(aws, name) >= 5 for name in durations)


def test_scaled_and_named():
    assert TimingModel.aws_like().scaled(0.1).snapshot_s == pytest.approx(6.0)
    assert TimingModel.named("aws") == TimingModel.aws_like()
    with pytest.raises(ValueError, match="unknown model"):
        TimingModel.named("slowish")
    with pytest.raises(ValueError, match="poll_s"):
        TimingModel(poll_s=0)


def test_the_cloud_replays_the_modelled_durations(cloud_factory):
    timing = TimingModel(volume_create_s=0.6, snapshot_s=0.8, attach_s=0.4, detach_s=0.4)
    cloud = cloud_factory(timing)
    ec2 = cloud.client("ec2")
    inst = cloud.launch_instance()
    start = time.monotonic()
    vol = ec2.create_volume(Size=1, AvailabilityZone=inst.az)["VolumeId"]
    cloud.wait_for_event(lambda e: e.get("event") == "volume_available"
                         and e["volume_id"] == vol)
    assert ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["State"] == "available"
    assert time.monotonic() - start >= 0.6

    start = time.monotonic()
    snap = ec2.create_snapshot(VolumeId=vol)["SnapshotId"]
    progress = ec2.describe_snapshots(SnapshotIds=[snap])["Snapshots"][0]
    assert progress["State"] == "pending" and progress["Progress"].endswith("%")
    cloud.wait_for_event(lambda e: e.get("event") == "snapshot_completed"
                         and e["snapshot_id"] == snap)
    completed = ec2.describe_snapshots(SnapshotIds=[snap])["Snapshots"][0]
    assert (completed["State"], completed["Progress"]) == ("completed", "100%")
    assert time.monotonic() - start >= 0.8

    start = time.monotonic()
    ec2.attach_volume(VolumeId=vol, InstanceId=inst.instance_id, Device="/dev/sdf")
    cloud.wait_for_event(lambda e: e.get("event") == "volume_attached" and e["volume_id"] == vol)
    assert time.monotonic() - start >= 0.4
    start = time.monotonic()
    ec2.detach_volume(VolumeId=vol)
    cloud.wait_for_event(lambda e: e.get("event") == "volume_detached" and e["volume_id"] == vol)
    assert time.monotonic() - start >= 0.4
    assert ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["State"] == "available"

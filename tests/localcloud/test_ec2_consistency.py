"""The local cloud's EC2 layer on request: new resources invisible for a while (eventual
consistency), retried mutations meeting their own effect, and AttachVolume refused with
IncorrectState though the volume is available."""
from __future__ import annotations

import time

import pytest
from botocore.exceptions import ClientError

from localcloud_helpers import wait_until
from spotrun.localcloud.faults import FaultPlan


def error_of(call):
    with pytest.raises(ClientError) as caught:
        call()
    return caught.value.response["Error"]


def test_a_new_volume_is_not_found_by_id_nor_listed_until_its_window_passes(cloud, ec2):
    cloud.ec2_faults(not_found_after_create_s=1.5)
    made = time.monotonic()
    vol = ec2.create_volume(Size=1, AvailabilityZone="us-east-1a",
                            TagSpecifications=[{"ResourceType": "volume",
                                                "Tags": [{"Key": "job", "Value": "j1"}]}])["VolumeId"]
    error = error_of(lambda: ec2.describe_volumes(VolumeIds=[vol]))
    assert error["Code"] == "InvalidVolume.NotFound" and vol in error["Message"]
    assert ec2.describe_volumes(Filters=[{"Name": "tag:job", "Values": ["j1"]}])["Volumes"] == []
    assert vol not in [v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]]
    # The cloud's own state (the checker's view) has it all along.
    checker = cloud.client("ec2", faults=False)
    assert [v["VolumeId"] for v in checker.describe_volumes(VolumeIds=[vol])["Volumes"]] == [vol]
    wait_until(lambda: ec2.describe_volumes(Filters=[{"Name": "tag:job", "Values": ["j1"]}])["Volumes"],
               timeout=5, what="the volume to be listed")
    assert time.monotonic() - made >= 1.4
    assert ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["VolumeId"] == vol


def test_a_new_snapshot_is_not_found_by_id_nor_listed_until_its_window_passes(cloud, ec2):
    vol = ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"]
    cloud.ec2_faults(not_found_after_create_s=1.0)
    snap = ec2.create_snapshot(VolumeId=vol)["SnapshotId"]
    assert error_of(lambda: ec2.describe_snapshots(SnapshotIds=[snap]))["Code"] == \
        "InvalidSnapshot.NotFound"
    listed = ec2.describe_snapshots(OwnerIds=["self"],
                                    Filters=[{"Name": "volume-id", "Values": [vol]}])["Snapshots"]
    assert listed == []
    wait_until(lambda: ec2.describe_snapshots(OwnerIds=["self"], Filters=[
        {"Name": "volume-id", "Values": [vol]}])["Snapshots"], timeout=5, what="the snapshot listed")
    assert ec2.describe_snapshots(SnapshotIds=[snap])["Snapshots"][0]["SnapshotId"] == snap


def test_a_volume_replayed_by_its_client_token_is_not_hidden_again(cloud, ec2):
    cloud.ec2_faults(not_found_after_create_s=0.5)
    first = ec2.create_volume(Size=1, AvailabilityZone="us-east-1a", ClientToken="t-1")["VolumeId"]
    wait_until(lambda: ec2.describe_volumes()["Volumes"], timeout=5, what="the volume listed")
    again = ec2.create_volume(Size=1, AvailabilityZone="us-east-1a", ClientToken="t-1")["VolumeId"]
    assert again == first
    assert [v["VolumeId"] for v in ec2.describe_volumes(VolumeIds=[first])["Volumes"]] == [first]


def test_performed_then_5xx_detach_then_a_retry_finds_it_available(cloud, ec2):
    inst = cloud.launch_instance(az="us-east-1a")
    vol = ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"]
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["State"] == "available")
    ec2.attach_volume(VolumeId=vol, InstanceId=inst.instance_id, Device="/dev/sdf")
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["Attachments"][0]["State"]
               == "attached", what="attached")
    cloud.ec2_faults(performed_then_5xx={"DetachVolume": 1.0})
    assert error_of(lambda: ec2.detach_volume(VolumeId=vol, InstanceId=inst.instance_id))[
        "Code"] == "InternalError"
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["State"] == "available",
               what="the detach to complete")
    again = error_of(lambda: ec2.detach_volume(VolumeId=vol, InstanceId=inst.instance_id))
    assert again["Code"] == "IncorrectState" and "'available'" in again["Message"]


def test_attach_answered_incorrect_state_is_not_performed(cloud, ec2):
    inst = cloud.launch_instance(az="us-east-1a")
    vol = ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"]
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["State"] == "available")
    cloud.ec2_faults(attach_incorrect_state=1.0)
    error = error_of(lambda: ec2.attach_volume(VolumeId=vol, InstanceId=inst.instance_id,
                                               Device="/dev/sdf"))
    assert error["Code"] == "IncorrectState" and vol in error["Message"]
    checker = cloud.client("ec2", faults=False)
    assert checker.describe_volumes(VolumeIds=[vol])["Volumes"][0]["Attachments"] == []
    event = cloud.wait_for_event(lambda e: e.get("event") == "ec2_fault_injected"
                                 and e.get("kind") == "incorrect_state", timeout=1)
    assert event["action"] == "AttachVolume"


@pytest.mark.parametrize("bad", [dict(attach_incorrect_state=1.5),
                                 dict(not_found_after_create_s=-1)])
def test_bad_new_fault_settings_are_refused_naming_the_field(bad):
    with pytest.raises(ValueError) as error:
        FaultPlan(**bad)
    assert next(iter(bad)) in str(error.value)

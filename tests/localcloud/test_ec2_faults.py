"""Fault injection on the EC2 API: the error codes botocore recognises, and the
"performed, then answered 5xx" cases that leave the resource created."""
from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from localcloud_helpers import wait_until
from spotrun.localcloud.ebs import device_link_name
from spotrun.localcloud.faults import FaultInjector, FaultPlan


def error_of(call):
    with pytest.raises(ClientError) as caught:
        call()
    return caught.value.response


def test_throttling_is_request_limit_exceeded_503(cloud, ec2):
    cloud.ec2_faults(throttle=1.0, seed=1)
    response = error_of(lambda: ec2.describe_volumes())
    assert response["Error"]["Code"] == "RequestLimitExceeded"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 503
    event = cloud.wait_for_event("ec2_fault_injected", timeout=1)
    assert (event["kind"], event["action"]) == ("throttle", "DescribeVolumes")


def test_botocore_retries_throttling_by_itself(cloud):
    # Half the calls throttled: botocore's standard retry mode gets through, as on EC2.
    cloud.ec2_faults(throttle=0.5, seed=3)
    ec2 = cloud.client("ec2", max_attempts=10)
    for _ in range(5):
        assert "Volumes" in ec2.describe_volumes()
    assert any(e["event"] == "ec2_fault_injected" for e in cloud.events)


def test_server_errors_are_internal_error_or_unavailable(cloud, ec2):
    cloud.ec2_faults(server_error=1.0, seed=7)
    seen = {}
    for _ in range(12):
        response = error_of(lambda: ec2.describe_instances())
        seen[response["Error"]["Code"]] = response["ResponseMetadata"]["HTTPStatusCode"]
    assert seen == {"InternalError": 500, "Unavailable": 503}


def test_performed_then_5xx_create_volume_leaves_the_volume(cloud, ec2):
    cloud.ec2_faults(performed_then_5xx={"CreateVolume": 1.0}, seed=1)
    response = error_of(lambda: ec2.create_volume(
        Size=1, AvailabilityZone="us-east-1a",
        TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": "job", "Value": "j1"}]}]))
    assert response["Error"]["Code"] == "InternalError"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 500
    checker = cloud.client("ec2", faults=False)
    found = checker.describe_volumes(Filters=[{"Name": "tag:job", "Values": ["j1"]}])["Volumes"]
    assert len(found) == 1
    assert cloud.dataplane.volume_path(found[0]["VolumeId"]).exists()


def test_performed_then_5xx_attach_volume_attaches(cloud, ec2):
    inst = cloud.launch_instance(az="us-east-1a")
    vol = ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"]
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["State"] == "available")
    cloud.ec2_faults(performed_then_5xx={"AttachVolume": 1.0}, seed=1)
    response = error_of(lambda: ec2.attach_volume(VolumeId=vol, InstanceId=inst.instance_id,
                                                  Device="/dev/sdf"))
    assert response["Error"]["Code"] == "InternalError"
    cloud.ec2_faults()  # off again
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["Attachments"]
               and ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["Attachments"][0]["State"]
               == "attached", what="attached")
    wait_until((inst.device_dir / device_link_name(vol)).exists, what="device link")
    # A retry of the attach now meets EC2's answer to a duplicate: the volume is in use.
    again = error_of(lambda: ec2.attach_volume(VolumeId=vol, InstanceId=inst.instance_id,
                                               Device="/dev/sdf"))
    assert again["Error"]["Code"] == "VolumeInUse"


def test_performed_then_5xx_create_snapshot_leaves_the_snapshot(cloud, ec2):
    vol = ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"]
    cloud.ec2_faults(performed_then_5xx={"CreateSnapshot": 1.0}, seed=1)
    response = error_of(lambda: ec2.create_snapshot(VolumeId=vol, Description="drain"))
    assert response["Error"]["Code"] == "InternalError"
    snaps = cloud.client("ec2", faults=False).describe_snapshots(
        Filters=[{"Name": "volume-id", "Values": [vol]}])["Snapshots"]
    assert len(snaps) == 1
    assert cloud.dataplane.snapshot_path(snaps[0]["SnapshotId"]).exists()


def test_faults_only_hit_the_chosen_actions_and_never_other_services(cloud, ec2):
    cloud.ec2_faults(throttle=1.0, actions=("CreateVolume",), seed=1)
    assert "Volumes" in ec2.describe_volumes()
    assert error_of(lambda: ec2.create_volume(Size=1, AvailabilityZone="us-east-1a"))[
        "Error"]["Code"] == "RequestLimitExceeded"
    dynamodb = cloud.client("dynamodb", max_attempts=1)
    dynamodb.create_table(TableName="leases", BillingMode="PAY_PER_REQUEST",
                          AttributeDefinitions=[{"AttributeName": "job", "AttributeType": "S"}],
                          KeySchema=[{"AttributeName": "job", "KeyType": "HASH"}])
    assert dynamodb.list_tables()["TableNames"] == ["leases"]


def test_seeded_faults_replay():
    def outcomes(seed):
        injector = FaultInjector()
        injector.configure(FaultPlan(throttle=0.3, server_error=0.2,
                                     performed_then_5xx={"CreateVolume": 0.5}, seed=seed))
        result = []
        for _ in range(40):
            before = injector.before("CreateVolume")
            result.append(before.code if before else
                          (injector.after("CreateVolume") or "ok") and
                          getattr(injector.after("CreateVolume"), "code", "ok"))
        return result

    assert outcomes(5) == outcomes(5)
    assert outcomes(5) != outcomes(6)


@pytest.mark.parametrize("bad", [dict(throttle=1.5), dict(server_error=-0.1),
                                 dict(performed_then_5xx={"CreateVolume": 2})])
def test_bad_rates_are_refused_naming_the_field(bad):
    with pytest.raises(ValueError) as error:
        FaultPlan(**bad)
    assert next(iter(bad)) in str(error.value)


def test_retried_create_volume_after_performed_then_5xx_makes_one_volume(cloud):
    # botocore keeps the ClientToken across retries and EC2 honours it: one volume per call.
    cloud.ec2_faults(performed_then_5xx={"CreateVolume": 0.5}, seed=2)
    ec2 = cloud.client("ec2", max_attempts=8)
    made = [ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"]
            for _ in range(6)]
    assert sum(e["event"] == "ec2_fault_injected" for e in cloud.events) >= 1
    listed = cloud.client("ec2", faults=False).describe_volumes()["Volumes"]
    assert sorted(v["VolumeId"] for v in listed) == sorted(made)

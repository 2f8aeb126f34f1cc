"""The local cloud's call ledger: every request that reached the proxy, as the cloud saw it,
with the caller instance named by its own credentials (issue 17, "A ledger the agent cannot
write")."""
from __future__ import annotations

import json
import threading

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from spotrun.localcloud.ledger import calls, created_ids, performed, read_ledger


def instance_client(inst, service: str = "ec2"):
    """A client as a process on ``inst`` makes it: from the instance's environment alone."""
    env = inst.env()
    return boto3.client(service, region_name=env["AWS_DEFAULT_REGION"],
                        endpoint_url=env["AWS_ENDPOINT_URL"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}))


def volume_state(ec2, vol: str) -> str:
    volume = ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]
    attachments = volume["Attachments"]
    return attachments[0]["State"] if attachments else volume["State"]


def test_an_instance_s_volume_calls_are_recorded_with_resources_tags_and_caller(cloud,
                                                                                wait_until):
    inst = cloud.launch_instance(az="us-east-1a")
    ec2 = instance_client(inst)
    vol = ec2.create_volume(Size=1, AvailabilityZone="us-east-1a", TagSpecifications=[
        {"ResourceType": "volume", "Tags": [{"Key": "spotrun:job", "Value": "j1"}]}])["VolumeId"]
    wait_until(lambda: volume_state(ec2, vol) == "available", what="available")
    ec2.attach_volume(VolumeId=vol, InstanceId=inst.instance_id, Device="/dev/sdf")
    wait_until(lambda: volume_state(ec2, vol) == "attached", what="attached")
    ec2.create_tags(Resources=[vol], Tags=[{"Key": "spotrun:state", "Value": "training"}])
    ec2.delete_tags(Resources=[vol], Tags=[{"Key": "spotrun:state"}])
    ec2.detach_volume(VolumeId=vol)
    wait_until(lambda: volume_state(ec2, vol) == "available", what="detached")
    ec2.delete_volume(VolumeId=vol)

    records = cloud.ledger()
    mine = calls(records, caller_instance=inst.instance_id, mutating=True)
    assert [r["action"] for r in mine] == ["CreateVolume", "AttachVolume", "CreateTags",
                                           "DeleteTags", "DetachVolume", "DeleteVolume"]
    assert all(r["service"] == "ec2" and r["caller"] == inst.access_key_id and r["status"] == 200
               and r["error"] is None and r["injected"] is None and not r["checker"]
               for r in mine)
    create, attach, tag, untag, detach, delete = mine
    assert create["created"] == [vol] and create["tags"] == {"spotrun:job": "j1"}
    assert set(attach["resources"]) == {vol, inst.instance_id}
    assert tag["resources"] == [vol] and tag["tags"] == {"spotrun:state": "training"}
    assert untag["resources"] == [vol] and untag["tags"] == {"spotrun:state": None}
    assert detach["resources"] == [vol] and delete["resources"] == [vol]
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)
    assert all(a["t"] <= b["t"] for a, b in zip(records, records[1:]))
    # The polls are there too, read-only, and every call on the volume is found by its id.
    polls = calls(records, action="DescribeVolumes", caller_instance=inst.instance_id)
    assert polls and not calls(polls, mutating=True)
    assert {r["action"] for r in calls(records, resource=vol, mutating=True)} == {
        r["action"] for r in mine}


def test_performed_then_5xx_is_recorded_as_performed_and_a_throttle_as_not(cloud):
    inst = cloud.launch_instance(az="us-east-1a")
    ec2 = instance_client(inst)
    cloud.ec2_faults(performed_then_5xx={"CreateVolume": 1.0}, seed=1)
    with pytest.raises(ClientError) as caught:
        ec2.create_volume(Size=1, AvailabilityZone="us-east-1a")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    made = [v["VolumeId"] for v in cloud.client("ec2", faults=False).describe_volumes(
        Filters=[{"Name": "status", "Values": ["creating", "available"]}])["Volumes"]]
    assert len(made) == 1

    cloud.ec2_faults(throttle=1.0, actions=("DeleteVolume",), seed=1)
    with pytest.raises(ClientError):
        ec2.delete_volume(VolumeId=made[0])

    records = calls(cloud.ledger(), caller_instance=inst.instance_id)
    create = calls(records, action="CreateVolume")
    assert len(create) == 1
    assert (create[0]["status"], create[0]["error"]) == (500, "InternalError")
    assert create[0]["injected"] == {"kind": "performed_then_5xx", "performed": True}
    assert create[0]["created"] == made and performed(create[0])
    assert created_ids(records, "vol-") == made
    delete = calls(records, action="DeleteVolume")
    assert len(delete) == 1
    assert (delete[0]["status"], delete[0]["error"]) == (503, "RequestLimitExceeded")
    assert delete[0]["injected"] == {"kind": "throttle", "performed": False}
    assert delete[0]["resources"] == made and not performed(delete[0])


def test_a_failed_dynamodb_condition_is_recorded_with_its_error_code(cloud):
    inst = cloud.launch_instance()
    cloud.client("dynamodb").create_table(
        TableName="leases", BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "job", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "job", "KeyType": "HASH"}])
    dynamodb = instance_client(inst, "dynamodb")
    item = {"job": {"S": "j1"}, "holder": {"S": inst.instance_id}, "epoch": {"N": "1"}}
    dynamodb.put_item(TableName="leases", Item=item, ConditionExpression="attribute_not_exists(job)")
    with pytest.raises(ClientError):
        dynamodb.put_item(TableName="leases", Item=item,
                          ConditionExpression="attribute_not_exists(job)")
    dynamodb.get_item(TableName="leases", Key={"job": {"S": "j1"}})

    records = calls(cloud.ledger(), service="dynamodb")
    create, won, lost, read = records
    assert (create["action"], create["instance"], create["created"]) == (
        "CreateTable", None, ["leases"])
    assert [r["action"] for r in (won, lost)] == ["PutItem", "PutItem"]
    assert (won["status"], won["error"], performed(won)) == (200, None, True)
    assert (lost["status"], lost["error"]) == (400, "ConditionalCheckFailedException")
    assert not performed(lost)
    assert lost["resources"] == ["leases"] and lost["instance"] == inst.instance_id
    assert lost["item"] == {"job": "j1", "holder": inst.instance_id, "epoch": "1"}
    assert lost["condition"] == "attribute_not_exists(job)"
    assert (read["action"], read["key"]) == ("GetItem", {"job": "j1"})
    assert calls(records, mutating=True) == [create, won, lost]


def test_concurrent_calls_give_one_whole_line_each(cloud):
    inst = cloud.launch_instance()
    vol = cloud.client("ec2").create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"]
    threads_n, calls_n = 8, 6
    clients = [instance_client(inst) for _ in range(threads_n)]
    failures = []

    def tag(number: int) -> None:
        try:
            for call in range(calls_n):
                # Long values: a line written in pieces would interleave with another's.
                clients[number].create_tags(Resources=[vol], Tags=[
                    {"Key": f"t{number}-{call}", "Value": str(number) * 200}])
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=tag, args=(n,)) for n in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    lines = cloud.ledger_path.read_text().split("\n")
    assert lines[-1] == ""
    records = [json.loads(line) for line in lines[:-1]]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    tagged = calls(records, action="CreateTags", caller_instance=inst.instance_id)
    assert sorted(key for r in tagged for key in r["tags"]) == sorted(
        f"t{n}-{c}" for n in range(threads_n) for c in range(calls_n))
    assert all(r["tags"] == {k: k[1:k.index("-")] * 200 for k in r["tags"]} for r in tagged)


def test_operator_calls_name_no_instance_and_checker_calls_are_marked(cloud):
    inst = cloud.launch_instance()
    cloud.client("ec2").describe_volumes()
    cloud.client("ec2", faults=False).describe_snapshots(OwnerIds=["self"])
    instance_client(inst).describe_instances(InstanceIds=[inst.instance_id])
    records = cloud.ledger()
    operator = calls(records, action="DescribeVolumes")
    assert [(r["caller"], r["instance"]) for r in operator] == [("testing", None)]
    assert calls(records, action="DescribeSnapshots") == []  # the checker's: left out
    checker = calls(records, action="DescribeSnapshots", checker=True)
    assert len(checker) == 1 and checker[0]["instance"] is None
    own = calls(records, action="DescribeInstances")
    assert [(r["caller"], r["instance"]) for r in own] == [(inst.access_key_id,
                                                            inst.instance_id)]
    assert inst.access_key_id.startswith("ASIA") and len(inst.access_key_id) == 20


def test_auto_scaling_and_fleet_changes_are_recorded(cloud):
    inst = cloud.launch_instance()
    template = cloud.client("ec2").create_launch_template(
        LaunchTemplateName="job", LaunchTemplateData={"ImageId": "ami-0123456789abcdef0",
                                                      "InstanceType": "p3.2xlarge"})
    template_id = template["LaunchTemplate"]["LaunchTemplateId"]
    asg = instance_client(inst, "autoscaling")
    asg.create_auto_scaling_group(AutoScalingGroupName="job-asg", MinSize=0, MaxSize=1,
                                  DesiredCapacity=0, AvailabilityZones=["us-east-1a"],
                                  LaunchTemplate={"LaunchTemplateId": template_id})
    asg.update_auto_scaling_group(AutoScalingGroupName="job-asg", MaxSize=2)
    asg.set_desired_capacity(AutoScalingGroupName="job-asg", DesiredCapacity=0)
    asg.delete_auto_scaling_group(AutoScalingGroupName="job-asg", ForceDelete=True)
    sfr = cloud.request_spot_fleet(target_capacity=0)
    instance_client(inst).cancel_spot_fleet_requests(SpotFleetRequestIds=[sfr],
                                                     TerminateInstances=True)

    records = calls(cloud.ledger(), caller_instance=inst.instance_id, mutating=True)
    assert [(r["service"], r["action"]) for r in records[:4]] == [
        ("autoscaling", "CreateAutoScalingGroup"), ("autoscaling", "UpdateAutoScalingGroup"),
        ("autoscaling", "SetDesiredCapacity"), ("autoscaling", "DeleteAutoScalingGroup")]
    assert all("job-asg" in r["resources"] for r in records[:4])
    assert template_id in records[0]["resources"] and records[0]["created"] == ["job-asg"]
    fleet = records[4]
    assert (fleet["service"], fleet["action"]) == ("ec2", "CancelSpotFleetRequests")
    assert fleet["resources"] == [sfr]


def test_read_ledger_leaves_out_a_torn_last_line_and_refuses_a_bad_one(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"seq": 1}\n{"seq": 2}\n{"seq": 3, "act')
    assert read_ledger(path) == [{"seq": 1}, {"seq": 2}]
    path.write_text('{"seq": 1}\nnot json\n{"seq": 3}\n')
    with pytest.raises(ValueError, match=r"ledger.jsonl: line 2"):
        read_ledger(path)

"""More of EC2's real failure modes on request: connections dropped before and after the
action (no answer at all), performed-then-5xx on every mutating action the agent uses,
the "*" action, EC2's XML throttling body on the wire, and all of it set through the
control API."""
from __future__ import annotations

import pytest
import requests
from botocore.exceptions import ClientError, ConnectionClosedError

from localcloud_helpers import wait_until
from spotrun.localcloud.control import KEY_HEADER, ControlServer
from spotrun.localcloud.faults import FaultInjector, FaultPlan
from spotrun.localcloud.ledger import performed

ZONE = "us-east-1a"


def ledger_of(cloud, action):
    return [r for r in cloud.ledger() if r["action"] == action and not r["checker"]]


def volume(checker, volume_id):
    found = checker.describe_volumes(Filters=[{"Name": "volume-id", "Values": [volume_id]}])
    return found["Volumes"][0] if found["Volumes"] else None


def test_dropped_before_closes_the_connection_and_performs_nothing(cloud, ec2):
    cloud.ec2_faults(dropped_before={"CreateVolume": 1.0}, seed=1)
    with pytest.raises(ConnectionClosedError):
        ec2.create_volume(Size=1, AvailabilityZone=ZONE,
                          TagSpecifications=[{"ResourceType": "volume",
                                              "Tags": [{"Key": "job", "Value": "drop"}]}])
    checker = cloud.client("ec2", faults=False)
    assert checker.describe_volumes(Filters=[{"Name": "tag:job", "Values": ["drop"]}])["Volumes"] == []
    [record] = ledger_of(cloud, "CreateVolume")
    assert record["status"] == 0 and record["created"] == []
    assert record["injected"] == {"kind": "dropped_before", "performed": False}
    assert not performed(record)


def test_dropped_after_performs_the_action_then_closes_the_connection(cloud, ec2):
    vol = ec2.create_volume(Size=1, AvailabilityZone=ZONE)["VolumeId"]
    cloud.ec2_faults(dropped_after={"CreateSnapshot": 1.0}, seed=1)
    with pytest.raises(ConnectionClosedError):
        ec2.create_snapshot(VolumeId=vol, Description="drain")
    snaps = cloud.client("ec2", faults=False).describe_snapshots(
        Filters=[{"Name": "volume-id", "Values": [vol]}])["Snapshots"]
    assert len(snaps) == 1
    [record] = ledger_of(cloud, "CreateSnapshot")
    # What the client never saw is in the ledger: the snapshot the call made.
    assert record["created"] == [snaps[0]["SnapshotId"]]
    assert record["injected"] == {"kind": "dropped_after", "performed": True}
    assert performed(record)


def test_botocore_retries_a_dropped_connection_by_itself(cloud):
    cloud.ec2_faults(dropped_before={"*": 0.5}, seed=2)
    ec2 = cloud.client("ec2", max_attempts=10)
    for _ in range(6):
        assert "Volumes" in ec2.describe_volumes()
    kinds = [e["kind"] for e in cloud.events if e["event"] == "ec2_fault_injected"]
    assert "dropped_before" in kinds


def test_performed_then_5xx_on_every_mutating_action_the_agent_uses(cloud, ec2):
    """Each call is answered 500 and yet done, as EC2's front end failing after the back end
    acted: the fault-free view shows every effect, the ledger marks each one performed."""
    inst = cloud.launch_instance(az=ZONE)
    checker = cloud.client("ec2", faults=False)
    actions = ("CreateVolume", "CreateTags", "DeleteTags", "AttachVolume", "DetachVolume",
               "CreateSnapshot", "DeleteSnapshot", "DeleteVolume")
    cloud.ec2_faults(performed_then_5xx={a: 1.0 for a in actions}, seed=2)

    def fails(call):
        with pytest.raises(ClientError) as caught:
            call()
        assert caught.value.response["Error"]["Code"] == "InternalError"

    fails(lambda: ec2.create_volume(Size=1, AvailabilityZone=ZONE, TagSpecifications=[
        {"ResourceType": "volume", "Tags": [{"Key": "job", "Value": "p5"}]}]))
    [made] = checker.describe_volumes(Filters=[{"Name": "tag:job", "Values": ["p5"]}])["Volumes"]
    vol = made["VolumeId"]
    fails(lambda: ec2.create_tags(Resources=[vol], Tags=[{"Key": "extra", "Value": "1"}]))
    assert {"Key": "extra", "Value": "1"} in volume(checker, vol)["Tags"]
    fails(lambda: ec2.delete_tags(Resources=[vol], Tags=[{"Key": "extra"}]))
    assert all(t["Key"] != "extra" for t in volume(checker, vol)["Tags"])
    wait_until(lambda: volume(checker, vol)["State"] == "available", what="available")
    fails(lambda: ec2.attach_volume(VolumeId=vol, InstanceId=inst.instance_id, Device="/dev/sdf"))
    wait_until(lambda: volume(checker, vol)["State"] == "in-use", what="in-use")
    fails(lambda: ec2.detach_volume(VolumeId=vol))
    wait_until(lambda: volume(checker, vol)["State"] == "available", what="detached")
    fails(lambda: ec2.create_snapshot(VolumeId=vol))
    [snap] = checker.describe_snapshots(Filters=[{"Name": "volume-id", "Values": [vol]}])["Snapshots"]
    fails(lambda: ec2.delete_snapshot(SnapshotId=snap["SnapshotId"]))
    assert checker.describe_snapshots(
        Filters=[{"Name": "volume-id", "Values": [vol]}])["Snapshots"] == []
    fails(lambda: ec2.delete_volume(VolumeId=vol))
    assert volume(checker, vol) is None
    for action in actions:
        [record] = ledger_of(cloud, action)
        assert record["status"] == 500, action
        assert record["injected"] == {"kind": "performed_then_5xx", "performed": True}, action
    assert ledger_of(cloud, "CreateSnapshot")[0]["created"] == [snap["SnapshotId"]]


def test_the_any_action_rate_yields_to_a_named_one(cloud, ec2):
    cloud.ec2_faults(dropped_before={"*": 1.0, "DescribeVolumes": 0.0}, seed=1)
    assert "Volumes" in ec2.describe_volumes()
    with pytest.raises(ConnectionClosedError):
        ec2.describe_snapshots(OwnerIds=["self"])


def test_throttling_is_ec2s_xml_error_body_on_the_wire(cloud):
    cloud.ec2_faults(throttle=1.0, seed=1)
    auth = ("AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ec2/aws4_request, "
            "SignedHeaders=host, Signature=0")
    answer = requests.post(cloud.ec2_endpoint, data={"Action": "DescribeVolumes",
                                                     "Version": "2016-11-15"},
                           headers={"Authorization": auth}, timeout=10)
    assert answer.status_code == 503
    assert answer.headers["Content-Type"].startswith("text/xml")
    text = answer.text
    assert "<Response><Errors><Error><Code>RequestLimitExceeded</Code>" in text
    assert "<RequestID>" in text


def test_drop_decisions_replay_with_the_seed():
    def decisions(seed):
        injector = FaultInjector()
        injector.configure(FaultPlan(dropped_before={"*": 0.3}, dropped_after={"*": 0.3},
                                     seed=seed))
        return [(bool(injector.before("DetachVolume")), bool(injector.after("DetachVolume")))
                for _ in range(40)]
    assert decisions(11) == decisions(11)
    assert any(before for before, _ in decisions(11)) and any(after for _, after in decisions(11))


@pytest.mark.parametrize("field", ["dropped_before", "dropped_after"])
def test_bad_drop_rates_are_refused_naming_the_field(field):
    with pytest.raises(ValueError, match=rf"{field}\[DetachVolume\]"):
        FaultPlan(**{field: {"DetachVolume": 1.5}})
    with pytest.raises(ValueError, match=field):
        FaultPlan(**{field: [("DetachVolume", 0.5)]})


def test_the_control_api_sets_drops_and_refuses_a_bad_map(cloud, ec2):
    control = ControlServer(cloud, on_down=lambda: None).start()
    try:
        def post(body):
            return requests.post(control.endpoint + "/ec2-faults", json=body,
                                 headers={KEY_HEADER: control.key}, timeout=10)
        answer = post({"dropped_after": {"DescribeVolumes": 1.0}, "seed": 3})
        assert answer.status_code == 200, answer.text
        with pytest.raises(ConnectionClosedError):
            ec2.describe_volumes()
        refused = post({"dropped_before": ["DescribeVolumes"]})
        assert refused.status_code == 400 and "dropped_before" in refused.json()["error"]
        refused = post({"dropped_before": {"DescribeVolumes": 2}})
        assert refused.status_code == 400 and "dropped_before" in refused.json()["error"]
        assert post({}).status_code == 200  # off again
        assert "Volumes" in ec2.describe_volumes()
    finally:
        control.stop()


def test_the_first_attaches_are_refused_incorrect_state_then_they_go_through():
    injector = FaultInjector()
    injector.configure(FaultPlan(attach_incorrect_state_first=2, seed=1))
    answers = [injector.before("AttachVolume", {"VolumeId": "vol-1"}) for _ in range(3)]
    assert [a.code if a else None for a in answers] == ["IncorrectState", "IncorrectState", None]
    assert injector.before("DescribeVolumes") is None
    with pytest.raises(ValueError, match="attach_incorrect_state_first"):
        FaultPlan(attach_incorrect_state_first=1.5)

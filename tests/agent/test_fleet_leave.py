"""spotrun.fleet.leave against moto's server (real HTTP, real boto3): one instance fewer.

Every check reads the cloud's own record (the fleet's target, the group's sizes and members,
the instance's state and tags), never leave()'s message; ``test_planted_faults_fail_the_checks``
shows each check failing on an implementation that skips what it checks. moto has no ModifyFleet
and answers some refusals with HTTP 500: the local cloud's patches for those
(motoserver.shrink_fleets_as_ec2) are installed, as every local cloud does. The narrow error
paths (throttling, a 5xx after the work was done, a refusal) use botocore's Stubber.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Callable

import boto3
import pytest
from botocore.stub import Stubber

from spotrun import fleet
from spotrun.fleet import LEFT_FLEET_TAG, FleetError, leave
from spotrun.identity import LaunchedBy
from spotrun.localcloud.motoserver import cancel_spot_fleets_as_ec2, shrink_fleets_as_ec2

REGION = "us-east-1"
AMI = "ami-12345678"  # moto launches any id; listing its catalogue costs seconds
GONE = ("shutting-down", "terminated")


def client(service, moto_endpoint):
    return boto3.client(service, endpoint_url=moto_endpoint, region_name=REGION,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="module", autouse=True)
def _moto_as_ec2():
    shrink_fleets_as_ec2()
    cancel_spot_fleets_as_ec2()


@pytest.fixture(scope="module")
def ec2(moto_endpoint):
    return client("ec2", moto_endpoint)


@pytest.fixture(scope="module")
def autoscaling(moto_endpoint):
    return client("autoscaling", moto_endpoint)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Launched:
    """A fleet or group on moto: what launched the instances, and how to read its target."""
    launched_by: LaunchedBy
    instances: list[str]
    target: Callable[[], int]
    members: Callable[[], list[str]]  # the fleet's / group's live members, as moto records them


def spot_fleet(ec2, autoscaling, capacity: int = 2) -> Launched:
    request_id = ec2.request_spot_fleet(SpotFleetRequestConfig={
        "IamFleetRole": "arn:aws:iam::123456789012:role/fleet", "TargetCapacity": capacity,
        "Type": "maintain", "AllocationStrategy": "lowestPrice",
        "LaunchSpecifications": [{"ImageId": AMI, "InstanceType": "p3.2xlarge"}]})["SpotFleetRequestId"]

    def target() -> int:
        answer = ec2.describe_spot_fleet_requests(SpotFleetRequestIds=[request_id])
        return answer["SpotFleetRequestConfigs"][0]["SpotFleetRequestConfig"]["TargetCapacity"]

    def members() -> list[str]:
        ids = [i["InstanceId"] for i in
               ec2.describe_spot_fleet_instances(SpotFleetRequestId=request_id)["ActiveInstances"]]
        return [i for i in ids if instance_state(ec2, i) not in GONE]

    return Launched(LaunchedBy("spot-fleet", request_id), members(), target, members)


def ec2_fleet(ec2, autoscaling, capacity: int = 2) -> Launched:
    template = ec2.create_launch_template(LaunchTemplateName=unique("spotrun-leave"),
                                          LaunchTemplateData={"ImageId": AMI, "InstanceType": "p3.2xlarge"})
    # As spotrun launch makes it: Spot = Total, no On-Demand part, maintain.
    fleet_id = ec2.create_fleet(
        LaunchTemplateConfigs=[{"LaunchTemplateSpecification": {
            "LaunchTemplateId": template["LaunchTemplate"]["LaunchTemplateId"], "Version": "$Latest"}}],
        TargetCapacitySpecification={"TotalTargetCapacity": capacity, "SpotTargetCapacity": capacity,
                                     "OnDemandTargetCapacity": 0, "DefaultTargetCapacityType": "spot"},
        Type="maintain")["FleetId"]

    def spec() -> dict:
        return ec2.describe_fleets(FleetIds=[fleet_id])["Fleets"][0]["TargetCapacitySpecification"]

    def target() -> int:
        described = spec()
        # The Spot part goes down with the total (spotrun.fleet._smaller_spec).
        assert described["SpotTargetCapacity"] == described["TotalTargetCapacity"], described
        return described["TotalTargetCapacity"]

    def members() -> list[str]:
        ids = [i["InstanceId"] for i in ec2.describe_fleet_instances(FleetId=fleet_id)["ActiveInstances"]]
        return [i for i in ids if instance_state(ec2, i) not in GONE]

    return Launched(LaunchedBy("ec2-fleet", fleet_id), members(), target, members)


def group(ec2, autoscaling, capacity: int = 2, min_size: int | None = None) -> Launched:
    name = unique("spotrun-leave")
    autoscaling.create_launch_configuration(LaunchConfigurationName=name, ImageId=AMI,
                                            InstanceType="p3.2xlarge")
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=name, LaunchConfigurationName=name,
        MinSize=capacity if min_size is None else min_size, MaxSize=capacity + 1,
        DesiredCapacity=capacity, AvailabilityZones=[f"{REGION}a"])

    def described() -> dict:
        return autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]

    def members() -> list[str]:
        return [i["InstanceId"] for i in described()["Instances"]
                if i["LifecycleState"] == "InService" and instance_state(ec2, i["InstanceId"]) not in GONE]

    return Launched(LaunchedBy("autoscaling", name), members(),
                    lambda: described()["DesiredCapacity"], members)


KINDS = {"spot-fleet": spot_fleet, "ec2-fleet": ec2_fleet, "autoscaling": group}


def instance_state(ec2, instance_id: str) -> str:
    reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return reservations[0]["Instances"][0]["State"]["Name"]


def left_mark(ec2, instance_id: str) -> str | None:
    tags = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [instance_id]},
                                      {"Name": "key", "Values": [LEFT_FLEET_TAG]}])["Tags"]
    return tags[0]["Value"] if tags else None


# ---- the checks (each shown to fail on a planted fault below) ------------------------------

def check_lowered_by_one(launched: Launched, before: int) -> None:
    assert launched.target() == before - 1, f"target {launched.target()}, expected {before - 1}"


def check_terminated(ec2, instance_id: str) -> None:
    assert instance_state(ec2, instance_id) in GONE, instance_state(ec2, instance_id)


def check_others_untouched(ec2, launched: Launched, leaving: str) -> None:
    others = [i for i in launched.instances if i != leaving]
    assert sorted(launched.members()) == sorted(others), (launched.members(), others)
    for other in others:
        assert instance_state(ec2, other) == "running"


def leave_and_check(ec2, autoscaling, launched: Launched) -> str:
    before, leaving = launched.target(), launched.instances[0]
    message = leave(launched.launched_by, leaving, ec2_client=ec2, autoscaling_client=autoscaling)
    check_lowered_by_one(launched, before)
    check_terminated(ec2, leaving)
    check_others_untouched(ec2, launched, leaving)
    # A retry by the same instance (its agent restarted) lowers nothing more.
    leave(launched.launched_by, leaving, ec2_client=ec2, autoscaling_client=autoscaling)
    check_lowered_by_one(launched, before)
    check_others_untouched(ec2, launched, leaving)
    return message


# ---- behaviour ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_leave_lowers_the_target_by_one_and_terminates_only_this_instance(ec2, autoscaling, kind):
    launched = KINDS[kind](ec2, autoscaling, capacity=3)
    assert len(launched.instances) == 3
    message = leave_and_check(ec2, autoscaling, launched)
    assert "3 → 2" in message and launched.instances[0] in message
    if kind != "autoscaling":  # the mark that keeps a retry from lowering it again
        assert left_mark(ec2, launched.instances[0]) == "2"
        assert left_mark(ec2, launched.instances[1]) is None


def test_a_group_whose_minimum_blocks_the_decrement_gets_a_lower_minimum(ec2, autoscaling):
    launched = group(ec2, autoscaling, capacity=2)  # MinSize = DesiredCapacity = 2
    leave_and_check(ec2, autoscaling, launched)
    sizes = autoscaling.describe_auto_scaling_groups(
        AutoScalingGroupNames=[launched.launched_by.id])["AutoScalingGroups"][0]
    assert (sizes["MinSize"], sizes["DesiredCapacity"], sizes["MaxSize"]) == (1, 1, 3)


def test_a_group_with_a_lower_minimum_keeps_it(ec2, autoscaling):
    launched = group(ec2, autoscaling, capacity=2, min_size=0)  # as spotrun launch makes it
    leave_and_check(ec2, autoscaling, launched)
    sizes = autoscaling.describe_auto_scaling_groups(
        AutoScalingGroupNames=[launched.launched_by.id])["AutoScalingGroups"][0]
    assert (sizes["MinSize"], sizes["DesiredCapacity"]) == (0, 1)


def test_the_last_instance_takes_the_target_to_zero_not_below(ec2, autoscaling):
    launched = spot_fleet(ec2, autoscaling, capacity=1)
    leave_and_check(ec2, autoscaling, launched)
    assert launched.target() == 0


def test_a_fleet_already_gone_has_nothing_to_shrink_but_the_instance_still_ends(ec2, autoscaling):
    kept = spot_fleet(ec2, autoscaling)
    ec2.cancel_spot_fleet_requests(SpotFleetRequestIds=[kept.launched_by.id], TerminateInstances=False)
    forgotten = spot_fleet(ec2, autoscaling)  # moto forgets a request cancelled with termination
    ec2.cancel_spot_fleet_requests(SpotFleetRequestIds=[forgotten.launched_by.id], TerminateInstances=True)
    deleted = ec2_fleet(ec2, autoscaling)
    ec2.delete_fleets(FleetIds=[deleted.launched_by.id], TerminateInstances=False)
    for launched in (kept, deleted):
        leaving = launched.instances[0]
        message = leave(launched.launched_by, leaving, ec2_client=ec2, autoscaling_client=autoscaling)
        assert "nothing to shrink" in message
        check_terminated(ec2, leaving)
        assert left_mark(ec2, leaving) is None  # nothing was lowered, so nothing is marked
        assert instance_state(ec2, launched.instances[1]) == "running"
    assert kept.target() == 2  # a cancelled request keeps its target: nothing was modified
    for launched_by in (forgotten.launched_by,
                        LaunchedBy("ec2-fleet", "fleet-00000000-0000-0000-0000-000000000000"),
                        LaunchedBy("autoscaling", "no-such-group")):
        stray = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
        message = leave(launched_by, stray, ec2_client=ec2, autoscaling_client=autoscaling)
        assert "not found: nothing to shrink" in message
        check_terminated(ec2, stray)


def test_a_group_deleted_or_left_has_nothing_to_shrink(ec2, autoscaling):
    launched = group(ec2, autoscaling, capacity=2, min_size=0)
    leaving = launched.instances[0]
    autoscaling.detach_instances(InstanceIds=[leaving], AutoScalingGroupName=launched.launched_by.id,
                                 ShouldDecrementDesiredCapacity=True)
    message = leave(launched.launched_by, leaving, ec2_client=ec2, autoscaling_client=autoscaling)
    assert "not in service" in message and "nothing to shrink" in message
    assert launched.target() == 1  # the detach's decrement, none more
    check_terminated(ec2, leaving)


def test_nothing_launched_touches_nothing(ec2, autoscaling):
    stray = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    message = leave(None, stray, ec2_client=ec2, autoscaling_client=autoscaling)
    assert message == "not launched by a fleet or group: nothing to shrink"
    assert instance_state(ec2, stray) == "running"  # the caller decides
    with pytest.raises(FleetError, match="launched_by.kind 'batch' is not"):
        leave(LaunchedBy("batch", "x"), stray, ec2_client=ec2)
    with pytest.raises(FleetError, match="no autoscaling client"):
        leave(LaunchedBy("autoscaling", "g"), stray, ec2_client=ec2)
    assert instance_state(ec2, stray) == "running"


# ---- planted faults: each check above can fail -------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_planted_faults_fail_the_checks(ec2, autoscaling, kind, monkeypatch):
    shrink = {"spot-fleet": "_shrink_spot_fleet", "ec2-fleet": "_shrink_ec2_fleet",
              "autoscaling": "_leave_group"}[kind]

    def leave_with(fault: str, replacement, launched: Launched, **more_faults) -> None:
        with monkeypatch.context() as patch:
            patch.setattr(fleet, fault, replacement)
            for name, value in more_faults.items():
                patch.setattr(fleet, name, value)
            leave(launched.launched_by, launched.instances[0], ec2_client=ec2,
                  autoscaling_client=autoscaling)

    # 1. The shrink skipped, its message kept: the target check fails.
    launched = KINDS[kind](ec2, autoscaling)
    leave_with(shrink, lambda *args: "target capacity 2 → 1", launched)
    with pytest.raises(AssertionError, match="target 2, expected 1"):
        check_lowered_by_one(launched, 2)

    # 2. The termination skipped (a group's own included): the instance check fails.
    launched = KINDS[kind](ec2, autoscaling)
    leave_with("_terminate_self", lambda ec2, instance_id, deadline_s: "terminating", launched,
               **({shrink: lambda *args: "lowered"} if kind == "autoscaling" else {}))
    with pytest.raises(AssertionError, match="running"):
        check_terminated(ec2, launched.instances[0])

    # 3. The retry guard gone: the repeated call lowers the target again, the check fails.
    launched = KINDS[kind](ec2, autoscaling, capacity=3)
    if kind == "autoscaling":  # the guard is the group's record that the instance left it
        fault, replacement = "_leave_group", _leave_group_by_desired_capacity
    else:
        fault, replacement = "_left_mark", lambda *args: None
    leave_with(fault, replacement, launched)
    leave_with(fault, replacement, launched)
    with pytest.raises(AssertionError, match="target 1, expected 2"):
        check_lowered_by_one(launched, 3)

    # 4. Another instance terminated instead: the untouched-others check fails.
    launched = KINDS[kind](ec2, autoscaling)
    real = fleet._terminate_self
    leave_with("_terminate_self",
               lambda ec2, instance_id, deadline_s: real(ec2, launched.instances[1], deadline_s),
               launched)
    with pytest.raises(AssertionError):
        check_others_untouched(ec2, launched, launched.instances[0])


def _leave_group_by_desired_capacity(autoscaling, name, instance_id, deadline_s):
    """A faulty group leave: one fewer desired whenever it is called, whether or not this
    instance is still in the group (what SetDesiredCapacity + TerminateInstances would do)."""
    current = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]
    autoscaling.set_desired_capacity(AutoScalingGroupName=name,
                                     DesiredCapacity=current["DesiredCapacity"] - 1)
    return "lowered"


# ---- narrow error paths (Stubber: moto cannot throttle or fail on demand) -------------------

def stubbed(service: str):
    return boto3.client(service, region_name=REGION, aws_access_key_id="t", aws_secret_access_key="t")


NO_MARK = {"Tags": []}
TERMINATED = {"TerminatingInstances": [{"InstanceId": "i-1",
                                        "CurrentState": {"Code": 32, "Name": "shutting-down"},
                                        "PreviousState": {"Code": 16, "Name": "running"}}]}
MARK_PARAMS = {"Resources": ["i-1"], "Tags": [{"Key": LEFT_FLEET_TAG, "Value": "1"}]}


def spot_config(target: int, state: str = "active") -> dict:
    config = {"TargetCapacity": target, "IamFleetRole": "r", "Type": "maintain"}
    return {"SpotFleetRequestConfigs": [{"SpotFleetRequestId": "sfr-1", "SpotFleetRequestState": state,
                                         "SpotFleetRequestConfig": config}]}


def test_a_throttled_modify_is_retried_once_it_is_known_not_done(monkeypatch):
    monkeypatch.setattr(fleet.time, "sleep", lambda s: None)  # the backoff, not synchronisation
    ec2 = stubbed("ec2")
    modify = {"SpotFleetRequestId": "sfr-1", "TargetCapacity": 1,
              "ExcessCapacityTerminationPolicy": "noTermination"}
    with Stubber(ec2) as stub:
        stub.add_response("describe_tags", NO_MARK)
        stub.add_client_error("describe_spot_fleet_requests", "RequestLimitExceeded", http_status_code=400)
        stub.add_response("describe_spot_fleet_requests", spot_config(2))
        stub.add_response("create_tags", {}, MARK_PARAMS)
        stub.add_client_error("modify_spot_fleet_request", "RequestLimitExceeded", http_status_code=400,
                              expected_params=modify)
        stub.add_response("describe_spot_fleet_requests", spot_config(2))  # done anyway? no
        stub.add_response("modify_spot_fleet_request", {"Return": True}, modify)
        stub.add_client_error("terminate_instances", "InternalError", http_status_code=500)
        stub.add_response("describe_instances", {"Reservations": []})  # done anyway? no
        stub.add_response("terminate_instances", TERMINATED, {"InstanceIds": ["i-1"]})
        message = leave(LaunchedBy("spot-fleet", "sfr-1"), "i-1", ec2_client=ec2)
        stub.assert_no_pending_responses()
    assert "2 → 1" in message and "shutting-down" in message


def test_a_modify_performed_then_answered_5xx_is_not_repeated(monkeypatch):
    monkeypatch.setattr(fleet.time, "sleep", lambda s: None)
    ec2 = stubbed("ec2")
    spec = {"TotalTargetCapacity": 2, "SpotTargetCapacity": 2, "OnDemandTargetCapacity": 0,
            "DefaultTargetCapacityType": "spot"}
    fleet_before = {"Fleets": [{"FleetId": "fleet-1", "FleetState": "active", "Type": "maintain",
                                "TargetCapacitySpecification": spec}]}
    fleet_after = {"Fleets": [{**fleet_before["Fleets"][0], "TargetCapacitySpecification": {
        "TotalTargetCapacity": 1, "SpotTargetCapacity": 1, "OnDemandTargetCapacity": 0}}]}
    with Stubber(ec2) as stub:
        stub.add_response("describe_tags", NO_MARK)
        stub.add_response("describe_fleets", fleet_before)
        stub.add_response("create_tags", {}, MARK_PARAMS)
        stub.add_client_error("modify_fleet", "InternalError", http_status_code=503, expected_params={
            "FleetId": "fleet-1", "ExcessCapacityTerminationPolicy": "no-termination",
            "TargetCapacitySpecification": {"TotalTargetCapacity": 1, "SpotTargetCapacity": 1}})
        stub.add_response("describe_fleets", fleet_after)  # it was done: no second ModifyFleet
        stub.add_response("terminate_instances", TERMINATED)
        message = leave(LaunchedBy("ec2-fleet", "fleet-1"), "i-1", ec2_client=ec2)
        stub.assert_no_pending_responses()
    assert "2 → 1" in message and "performed" in message


def test_a_busy_group_is_retried_and_a_refusal_is_reported(monkeypatch):
    monkeypatch.setattr(fleet.time, "sleep", lambda s: None)
    ec2, autoscaling = stubbed("ec2"), stubbed("autoscaling")
    in_group = {"AutoScalingGroups": [{
        "AutoScalingGroupName": "g", "MinSize": 0, "MaxSize": 2, "DesiredCapacity": 2,
        "DefaultCooldown": 300, "AvailabilityZones": ["us-east-1a"], "HealthCheckType": "EC2",
        "CreatedTime": "2026-01-01T00:00:00Z",
        "Instances": [{"InstanceId": "i-1", "LifecycleState": "InService", "AvailabilityZone": "us-east-1a",
                       "HealthStatus": "Healthy", "ProtectedFromScaleIn": False}]}]}
    terminate = {"InstanceId": "i-1", "ShouldDecrementDesiredCapacity": True}
    with Stubber(autoscaling) as stub, Stubber(ec2) as ec2_stub:
        stub.add_response("describe_auto_scaling_groups", in_group)
        stub.add_client_error("terminate_instance_in_auto_scaling_group", "ScalingActivityInProgress",
                              http_status_code=400, expected_params=terminate)
        stub.add_response("describe_auto_scaling_groups", in_group)  # done anyway? no
        stub.add_response("terminate_instance_in_auto_scaling_group", {"Activity": {
            "ActivityId": "a", "AutoScalingGroupName": "g", "Cause": "c", "StartTime": "2026-01-01T00:00:00Z",
            "StatusCode": "InProgress"}}, terminate)
        ec2_stub.add_response("terminate_instances", TERMINATED)
        message = leave(LaunchedBy("autoscaling", "g"), "i-1", ec2_client=ec2, autoscaling_client=autoscaling)
        stub.assert_no_pending_responses()
        ec2_stub.assert_no_pending_responses()
    assert "desired capacity 2 → 1" in message
    with Stubber(ec2) as stub:
        stub.add_response("describe_tags", NO_MARK)
        stub.add_response("describe_spot_fleet_requests", spot_config(2))
        stub.add_response("create_tags", {}, MARK_PARAMS)
        stub.add_client_error("modify_spot_fleet_request", "UnauthorizedOperation", "not allowed",
                              http_status_code=403)
        stub.add_response("describe_spot_fleet_requests", spot_config(2))
        with pytest.raises(FleetError,
                           match="ModifySpotFleetRequest sfr-1: UnauthorizedOperation: not allowed"):
            leave(LaunchedBy("spot-fleet", "sfr-1"), "i-1", ec2_client=ec2)
        stub.assert_no_pending_responses()  # and no TerminateInstances: the instance stays

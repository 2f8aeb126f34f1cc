"""A sweep's instance leaving its fleet on the local cloud: spotrun.fleet.leave through the
cloud's EC2 endpoint (as an agent calls it), and the cloud's fleets keeping the lowered target.

Every wait is on the fleet's own settle/wait_for (the Spot Fleet loop) or on one synchronous
pass of InstanceAgents.reconcile (moto's EC2 Fleets and groups): nothing sleeps to synchronise.
"""
from __future__ import annotations

import sys

import pytest

from spotrun.fleet import leave
from spotrun.identity import LaunchedBy
from spotrun.localcloud.agents import InstanceAgents


def sleeper(cloud, instance):
    """A boot callable: the instance's "agent" is a process that lives until killed."""
    return cloud.start_process(instance, [sys.executable, "-c", "import time; time.sleep(120)"])


def spot_fleet_target(ec2, request_id: str) -> int:
    configs = ec2.describe_spot_fleet_requests(SpotFleetRequestIds=[request_id])["SpotFleetRequestConfigs"]
    return configs[0]["SpotFleetRequestConfig"]["TargetCapacity"]


def test_a_left_spot_fleet_instance_is_terminated_and_not_replaced(cloud):
    request_id = cloud.request_spot_fleet(target_capacity=2, az_policy="round-robin", boot=sleeper)
    fleet = cloud.fleets[request_id]
    leaving, staying = fleet.live_members()
    checker = cloud.client("ec2", faults=False)

    message = leave(LaunchedBy("spot-fleet", request_id), leaving.instance_id,
                    ec2_client=cloud.client("ec2"))
    assert "2 → 1" in message
    assert fleet.wait_for(lambda f: leaving.instance_id not in f.instance_ids(), 10)
    assert fleet.settle(10)  # a whole pass after the termination: it launched nothing
    assert [m.instance_id for m in fleet.members] == [leaving.instance_id, staying.instance_id]
    assert fleet.instance_ids() == [staying.instance_id]
    assert fleet.target_capacity == 1 and spot_fleet_target(checker, request_id) == 1
    # Terminated the way the cloud terminates: its processes and its metadata gone.
    assert cloud.instances[leaving.instance_id].state == "terminated"
    assert leaving.process.poll() is not None
    assert cloud.instances[staying.instance_id].state == "running" and staying.process.poll() is None
    modified = [e for e in fleet.events if e["event"] == "fleet_target_modified"]
    assert modified and modified[-1]["target_capacity"] == 1 and modified[-1]["source"] == "api"

    # The fleet still maintains the lowered target: the last instance lost is replaced.
    cloud.terminate(staying.instance_id)
    assert fleet.wait_for(lambda f: len(f.members) == 3 and len(f.live_members()) == 1, 10)
    assert fleet.settle(10) and len(fleet.live_members()) == 1


def test_modify_spot_fleet_request_through_the_api_raises_and_lowers_the_cloud_fleet(cloud):
    request_id = cloud.request_spot_fleet(target_capacity=1, az_policy="round-robin", boot=sleeper)
    fleet = cloud.fleets[request_id]
    ec2 = cloud.client("ec2")
    before = set(cloud.instances)
    ec2.modify_spot_fleet_request(SpotFleetRequestId=request_id, TargetCapacity=3)
    assert fleet.wait_for(lambda f: len(f.live_members()) == 3, 10)
    assert fleet.settle(10) and len(fleet.live_members()) == 3
    # The cloud's instances, booted, not moto's own: every new one is a fleet member.
    assert set(cloud.instances) - before == set(fleet.instance_ids()[1:])
    assert all(m.process is not None and m.process.poll() is None for m in fleet.live_members())

    # No policy given: EC2's "default" terminates the excess, newest first.
    first, second, newest = fleet.instance_ids()
    ec2.modify_spot_fleet_request(SpotFleetRequestId=request_id, TargetCapacity=2)
    assert fleet.wait_for(lambda f: newest not in f.instance_ids(), 10)
    assert fleet.settle(10) and fleet.instance_ids() == [first, second]
    assert cloud.instances[newest].state == "terminated"

    # "noTermination": both stay, and the one later lost is not replaced.
    ec2.modify_spot_fleet_request(SpotFleetRequestId=request_id, TargetCapacity=1,
                                  ExcessCapacityTerminationPolicy="noTermination")
    assert fleet.settle(10) and fleet.instance_ids() == [first, second]
    cloud.terminate(second)
    assert fleet.wait_for(lambda f: f.instance_ids() == [first], 10)
    assert fleet.settle(10) and fleet.instance_ids() == [first] and len(fleet.members) == 3


def test_terminate_instances_on_moto_itself_powers_a_fleet_instance_off(cloud):
    request_id = cloud.request_spot_fleet(target_capacity=1, boot=sleeper)
    fleet = cloud.fleets[request_id]
    member = fleet.live_members()[0]
    cloud.moto_client("ec2").terminate_instances(InstanceIds=[member.instance_id])  # not the cloud's endpoint
    assert fleet.wait_for(lambda f: member.instance_id not in f.instance_ids(), 10)
    assert cloud.instances[member.instance_id].state == "terminated"
    assert member.process.poll() is not None


@pytest.fixture
def agents(cloud):
    """InstanceAgents, not started: each test runs its passes itself (reconcile)."""
    return InstanceAgents(cloud)


def ec2_fleet(cloud, capacity: int) -> str:
    ec2 = cloud.client("ec2")
    template = ec2.create_launch_template(LaunchTemplateName="sweep", LaunchTemplateData={
        "ImageId": "ami-0123456789abcdef0", "InstanceType": "p3.2xlarge"})
    return ec2.create_fleet(
        LaunchTemplateConfigs=[{"LaunchTemplateSpecification": {
            "LaunchTemplateId": template["LaunchTemplate"]["LaunchTemplateId"], "Version": "$Latest"}}],
        TargetCapacitySpecification={"TotalTargetCapacity": capacity, "SpotTargetCapacity": capacity,
                                     "OnDemandTargetCapacity": 0, "DefaultTargetCapacityType": "spot"},
        Type="maintain")["FleetId"]


def live(cloud, instance_ids) -> list[str]:
    return [i for i in instance_ids if cloud.instances[i].state == "running"]


def test_a_left_ec2_fleet_instance_is_not_replaced_but_a_lost_one_is(cloud, agents):
    fleet_id = ec2_fleet(cloud, 2)
    agents.reconcile()
    leaving, staying = agents.taken
    leave(LaunchedBy("ec2-fleet", fleet_id), leaving, ec2_client=cloud.client("ec2"))
    assert cloud.instances[leaving].state == "terminated"
    agents.reconcile()
    agents.reconcile()  # a replacement launched by the first pass would be taken in by this one
    assert agents.taken == [leaving, staying] and live(cloud, agents.taken) == [staying]
    spec = cloud.client("ec2", faults=False).describe_fleets(FleetIds=[fleet_id])["Fleets"][0][
        "TargetCapacitySpecification"]
    assert (spec["TotalTargetCapacity"], spec["SpotTargetCapacity"]) == (1, 1)
    # Control: an instance lost without a decrement is replaced (so the check above can fail).
    cloud.client("ec2").terminate_instances(InstanceIds=[staying])
    agents.reconcile()
    agents.reconcile()  # the pass that launched the replacement, then the one that takes it in
    assert len(agents.taken) == 3 and live(cloud, agents.taken) == [agents.taken[2]]


def test_a_left_group_instance_is_not_replaced(cloud, agents):
    ec2, autoscaling = cloud.client("ec2"), cloud.client("autoscaling")
    template = ec2.create_launch_template(LaunchTemplateName="sweep-group", LaunchTemplateData={
        "ImageId": "ami-0123456789abcdef0", "InstanceType": "p3.2xlarge"})
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName="sweep", MinSize=2, MaxSize=2, DesiredCapacity=2,
        AvailabilityZones=[cloud.azs[0]],
        LaunchTemplate={"LaunchTemplateId": template["LaunchTemplate"]["LaunchTemplateId"]})
    agents.reconcile()
    leaving, staying = agents.taken
    message = leave(LaunchedBy("autoscaling", "sweep"), leaving, ec2_client=ec2,
                    autoscaling_client=autoscaling)
    assert "desired capacity 2 → 1, min size 2 → 1" in message
    assert cloud.instances[leaving].state == "terminated"
    agents.reconcile()
    agents.reconcile()
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["sweep"])["AutoScalingGroups"][0]
    assert [i["InstanceId"] for i in group["Instances"]] == [staying]
    assert (group["MinSize"], group["DesiredCapacity"]) == (1, 1)
    assert agents.taken == [leaving, staying] and live(cloud, agents.taken) == [staying]


def _zone_fleet(cloud, capacity: int, zones) -> str:
    ec2 = cloud.client("ec2")
    template = ec2.create_launch_template(LaunchTemplateName="zones", LaunchTemplateData={
        "ImageId": "ami-0123456789abcdef0", "InstanceType": "p3.2xlarge"})
    return ec2.create_fleet(
        LaunchTemplateConfigs=[{"LaunchTemplateSpecification": {
            "LaunchTemplateId": template["LaunchTemplate"]["LaunchTemplateId"], "Version": "$Latest"},
            "Overrides": [{"InstanceType": "p3.2xlarge", "AvailabilityZone": z} for z in zones]}],
        TargetCapacitySpecification={"TotalTargetCapacity": capacity, "SpotTargetCapacity": capacity,
                                     "OnDemandTargetCapacity": 0, "DefaultTargetCapacityType": "spot"},
        Type="maintain")["FleetId"]


def _zones_seen(cloud, agents) -> dict[str, tuple[str, str]]:
    """instance -> (the zone EC2 answers, the zone its metadata says)."""
    ec2 = cloud.client("ec2", faults=False)
    answered = {i["InstanceId"]: i["Placement"]["AvailabilityZone"]
                for r in ec2.describe_instances(InstanceIds=agents.taken)["Reservations"]
                for i in r["Instances"]}
    return {i: (answered[i], cloud.instances[i].az) for i in agents.taken}


def test_member_zones_place_fleet_instances_among_their_fleets_zones(cloud):
    """moto puts every fleet instance in the region's first zone; EC2 does not, and a sweep's
    zone-first claiming only matters when replacements land elsewhere."""
    zones = ["us-east-1a", "us-east-1b"]
    agents = InstanceAgents(cloud, member_zones="round-robin")
    _zone_fleet(cloud, 4, zones)
    agents.reconcile()
    seen = _zones_seen(cloud, agents)
    assert all(answered == metadata for answered, metadata in seen.values())  # EC2 = IMDS
    assert sorted(answered for answered, _ in seen.values()) == sorted(zones * 2)


def test_member_zones_as_launched_keeps_moto_s_choice_and_a_bad_policy_is_named(cloud):
    agents = InstanceAgents(cloud)
    _zone_fleet(cloud, 2, ["us-east-1b", "us-east-1c"])
    agents.reconcile()
    assert {answered for answered, _ in _zones_seen(cloud, agents).values()} == {"us-east-1a"}
    with pytest.raises(ValueError, match="member_zones"):
        InstanceAgents(cloud, member_zones="everywhere")

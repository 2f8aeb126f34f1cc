"""Spot Fleet emulation on a real local cloud: moto's request, replacements, AZ policy, cancel."""
from __future__ import annotations

import sys

import pytest

from spotrun.localcloud.fleetspec import AzPolicy, LaunchSpec
from spotrun.tags import SPOT_FLEET_REQUEST, as_dict


def sleeper(cloud, instance):
    """A boot callable: the instance's "agent" is a process that lives until killed."""
    return cloud.start_process(instance, [sys.executable, "-c", "import time; time.sleep(120)"])


def fleet_request(ec2, request_id: str) -> dict:
    configs = ec2.describe_spot_fleet_requests(SpotFleetRequestIds=[request_id])
    return configs["SpotFleetRequestConfigs"][0]


def test_fleet_launches_tagged_instances_and_replaces_in_the_next_az(cloud):
    request_id = cloud.request_spot_fleet(target_capacity=1, az_policy="round-robin",
                                          launch={"tags": {"spotrun:job": "j1"}}, boot=sleeper)
    fleet = cloud.fleets[request_id]
    ec2 = cloud.client("ec2", faults=False)
    config = fleet_request(ec2, request_id)
    assert config["SpotFleetRequestState"] == "active"
    assert config["SpotFleetRequestConfig"]["TargetCapacity"] == 1
    first = fleet.live_members()[0]
    assert first.az == cloud.azs[0] and first.process.poll() is None
    described = ec2.describe_instances(InstanceIds=[first.instance_id])
    tags = as_dict(described["Reservations"][0]["Instances"][0]["Tags"])
    assert tags[SPOT_FLEET_REQUEST] == request_id and tags["spotrun:job"] == "j1"
    # The instance's metadata identity carries the same tag (what the agent reads).
    assert first.instance.metadata.md.tags[SPOT_FLEET_REQUEST] == request_id

    cloud.terminate(first.instance_id)
    assert fleet.wait_for(lambda f: len(f.members) == 2 and len(f.live_members()) == 1, 10)
    second = fleet.live_members()[0]
    assert second.az == cloud.azs[1]
    assert first.process.poll() is not None  # the old instance's process tree is gone
    assert second.process.poll() is None
    events = [e["event"] for e in fleet.events]
    assert events.count("fleet_instance_launched") == 2 and "fleet_instance_gone" in events


def test_spot_interruption_at_notice_time_is_replaced_in_the_fixed_az(cloud):
    request_id = cloud.request_spot_fleet(target_capacity=1, az_policy=f"fixed:{cloud.azs[2]}")
    fleet = cloud.fleets[request_id]
    victim = fleet.instance_ids()[0]
    cloud.interrupt(victim, action="terminate", in_seconds=0.3)
    assert fleet.wait_for(lambda f: victim not in f.instance_ids() and len(f.live_members()) == 1,
                          10)
    assert [m.az for m in fleet.members] == [cloud.azs[2]] * 2


def test_terminate_instances_by_the_agent_through_the_api_is_replaced(cloud):
    request_id = cloud.request_spot_fleet(target_capacity=2, az_policy="round-robin")
    fleet = cloud.fleets[request_id]
    victim = fleet.instance_ids()[0]
    cloud.client("ec2").terminate_instances(InstanceIds=[victim])
    assert fleet.wait_for(lambda f: len(f.members) == 3 and len(f.live_members()) == 2, 10)
    assert victim not in fleet.instance_ids()


def test_raising_the_target_launches_at_once_and_lowering_it_leaves_the_excess(cloud):
    request_id = cloud.request_spot_fleet(target_capacity=1, az_policy="round-robin")
    fleet = cloud.fleets[request_id]
    ec2 = cloud.client("ec2", faults=False)
    fleet.modify_target_capacity(2)
    assert fleet.wait_for(lambda f: len(f.live_members()) == 2, 10)
    assert fleet_request(ec2, request_id)["SpotFleetRequestConfig"]["TargetCapacity"] == 2
    fleet.modify_target_capacity(1)
    excess = fleet.live_members()[-1].instance_id
    cloud.terminate(excess)  # the caller ends the excess; nothing replaces it
    assert fleet.wait_for(lambda f: excess not in f.instance_ids(), 10)
    assert fleet.settle(10)
    assert len(fleet.members) == 2 and len(fleet.live_members()) == 1
    with pytest.raises(ValueError, match="target_capacity"):
        fleet.modify_target_capacity(-1)


def test_cancel_with_terminate_via_the_api_ends_the_fleet(cloud):
    request_id = cloud.request_spot_fleet(target_capacity=2, az_policy="random", boot=sleeper)
    fleet = cloud.fleets[request_id]
    members = list(fleet.members)
    answer = cloud.client("ec2").cancel_spot_fleet_requests(SpotFleetRequestIds=[request_id],
                                                            TerminateInstances=True)
    assert answer["SuccessfulFleetRequests"][0]["SpotFleetRequestId"] == request_id
    assert fleet.wait_for(lambda f: f.state == "cancelled", 10)
    assert fleet.live_members() == [] and len(fleet.members) == 2  # no replacement
    for member in members:
        assert cloud.instances[member.instance_id].state == "terminated"
        assert member.process.poll() is not None
    # As on EC2, the request stays visible as cancelled (moto alone would forget it).
    config = fleet_request(cloud.client("ec2", faults=False), request_id)
    assert config["SpotFleetRequestState"] == "cancelled"


def test_cancel_without_terminate_keeps_instances_but_replaces_nothing(cloud):
    request_id = cloud.request_spot_fleet(target_capacity=1)
    fleet = cloud.fleets[request_id]
    survivor = fleet.instance_ids()[0]
    cloud.client("ec2").cancel_spot_fleet_requests(SpotFleetRequestIds=[request_id],
                                                   TerminateInstances=False)
    fleet.poke()
    assert fleet.wait_for(lambda f: f.state == "cancelled_running", 10)
    assert cloud.instances[survivor].state == "running"
    cloud.terminate(survivor)
    assert fleet.wait_for(lambda f: f.live_members() == [], 10)
    fleet.poke()
    assert not fleet.wait_for(lambda f: len(f.members) > 1, 0.5)


def test_one_time_request_fleet_does_not_replace(cloud):
    request_id = cloud.request_spot_fleet(target_capacity=1, fleet_type="request")
    fleet = cloud.fleets[request_id]
    cloud.terminate(fleet.instance_ids()[0])
    assert fleet.wait_for(lambda f: f.live_members() == [], 10)
    fleet.poke()
    assert not fleet.wait_for(lambda f: len(f.members) > 1, 0.5)


def test_az_policies():
    azs = ["us-east-1a", "us-east-1b", "us-east-1c"]
    robin = AzPolicy("round-robin", azs)
    assert [robin.choose() for _ in range(4)] == azs + azs[:1]
    assert {AzPolicy("fixed:us-east-1b", azs).choose() for _ in range(5)} == {"us-east-1b"}
    chosen = {AzPolicy("random", azs, seed=s).choose() for s in range(30)}
    assert chosen == set(azs)
    with pytest.raises(ValueError, match="az_policy"):
        AzPolicy("fixed:eu-west-1a", azs)
    with pytest.raises(ValueError, match="az_policy"):
        AzPolicy("cheapest", azs)


def test_bad_fleet_arguments_change_nothing(cloud):
    with pytest.raises(ValueError, match="target_capacity"):
        cloud.request_spot_fleet(target_capacity=-1)
    with pytest.raises(ValueError, match="launch"):
        LaunchSpec.of({"instance_typo": "p3.2xlarge"})
    with pytest.raises(ValueError, match="az_policy"):
        cloud.request_spot_fleet(target_capacity=1, az_policy="fixed:us-west-2a")
    assert cloud.fleets == {} and cloud.instances == {}
    requests = cloud.client("ec2", faults=False).describe_spot_fleet_requests()
    assert requests["SpotFleetRequestConfigs"] == []

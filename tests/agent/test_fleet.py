"""spotrun.fleet.cancel against moto's server (real HTTP, real boto3)."""
from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber

from spotrun.fleet import FleetError, cancel
from spotrun.identity import LaunchedBy

REGION = "us-east-1"


def client(service, moto_endpoint):
    return boto3.client(service, endpoint_url=moto_endpoint, region_name=REGION,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="module")
def ec2(moto_endpoint):
    return client("ec2", moto_endpoint)


@pytest.fixture(scope="module")
def autoscaling(moto_endpoint):
    return client("autoscaling", moto_endpoint)


@pytest.fixture(scope="module")
def ami():
    return "ami-12345678"  # moto launches any id; listing its catalogue costs seconds


def test_spot_fleet_is_cancelled_with_its_instances(ec2, autoscaling, ami):
    request_id = ec2.request_spot_fleet(SpotFleetRequestConfig={
        "IamFleetRole": "arn:aws:iam::123456789012:role/fleet", "TargetCapacity": 1,
        "Type": "maintain", "AllocationStrategy": "lowestPrice",
        "LaunchSpecifications": [{"ImageId": ami, "InstanceType": "p3.2xlarge",
                                  "TagSpecifications": [{"ResourceType": "instance",
                                                         "Tags": [{"Key": "job", "Value": "sf"}]}]}],
    })["SpotFleetRequestId"]
    instances = [i["InstanceId"] for i in
                 ec2.describe_spot_fleet_instances(SpotFleetRequestId=request_id)["ActiveInstances"]]
    assert instances  # moto launched the fleet's capacity
    launched = LaunchedBy("spot-fleet", request_id)
    assert "cancelled, instances terminating" in cancel(launched, ec2_client=ec2, autoscaling_client=autoscaling)
    states = ec2.describe_instances(InstanceIds=instances)["Reservations"][0]["Instances"]
    assert {i["State"]["Name"] for i in states} <= {"shutting-down", "terminated"}
    configs = ec2.describe_spot_fleet_requests(SpotFleetRequestIds=[request_id])["SpotFleetRequestConfigs"]
    # EC2 shows it cancelled for 48 h; plain moto forgets it. Either way a second cancel is fine.
    assert all(c["SpotFleetRequestState"].startswith("cancelled") for c in configs)
    again = cancel(launched, ec2_client=ec2, autoscaling_client=autoscaling)
    assert "already cancelled" in again or "not found" in again


def test_ec2_fleet_is_deleted(ec2, autoscaling, ami):
    template = ec2.create_launch_template(LaunchTemplateName="spotrun-test",
                                          LaunchTemplateData={"ImageId": ami, "InstanceType": "p3.2xlarge"})
    fleet_id = ec2.create_fleet(
        LaunchTemplateConfigs=[{"LaunchTemplateSpecification": {
            "LaunchTemplateId": template["LaunchTemplate"]["LaunchTemplateId"], "Version": "$Latest"}}],
        TargetCapacitySpecification={"TotalTargetCapacity": 1, "DefaultTargetCapacityType": "spot"},
        Type="maintain")["FleetId"]
    launched = LaunchedBy("ec2-fleet", fleet_id)
    assert "deleted, instances terminating" in cancel(launched, ec2_client=ec2, autoscaling_client=autoscaling)
    state = ec2.describe_fleets(FleetIds=[fleet_id])["Fleets"][0]["FleetState"]
    assert state.startswith("deleted")
    assert "already deleted" in cancel(launched, ec2_client=ec2, autoscaling_client=autoscaling)


def test_auto_scaling_group_is_scaled_to_zero(ec2, autoscaling, ami):
    autoscaling.create_launch_configuration(LaunchConfigurationName="spotrun-lc", ImageId=ami,
                                            InstanceType="p3.2xlarge")
    autoscaling.create_auto_scaling_group(AutoScalingGroupName="spotrun-asg", LaunchConfigurationName="spotrun-lc",
                                          MinSize=1, MaxSize=2, DesiredCapacity=1,
                                          AvailabilityZones=[f"{REGION}a"])
    launched = LaunchedBy("autoscaling", "spotrun-asg")
    assert "scaled to zero" in cancel(launched, ec2_client=ec2, autoscaling_client=autoscaling)
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=["spotrun-asg"])["AutoScalingGroups"][0]
    assert (group["MinSize"], group["DesiredCapacity"]) == (0, 0)
    assert group["MaxSize"] == 2
    assert "already scaled to zero" in cancel(launched, ec2_client=ec2, autoscaling_client=autoscaling)


def test_not_found_is_tolerated_and_nothing_launched_is_a_no_op(ec2, autoscaling):
    assert "not found" in cancel(LaunchedBy("spot-fleet", "sfr-00000000-0000-0000-0000-000000000000"),
                                 ec2_client=ec2, autoscaling_client=autoscaling)
    assert "not found" in cancel(LaunchedBy("ec2-fleet", "fleet-00000000-0000-0000-0000-000000000000"),
                                 ec2_client=ec2, autoscaling_client=autoscaling)
    assert "not found" in cancel(LaunchedBy("autoscaling", "no-such-group"),
                                 ec2_client=ec2, autoscaling_client=autoscaling)
    assert "nothing to cancel" in cancel(None, ec2_client=ec2, autoscaling_client=autoscaling)
    with pytest.raises(FleetError, match="launched_by.kind 'batch' is not"):
        cancel(LaunchedBy("batch", "x"), ec2_client=ec2, autoscaling_client=autoscaling)


def test_throttling_is_retried_and_hard_errors_are_reported():
    """Narrow error-path test with botocore's Stubber (moto cannot throttle on demand)."""
    ec2 = boto3.client("ec2", region_name=REGION, aws_access_key_id="t", aws_secret_access_key="t")
    active = {"SpotFleetRequestConfigs": [{"SpotFleetRequestId": "sfr-1", "SpotFleetRequestState": "active"}]}
    with Stubber(ec2) as stub:
        stub.add_response("describe_spot_fleet_requests", active)
        stub.add_client_error("cancel_spot_fleet_requests", "RequestLimitExceeded", http_status_code=503)
        stub.add_response("describe_spot_fleet_requests", active)  # "was it done anyway?" no
        stub.add_response("cancel_spot_fleet_requests", {
            "SuccessfulFleetRequests": [{"SpotFleetRequestId": "sfr-1",
                                         "CurrentSpotFleetRequestState": "cancelled_terminating",
                                         "PreviousSpotFleetRequestState": "active"}],
            "UnsuccessfulFleetRequests": []})
        assert "cancelled" in cancel(LaunchedBy("spot-fleet", "sfr-1"), ec2_client=ec2)
        stub.assert_no_pending_responses()
    with Stubber(ec2) as stub:
        stub.add_response("describe_spot_fleet_requests", active)
        stub.add_client_error("cancel_spot_fleet_requests", "UnauthorizedOperation", "not allowed",
                              http_status_code=403)
        with pytest.raises(FleetError, match="CancelSpotFleetRequests sfr-1: .*UnauthorizedOperation"):
            cancel(LaunchedBy("spot-fleet", "sfr-1"), ec2_client=ec2)

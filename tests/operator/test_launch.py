"""spotrun launch against moto's server: IMDSv2-only template, the stub, a fleet of each kind."""
from __future__ import annotations

import base64
import json

import pytest

from spotrun import tags, userdata


def _run_ok(spotrun, *argv):
    code, out, err = spotrun(*argv)
    assert code == 0, err
    return json.loads(out) if "--json" in argv else out


@pytest.mark.parametrize("fleet", ["ec2-fleet", "asg", "spot-fleet"])
def test_launch_makes_an_imdsv2_template_and_a_fleet(fleet, moto, client, job_file, job_id, spotrun):
    path = job_file(fleet=fleet, extra="max_price = 1.25")
    _run_ok(spotrun, "init", "--json", "-f", path, "--endpoint-url", moto)
    result = _run_ok(spotrun, "launch", "--json", "-f", path, "--endpoint-url", moto)
    assert result["fleet"]["kind"] == fleet

    ec2 = client("ec2")
    template = result["launch_template"]
    version = ec2.describe_launch_template_versions(
        LaunchTemplateName=template["LaunchTemplateName"], Versions=[template["Version"]])["LaunchTemplateVersions"][0]
    data = version["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    assert data["MetadataOptions"]["InstanceMetadataTags"] == "enabled"
    assert data["IamInstanceProfile"] == {"Name": f"spotrun-{job_id}"}
    raw = base64.b64decode(data["UserData"])
    assert len(raw) < 16 * 1024
    overrides = userdata.parse(raw)  # the agent can read it, and parse refuses secrets
    assert overrides["job"]["id"] == job_id and b"testing" not in raw  # no credentials of ours
    instance_tags = [t for t in data["TagSpecifications"] if t["ResourceType"] == "instance"][0]["Tags"]
    assert tags.as_dict(instance_tags)[tags.JOB] == job_id

    if fleet == "ec2-fleet":
        desc = ec2.describe_fleets(FleetIds=[result["fleet"]["id"]])["Fleets"][0]
        assert desc["Type"] == "maintain"
        assert desc["SpotOptions"]["AllocationStrategy"] == "price-capacity-optimized"
        overrides = desc["LaunchTemplateConfigs"][0]["Overrides"]
        assert {o["InstanceType"] for o in overrides} == {"p3.2xlarge", "p2.xlarge"}
        assert {o["AvailabilityZone"] for o in overrides} == {"us-west-2a", "us-west-2b"}
        assert {o["MaxPrice"] for o in overrides} == {"1.2500"}
        assert tags.as_dict(desc["Tags"])[tags.JOB] == job_id
    elif fleet == "asg":
        group = client("autoscaling").describe_auto_scaling_groups(
            AutoScalingGroupNames=[result["fleet"]["id"]])["AutoScalingGroups"][0]
        policy = group["MixedInstancesPolicy"]
        assert {o["InstanceType"] for o in policy["LaunchTemplate"]["Overrides"]} == {"p3.2xlarge", "p2.xlarge"}
        dist = policy["InstancesDistribution"]
        assert dist["SpotAllocationStrategy"] == "price-capacity-optimized"
        assert dist["OnDemandPercentageAboveBaseCapacity"] == 0 and dist["SpotMaxPrice"] == "1.2500"
        assert set(group["AvailabilityZones"]) == {"us-west-2a", "us-west-2b"}
    else:
        req = ec2.describe_spot_fleet_requests(
            SpotFleetRequestIds=[result["fleet"]["id"]])["SpotFleetRequestConfigs"][0]
        cfg = req["SpotFleetRequestConfig"]
        assert cfg["AllocationStrategy"] == "priceCapacityOptimized" and cfg["SpotPrice"] == "1.2500"
        assert cfg["IamFleetRole"].endswith(f":role/fleet-role-{job_id}")
        assert tags.as_dict(req.get("Tags"))[tags.JOB] == job_id

    # A second launch while the first has capacity is refused, naming what runs.
    code, _, err = spotrun("launch", "-f", path, "--endpoint-url", moto)
    assert code == 1 and result["fleet"]["id"] in err


def test_launch_before_init_says_so(moto, job_file, spotrun):
    code, _, err = spotrun("launch", "-f", job_file(), "--endpoint-url", moto)
    assert code == 1 and "spotrun init" in err


def test_relaunch_after_cancel_adds_a_template_version(moto, client, job_file, spotrun):
    path = job_file()
    _run_ok(spotrun, "init", "--json", "-f", path, "--endpoint-url", moto)
    first = _run_ok(spotrun, "launch", "--json", "-f", path, "--endpoint-url", moto)
    _run_ok(spotrun, "cancel", "--json", "-f", path, "--endpoint-url", moto)
    second = _run_ok(spotrun, "launch", "--json", "-f", path, "--endpoint-url", moto)
    assert int(second["launch_template"]["Version"]) == int(first["launch_template"]["Version"]) + 1
    assert second["fleet"]["id"] != first["fleet"]["id"]


def test_secret_in_the_job_file_stops_launch_before_any_call(job_file, recorder, spotrun):
    endpoint, seen = recorder
    path = job_file()
    path.write_text(path.read_text().replace('EPOCHS = "30"', 'EPOCHS = "30", WANDB_API_KEY = "abc123"'))
    code, _, err = spotrun("launch", "-f", path, "--endpoint-url", endpoint)
    assert code == 2 and "trainer.env.WANDB_API_KEY" in err and seen == []


def test_a_completed_job_is_not_launched_again(moto, client, job_file, job_id, spotrun):
    path = job_file()
    _run_ok(spotrun, "init", "--json", "-f", path, "--endpoint-url", moto)
    volume = client("ec2").describe_volumes(Filters=tags.job_filters(job_id))["Volumes"][0]
    client("ec2").create_tags(Resources=[volume["VolumeId"]], Tags=[{"Key": tags.COMPLETED,
                                                                      "Value": "2026-01-01T00:00:00+00:00"}])
    code, _, err = spotrun("launch", "-f", path, "--endpoint-url", moto)
    assert code == 1 and "completed" in err and "new job.id" in err


def test_launch_wait_returns_the_running_instance(moto, client, job_file, job_id, spotrun):
    path = job_file(extra='security_group_ids = ["sg-0123456789abcdef0"]')
    _run_ok(spotrun, "init", "--json", "-f", path, "--endpoint-url", moto)
    result = _run_ok(spotrun, "launch", "--json", "--wait", "--timeout", "60", "-f", path, "--endpoint-url", moto)
    assert len(result["instances"]) == 1
    [reservation] = client("ec2").describe_instances(InstanceIds=result["instances"])["Reservations"]
    instance = reservation["Instances"][0]
    assert instance["State"]["Name"] == "running" and instance["InstanceType"] in ("p3.2xlarge", "p2.xlarge")
    assert tags.as_dict(instance.get("Tags"))[tags.JOB] == job_id  # from the template: what cancel finds

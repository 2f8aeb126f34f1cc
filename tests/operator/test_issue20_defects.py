"""Issue 20's defects that outlived the first round of fixes, one test each:

* `status --watch` never ended after cancelling an Auto Scaling group or a Spot Fleet: the
  group (on AWS as on moto) and moto's cancelled Spot Fleet request are gone, not listed as
  finished, so only the terminated instances remained and "cancelled" was never reached;
* no credentials against the local cloud: the one line named no call and sent the user to
  `aws configure`, when any dummy pair does;
* relaunching a job as an Auto Scaling group on the local cloud: moto keeps a second
  launch-template version's user data unparsed and answers CreateAutoScalingGroup with a 500.
"""
from __future__ import annotations

import json

import pytest

from spotrun import tags


def _ok(spotrun, *argv):
    code, out, err = spotrun(*argv)
    assert code == 0, err
    return json.loads(out) if "--json" in argv else out


@pytest.mark.parametrize("fleet", ["asg", "spot-fleet"])
def test_watch_ends_after_cancel_for_every_fleet_kind(fleet, moto, client, job_file, job_id, spotrun):
    """Before the fix: exit 0 after --count refreshes (the old endless watch, bounded), no
    final line; the group/request had vanished, so nothing counted as finished capacity."""
    path = job_file(fleet=fleet)
    _ok(spotrun, "init", "-f", path, "--endpoint-url", moto)
    _ok(spotrun, "launch", "-f", path, "--endpoint-url", moto)
    _ok(spotrun, "cancel", "-f", path, "--endpoint-url", moto)
    # moto's own record: the job's instance is terminated and nothing of the job runs.
    reservations = client("ec2").describe_instances(Filters=tags.job_filters(job_id))["Reservations"]
    states = [i["State"]["Name"] for r in reservations for i in r["Instances"]]
    assert states and set(states) == {"terminated"}, states
    code, out, err = spotrun("status", "--watch", "--interval", "0.05", "--count", "10",
                             "-f", path, "--endpoint-url", moto)
    assert code == 3 and f"job {job_id} cancelled" in err, (code, err)
    assert out.count("phase ") == 1  # one refresh, then the final state


def test_watch_waits_while_nothing_was_launched_yet(moto, job_file, spotrun):
    """The other side of the rule: no capacity and no instance ever is 'not launched', not
    'cancelled' (the watch keeps waiting; --count bounds it here)."""
    path = job_file()
    _ok(spotrun, "init", "-f", path, "--endpoint-url", moto)
    code, out, err = spotrun("status", "--watch", "--interval", "0.01", "--count", "2",
                             "-f", path, "--endpoint-url", moto)
    assert code == 0 and "cancelled" not in err and out.count("phase ") == 2, (code, err)


def test_no_credentials_against_a_local_endpoint_names_the_call_and_the_fix(moto, job_file, spotrun,
                                                                             monkeypatch):
    """Before the fix: 'no AWS credentials found ...; see `aws configure`', naming no call,
    for an endpoint that takes any credentials."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    code, _, err = spotrun("status", "-f", job_file(), "--endpoint-url", moto)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("spotrun: AWS DescribeFleets failed: no AWS credentials"), err
    assert "AWS_ACCESS_KEY_ID=testing" in err and moto in err, err


LOCAL_JOB = """
[job]
id = "{job_id}"

[code]
repository = "https://github.com/example-org/spot-training.git"

[trainer]
command = ["python", "train.py"]
env = {{ EPOCHS = "{epochs}" }}

[aws]
region = "us-east-1"
lease_table = "leases-{job_id}"

[launch]
image_id = "ami-0123456789abcdef0"
instance_types = ["p3.2xlarge"]
availability_zones = ["us-east-1a", "us-east-1b"]
fleet = "asg"
"""


@pytest.fixture
def local_cloud(tmp_path, aws_env):
    """The local spot cloud itself (no agents: only its EC2 API is under test here)."""
    from spotrun.localcloud import LocalCloud, TimingModel

    cloud = LocalCloud(tmp_path / "cloud", TimingModel.fast()).start()
    try:
        yield cloud
    finally:
        cloud.stop()


def test_asg_relaunch_on_the_local_cloud_uses_the_second_template_version(local_cloud, tmp_path, job_id,
                                                                          spotrun):
    """Before the fix the second launch ended in 'AWS CreateAutoScalingGroup failed: the
    endpoint's answer is not an AWS response' (moto's AssertionError, an HTML 500)."""
    cloud = local_cloud
    path = tmp_path / "job.toml"
    endpoint = ("--endpoint-url", cloud.ec2_endpoint)
    path.write_text(LOCAL_JOB.format(job_id=job_id, epochs=30))
    _ok(spotrun, "init", "-f", path, *endpoint)
    first = _ok(spotrun, "launch", "--json", "-f", path, *endpoint)
    _ok(spotrun, "cancel", "-f", path, *endpoint)
    path.write_text(LOCAL_JOB.format(job_id=job_id, epochs=40))  # the job's settings changed
    second = _ok(spotrun, "launch", "--json", "-f", path, *endpoint)
    assert (first["launch_template"]["Version"], second["launch_template"]["Version"]) == ("1", "2")
    # The cloud's own record: the new group runs an instance from version 2, whose user data
    # is the one sent with it.
    [group] = cloud.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=[second["fleet"]["id"]])["AutoScalingGroups"]
    spec = group["MixedInstancesPolicy"]["LaunchTemplate"]["LaunchTemplateSpecification"]
    assert spec["Version"] == "2" and len(group["Instances"]) == 1, group
    ec2 = cloud.client("ec2")
    [version] = ec2.describe_launch_template_versions(
        LaunchTemplateName=spec["LaunchTemplateName"], Versions=["2"])["LaunchTemplateVersions"]
    import base64
    assert b'EPOCHS = "40"' in base64.b64decode(version["LaunchTemplateData"]["UserData"])

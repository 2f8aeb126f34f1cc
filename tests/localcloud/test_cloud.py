"""LocalCloud itself: instances (identity in moto and in metadata), processes, notices,
termination, isolation between clouds, cleanup after failures and crashes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import requests

from localcloud_helpers import loop_devices_backed_by, mounts_under, wait_until
from spotrun import config as spotrun_config
from spotrun.localcloud import LocalCloud, TimingModel
from spotrun.localcloud.ebs import EbsDataPlane, device_link_name


def imds_get(inst, path):
    session = requests.Session()
    session.trust_env = False
    token = session.put(f"{inst.imds_endpoint}/latest/api/token",
                        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}, timeout=5).text
    return session.get(f"{inst.imds_endpoint}/latest/{path}",
                       headers={"X-aws-ec2-metadata-token": token}, timeout=5)


def test_zones_region_and_endpoints(cloud):
    assert cloud.region == "us-east-1"
    assert cloud.azs == ["us-east-1a", "us-east-1b", "us-east-1c"]
    assert cloud.ec2_endpoint.startswith("http://127.0.0.1:")
    assert cloud.ec2_endpoint != cloud.moto_endpoint
    zones = cloud.client("ec2").describe_availability_zones()["AvailabilityZones"]
    assert {"us-east-1a", "us-east-1b", "us-east-1c"} <= {z["ZoneName"] for z in zones}


def test_aws_managed_policies_exist_as_on_aws(cloud):
    # `spotrun init` for a Spot Fleet attaches this one to the fleet's role.
    arn = "arn:aws:iam::aws:policy/service-role/AmazonEC2SpotFleetTaggingRole"
    policy = cloud.client("iam").get_policy(PolicyArn=arn)["Policy"]
    assert policy["PolicyName"] == "AmazonEC2SpotFleetTaggingRole"


def test_launched_instance_matches_in_moto_and_in_its_metadata(cloud):
    tags = {"Name": "trainer", "aws:ec2spot:fleet-request-id": "sfr-12345678"}
    inst = cloud.launch_instance(az="us-east-1b", instance_type="g4dn.xlarge", tags=tags,
                                 user_data=b"#!/bin/sh\necho hi\n")
    described = cloud.client("ec2").describe_instances(InstanceIds=[inst.instance_id])
    ec2_inst = described["Reservations"][0]["Instances"][0]
    assert ec2_inst["Placement"]["AvailabilityZone"] == "us-east-1b"
    assert ec2_inst["InstanceType"] == "g4dn.xlarge"
    assert {t["Key"]: t["Value"] for t in ec2_inst["Tags"]} == tags
    assert inst.az_id.startswith("use1-az")
    assert imds_get(inst, "meta-data/instance-id").text == inst.instance_id
    assert imds_get(inst, "meta-data/placement/availability-zone").text == "us-east-1b"
    assert imds_get(inst, "meta-data/placement/availability-zone-id").text == inst.az_id
    assert imds_get(inst, "user-data").content == b"#!/bin/sh\necho hi\n"
    document = imds_get(inst, "dynamic/instance-identity/document").json()
    assert (document["instanceId"], document["accountId"]) == (inst.instance_id, cloud.account_id)


def test_agent_overrides_are_a_valid_agent_config(cloud):
    inst = cloud.launch_instance()
    config = spotrun_config.from_mapping(inst.agent_overrides(), source="localcloud")
    assert config.metadata.endpoint == inst.imds_endpoint
    assert config.aws.endpoint_url == cloud.ec2_endpoint
    assert config.volume.device_dir == str(inst.device_dir)
    assert config.volume.mount_point == str(inst.root / "dltraining")
    assert config.agent.state_dir == str(inst.root / "state")
    assert config.code.workspace == str(inst.root / "workspace")
    assert inst.device_dir.is_dir() and inst.state_dir.is_dir()


def test_instance_env_has_its_own_credentials_and_no_proxies(cloud, monkeypatch):
    inst = cloud.launch_instance()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("AWS_PROFILE", "production")
    env = inst.env()
    assert "HTTPS_PROXY" not in env and "AWS_PROFILE" not in env
    # Its own key, so the cloud's call ledger can name the instance behind every call.
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_DEFAULT_REGION"]) == (inst.access_key_id, "us-east-1")
    assert inst.access_key_id.startswith("ASIA") and inst.access_key_id != "testing"
    assert env["AWS_ENDPOINT_URL"] == cloud.ec2_endpoint


def test_terminate_kills_the_process_tree_and_stops_metadata(cloud):
    inst = cloud.launch_instance()
    # A parent that ignores SIGTERM, with a child: both must die (power-off is SIGKILL).
    script = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
              "child = subprocess.Popen(['sleep', '300']); print(child.pid, flush=True);"
              "time.sleep(300)")
    proc = cloud.start_process(inst, [sys.executable, "-c", script], stdout=subprocess.PIPE)
    child_pid = int(proc.stdout.readline())
    cloud.terminate(inst.instance_id)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    wait_until(lambda: not _alive(child_pid), what="child process gone")
    assert inst.state == "terminated"
    with pytest.raises(requests.ConnectionError):
        imds_get(inst, "meta-data/instance-id")
    state = cloud.client("ec2").describe_instances(InstanceIds=[inst.instance_id])[
        "Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state in ("shutting-down", "terminated")
    proc.stdout.close()


def test_terminate_instances_through_the_api_powers_the_instance_off(cloud):
    inst = cloud.launch_instance()
    proc = cloud.start_process(inst, ["sleep", "300"])
    cloud.client("ec2").terminate_instances(InstanceIds=[inst.instance_id])
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert cloud.wait_for_event("instance_terminated")["instance_id"] == inst.instance_id


def test_spot_notice_then_termination_at_its_time(cloud):
    inst = cloud.launch_instance()
    proc = cloud.start_process(inst, ["sleep", "300"])
    assert imds_get(inst, "meta-data/spot/instance-action").status_code == 404
    when = cloud.interrupt(inst.instance_id, action="terminate", in_seconds=1.0)
    notice = imds_get(inst, "meta-data/spot/instance-action").json()
    assert notice["action"] == "terminate"
    assert notice["time"] == when.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert proc.poll() is None  # the two minutes (here one second) are the instance's
    assert proc.wait(timeout=15) == -signal.SIGKILL
    wait_until(lambda: inst.state == "terminated", what="instance terminated")


def test_stop_notice_stops_the_instance_keeping_its_attachments(cloud):
    ec2 = cloud.client("ec2")
    inst = cloud.launch_instance()
    vol = ec2.create_volume(Size=1, AvailabilityZone=inst.az)["VolumeId"]
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["State"] == "available")
    ec2.attach_volume(VolumeId=vol, InstanceId=inst.instance_id, Device="/dev/sdf")
    cloud.interrupt(inst.instance_id, action="stop", in_seconds=0)
    wait_until(lambda: inst.state == "stopped", what="instance stopped")
    attachments = ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["Attachments"]
    assert attachments and attachments[0]["InstanceId"] == inst.instance_id
    with pytest.raises(requests.ConnectionError):
        imds_get(inst, "meta-data/instance-id")
    ec2.start_instances(InstanceIds=[inst.instance_id])
    assert inst.state == "running"
    assert imds_get(inst, "meta-data/instance-id").text == inst.instance_id
    assert imds_get(inst, "meta-data/spot/instance-action").status_code == 404


def test_two_clouds_do_not_see_each_other(cloud_factory):
    one, two = cloud_factory(name="one"), cloud_factory(name="two")
    assert one.account_id != two.account_id
    one.client("ec2").create_volume(Size=1, AvailabilityZone="us-east-1a")
    assert two.client("ec2").describe_volumes()["Volumes"] == []
    assert len(one.client("ec2").describe_volumes()["Volumes"]) == 1


def test_a_new_cloud_starts_empty(cloud_factory):
    first = cloud_factory(name="first")
    first.client("ec2").create_volume(Size=1, AvailabilityZone="us-east-1a")
    first.stop()
    second = cloud_factory(name="second")
    assert second.client("ec2").describe_volumes()["Volumes"] == []


@pytest.mark.loopdev
def test_stop_unmounts_and_releases_loop_devices_even_mid_test(cloud_factory, tmp_path):
    cloud = cloud_factory()
    ec2 = cloud.client("ec2")
    inst = cloud.launch_instance()
    vol = ec2.create_volume(Size=1, AvailabilityZone=inst.az)["VolumeId"]
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["State"] == "available")
    ec2.attach_volume(VolumeId=vol, InstanceId=inst.instance_id, Device="/dev/sdf")
    link = wait_until(lambda: (inst.device_dir / device_link_name(vol)).exists()
                      and inst.device_dir / device_link_name(vol), what="link")
    subprocess.run(["mkfs.ext4", "-q", "-F", os.path.realpath(link)], check=True)
    subprocess.run(["mount", os.path.realpath(link), str(inst.mount_point)], check=True)
    assert mounts_under(tmp_path) and loop_devices_backed_by(tmp_path)
    cloud.stop()
    assert mounts_under(tmp_path) == []
    assert loop_devices_backed_by(tmp_path) == []


@pytest.mark.loopdev
def test_a_crashed_runs_loop_devices_are_released_at_the_next_start(tmp_path):
    # A run that died without stop(): its data plane bound a loop device and vanished.
    crashed = EbsDataPlane(tmp_path / "cloud")
    assert crashed.uses_loop_devices
    crashed.create_volume("vol-0123456789abcdef0", 1)
    crashed.attach("vol-0123456789abcdef0", tmp_path / "dev")
    assert len(loop_devices_backed_by(tmp_path)) == 1
    with LocalCloud(tmp_path / "cloud", TimingModel.fast()):
        assert loop_devices_backed_by(tmp_path) == []


def test_directory_volumes_where_loop_devices_are_unavailable(cloud_factory):
    cloud = cloud_factory(use_loop_devices=False)
    assert cloud.uses_loop_devices is False
    assert any(e["event"] == "localcloud_started" and e["uses_loop_devices"] is False
               for e in cloud.events)
    assert cloud.wait_for_event("loop_devices_unavailable", timeout=0)["reason"]
    ec2 = cloud.client("ec2")
    inst = cloud.launch_instance()
    vol = ec2.create_volume(Size=1, AvailabilityZone=inst.az)["VolumeId"]
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["State"] == "available")
    ec2.attach_volume(VolumeId=vol, InstanceId=inst.instance_id, Device="/dev/sdf")
    link = inst.device_dir / device_link_name(vol)
    wait_until(link.exists, what="link to the volume directory")
    (link / "data.txt").write_text("kept")
    snap = ec2.create_snapshot(VolumeId=vol)["SnapshotId"]
    ec2.get_waiter("snapshot_completed").wait(SnapshotIds=[snap],
                                              WaiterConfig={"Delay": 0.1, "MaxAttempts": 100})
    copy = ec2.create_volume(SnapshotId=snap, AvailabilityZone="us-east-1c")["VolumeId"]
    assert (cloud.dataplane.volume_path(copy) / "data.txt").read_text() == "kept"


def test_bad_arguments_are_refused_with_the_field_named(cloud):
    with pytest.raises(ValueError, match="az"):
        cloud.launch_instance(az="eu-west-1a")
    inst = cloud.launch_instance()
    with pytest.raises(ValueError, match="action"):
        cloud.interrupt(inst.instance_id, action="reboot")
    with pytest.raises(ValueError, match="instance_id"):
        cloud.terminate("i-doesnotexist")
    with pytest.raises(ValueError, match="TimingModel.attach_s"):
        TimingModel(attach_s=-1)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_another_region_is_served_whole(cloud_factory):
    cloud = cloud_factory(region="eu-west-1", azs=("eu-west-1a", "eu-west-1b"))
    ec2 = cloud.client("ec2")
    inst = cloud.launch_instance(az="eu-west-1b")
    vol = ec2.create_volume(Size=1, AvailabilityZone="eu-west-1b")["VolumeId"]
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["State"] == "available")
    ec2.attach_volume(VolumeId=vol, InstanceId=inst.instance_id, Device="/dev/sdf")
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["Attachments"][0][
        "State"] == "attached", what="attached")
    ec2.detach_volume(VolumeId=vol)  # the overlay's own moto calls go to the same region
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["State"] == "available",
               what="detached")
    assert cloud.moto_client("ec2").describe_volumes(VolumeIds=[vol])["Volumes"][0][
        "Attachments"] == []


def test_instance_tags_in_metadata_follow_create_and_delete_tags(cloud):
    inst = cloud.launch_instance(tags={"Name": "trainer"})
    ec2 = cloud.client("ec2")
    ec2.create_tags(Resources=[inst.instance_id], Tags=[{"Key": "spotrun:phase", "Value": "train"}])
    assert imds_get(inst, "meta-data/tags/instance/spotrun:phase").text == "train"
    ec2.delete_tags(Resources=[inst.instance_id], Tags=[{"Key": "Name"}])
    assert imds_get(inst, "meta-data/tags/instance/Name").status_code == 404
    assert inst.tags == {"spotrun:phase": "train"}

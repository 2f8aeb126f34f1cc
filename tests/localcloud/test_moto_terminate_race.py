"""TerminateInstances on the local cloud while the EBS clock finishes a DetachVolume in
another thread (long soak, seed 7, job 59: the soak's terminate failed with
InvalidAttachment.NotFound). EC2 never refuses a termination for a volume that has just
detached; moto's teardown, patched by the local cloud, skips it."""
from __future__ import annotations

import boto3
import pytest
from moto import mock_aws
from moto.ec2.models import ec2_backends

from spotrun.localcloud import motoserver


@pytest.fixture
def ec2():
    with mock_aws():
        yield boto3.client("ec2", region_name="us-east-1", aws_access_key_id="testing",
                           aws_secret_access_key="testing")


def _half_detached(ec2) -> tuple[str, str]:
    """An instance whose block-device list still names a volume whose own attachment is gone:
    the moment between moto's two steps of a DetachVolume running in another thread."""
    [instance] = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1,
                                   Placement={"AvailabilityZone": "us-east-1a"})["Instances"]
    volume = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    ec2.attach_volume(VolumeId=volume, InstanceId=instance["InstanceId"], Device="/dev/sdf")
    backend = ec2_backends["123456789012"]["us-east-1"]
    backend.get_volume(volume).attachment = None
    return instance["InstanceId"], volume


def test_moto_alone_refuses_the_termination(ec2, monkeypatch):
    # What the patch is for (else the test below proves nothing): unpatched, it fails.
    from moto.ec2.models.instances import Instance

    monkeypatch.setattr(Instance, "teardown_defaults", _moto_teardown)
    instance_id, _ = _half_detached(ec2)
    with pytest.raises(Exception, match="InvalidAttachment.NotFound"):
        ec2.terminate_instances(InstanceIds=[instance_id])


def test_the_local_cloud_terminates_and_skips_the_detached_volume(ec2, monkeypatch):
    from moto.ec2.models.instances import Instance

    monkeypatch.setattr(Instance, "teardown_defaults", _moto_teardown)
    motoserver.terminate_despite_a_finished_detach()
    instance_id, volume = _half_detached(ec2)
    ec2.terminate_instances(InstanceIds=[instance_id])
    [reservation] = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    assert reservation["Instances"][0]["State"]["Name"] == "terminated"
    assert ec2.describe_volumes(VolumeIds=[volume])["Volumes"][0]["State"] == "available"


def _moto_teardown(self) -> None:
    """moto's own Instance.teardown_defaults (5.x), as the local cloud found it."""
    for device_path in list(self.block_device_mapping.keys()):
        volume = self.block_device_mapping[device_path]
        volume_id = volume.volume_id
        self.ec2_backend.detach_volume(volume_id, self.id, device_path)
        if volume.delete_on_termination:
            self.ec2_backend.delete_volume(volume_id)

"""AttachVolume to this instance: a free device name, the call made at most once in effect
(an attach answered 5xx may have been performed), and a clear error when another instance
attached the volume at the same moment."""
from __future__ import annotations

from typing import Callable

from spotrun import ec2 as ec2mod
from spotrun.log import get_logger
from spotrun.volumecheck import VolumeError

DEVICE_NAMES = tuple(f"/dev/sd{c}" for c in "fghijklmnop")


log = get_logger("volumes")


def used_device_names(ec2, instance_id: str) -> set[str]:
    """The device names in use on the instance: one DescribeInstances, whose block device
    mappings list every EBS volume attached or attaching (or still detaching) there."""
    used = set()
    for reservation in ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]:
        for instance in reservation["Instances"]:
            used |= {m["DeviceName"] for m in instance.get("BlockDeviceMappings", [])}
    # /dev/xvdf and /dev/sdf are the same slot.
    return {name.replace("/dev/xvd", "/dev/sd") for name in used}


def _attach_transient(exc: BaseException) -> bool:
    """IncorrectState: DescribeVolumes said available, AttachVolume disagrees (EC2's views
    catch up with each other); tried again like throttling, within the attach deadline."""
    return ec2mod.is_transient(exc) or ec2mod.error_code(exc) == "IncorrectState"


def attach_call(ec2, ec2_once, volume_id: str, instance_id: str, deadline_s: float,
                guard: Callable[[], None]) -> None:
    """Request the attach (``guard`` runs right before each request)."""
    def attached_to_me() -> bool:
        att = ec2mod.attachment_of(ec2mod.describe_volume(ec2, volume_id))
        return att is not None and att["InstanceId"] == instance_id

    tried: set[str] = set()
    while True:
        used = used_device_names(ec2, instance_id) | tried
        free = [n for n in DEVICE_NAMES if n not in used]
        if not free:
            raise VolumeError(f"cannot attach {volume_id}: no free device name in "
                              f"/dev/sd[f-p] on {instance_id}")
        name = free[0]

        def request() -> dict:
            guard()
            return ec2_once.attach_volume(VolumeId=volume_id, InstanceId=instance_id, Device=name)

        try:
            ec2mod.call_retrying(
                f"attaching {volume_id}", request,
                settled=attached_to_me, deadline_s=deadline_s, transient=_attach_transient,
                done_codes=("VolumeInUse",))
        except Exception as exc:  # noqa: BLE001 - classified below
            if attached_to_me():  # an earlier try that answered 5xx did it
                break
            if ec2mod.error_code(exc) in ("InvalidParameterValue", "InvalidDevice.InUse") \
                    and "device" in str(exc).lower():
                tried.add(name)
                continue
            if ec2mod.error_code(exc) == "VolumeInUse":
                holder = ec2mod.attachment_of(ec2mod.describe_volume(ec2, volume_id))
                raise VolumeError(
                    f"volume {volume_id} was attached by another instance "
                    f"({holder['InstanceId'] if holder else 'unknown'}) at the same time; "
                    f"this instance leaves it alone (use a lease table to make one wait)") from None
            raise
        break
    log.info("volume_attach_requested", volume_id=volume_id, device_name=name)

"""The job's first volume in the making: a boot states it right before its CreateVolume, so a
replacement that lists no volume waits for that one instead of making a second.

EC2 may leave a new volume out of DescribeVolumes for a while (``aws.consistency_window_s``).
The long soak's job 115: a first boot was cut short right after its CreateVolume, the
replacement 7 s later listed no volume and made another, and every later boot stopped on two
unlinked generation-1 volumes. The statement is ``"<create token> <unix time>"``, kept

- with a lease table, in the job's lease item (spotrun.lease: a consistent read, and every
  later write of the item carries it on), written as the lease check before the create;
- without one (``aws.single_instance``), as the tag ``spotrun:first-volume`` on the boot's
  own instance, read back from DescribeInstances by the job tag (EC2 lists a terminated
  instance, with its tags, for about an hour: far longer than the window). A tag is not read
  consistently, but it is written before the create and read by a replacement that comes
  after the old instance ended; a statement that cannot be written (an IAM policy from before
  this tag) is logged and the create goes on, as before.
"""
from __future__ import annotations

import time
from typing import Callable

from botocore.exceptions import BotoCoreError, ClientError

from spotrun import tags as T
from spotrun.log import get_logger

log = get_logger("firstvolume")


def statement(create_token: str, now: Callable[[], float] = time.time) -> str:
    return f"{create_token} {now():.0f}"


def parse(value: str | None) -> tuple[str, float] | None:
    """(token, unix time) from a statement; None for none, or one that cannot be read."""
    if not value:
        return None
    token, _, stated_at = value.partition(" ")
    try:
        return (token, float(stated_at)) if token else None
    except ValueError:
        return None


def state(lease, ec2, instance_id: str, create_token: str) -> None:
    """Right before the CreateVolume of the job's first volume. With a lease, LeaseLost when
    this agent no longer holds the job (nothing is created then)."""
    if lease is not None:
        lease.note_first_volume(create_token)
        return
    try:
        ec2.create_tags(Resources=[instance_id],
                        Tags=[{"Key": T.FIRST_VOLUME, "Value": statement(create_token)}])
    except (ClientError, BotoCoreError) as exc:
        log.warning("first_volume_not_stated", error=str(exc)[:200],
                    hint="a replacement within aws.consistency_window_s may make a second volume")


def latest(lease, ec2, job_id: str) -> tuple[str, float] | None:
    """The latest statement of a first volume in the making for ``job_id``, or None."""
    if lease is not None:
        return lease.first_volume_stated()
    found: list[tuple[str, float]] = []
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": f"tag:{T.JOB}", "Values": [job_id]}])
    for page in pages:
        for reservation in page["Reservations"]:
            for instance in reservation["Instances"]:
                value = T.as_dict(instance.get("Tags", [])).get(T.FIRST_VOLUME)
                stated = parse(value)
                if value and stated is None:
                    log.warning("first_volume_unreadable", instance_id=instance["InstanceId"],
                                value=value[:80])
                if stated is not None:
                    found.append(stated)
    return max(found, key=lambda s: s[1]) if found else None

"""Exclusive ownership of a job: one agent trains on, or migrates, a job's volume at a time.

With a lease table (``aws.lease_table``, created by the operator's ``spotrun init`` with
:func:`table_definition`) the lease is one DynamoDB item per job, written with conditional
writes, so "who holds it" is decided atomically on AWS's side. It is taken when free or
already ours, taken over only when the holder instance is no longer running (EC2 says so),
and released after the volume is detached on drain. There is no time-based expiry on
purpose: a slow drain must never let a second agent in while the first still writes. A
stopped holder still holds (its volume stays attached and it may start again); one that is
shutting down, terminated or unknown to EC2 does not.

Without a table (single-instance fleets) :func:`wait_until_unheld` is the guard: the agent
never touches a volume that is attached to, or being released by, another instance; it
waits until the volume is ``available`` (the holder detached it, or EC2 detached it after
terminating the holder).
"""
from __future__ import annotations

import time
from datetime import datetime, timezone

from botocore.exceptions import ClientError

from spotrun import ec2 as ec2mod
from spotrun.errors import SpotrunError
from spotrun.log import get_logger


def log():
    """Looked up per call, so the process's logging configuration (made later) applies."""
    return get_logger("lease")


KEY = "job"
# A stopped instance keeps its volumes attached and may start again: it still holds the job.
ALIVE_STATES = ("pending", "running", "stopping", "stopped")


class LeaseHeld(SpotrunError):
    """Another running instance holds the job."""


def table_definition(name: str) -> dict:
    """``create_table`` keyword arguments for the lease table (the operator's init uses them)."""
    return {
        "TableName": name,
        "AttributeDefinitions": [{"AttributeName": KEY, "AttributeType": "S"}],
        "KeySchema": [{"AttributeName": KEY, "KeyType": "HASH"}],
        "BillingMode": "PAY_PER_REQUEST",
    }


def instance_state(ec2, instance_id: str) -> str:
    """EC2's state name for ``instance_id``; 'absent' when EC2 no longer knows it."""
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError as exc:
        if ec2mod.error_code(exc) in ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"):
            return "absent"
        raise
    for reservation in reservations:
        for instance in reservation["Instances"]:
            return instance["State"]["Name"]
    return "absent"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Lease:
    def __init__(self, dynamodb, table: str, job_id: str, instance_id: str, az: str, ec2,
                 *, poll_s: float = 2.0):
        self.db = dynamodb
        self.table = table
        self.job_id = job_id
        self.instance_id = instance_id
        self.az = az
        self.ec2 = ec2
        self.poll_s = poll_s

    def _put(self, condition: str, values: dict) -> bool:
        try:
            self.db.put_item(
                TableName=self.table,
                Item={KEY: {"S": self.job_id}, "holder": {"S": self.instance_id},
                      "az": {"S": self.az}, "since": {"S": _now()}},
                ConditionExpression=condition,
                ExpressionAttributeValues=values,
            )
            return True
        except ClientError as exc:
            code = ec2mod.error_code(exc)
            if code == "ConditionalCheckFailedException":
                return False
            if code == "ResourceNotFoundException":
                raise SpotrunError(
                    f"aws.lease_table: DynamoDB table {self.table!r} does not exist "
                    "(create it with 'spotrun init', or set aws.lease_table = \"\")") from None
            raise

    def holder(self) -> dict | None:
        item = self.db.get_item(TableName=self.table, Key={KEY: {"S": self.job_id}},
                                ConsistentRead=True).get("Item")
        return {k: v["S"] for k, v in item.items()} if item else None

    def acquire(self, deadline_s: float) -> None:
        """Take the job's lease, waiting up to ``deadline_s`` while a running instance holds it."""
        deadline = time.monotonic() + deadline_s
        me = {":me": {"S": self.instance_id}}
        waited = False
        while True:
            if self._put(f"attribute_not_exists({KEY}) OR holder = :me", me):
                log().info("lease_acquired", table=self.table, waited=waited)
                return
            current = self.holder()
            if current is None:
                continue
            other = current["holder"]
            state = instance_state(self.ec2, other)
            if state not in ALIVE_STATES:
                if self._put("holder = :old", {":old": {"S": other}}):
                    log().warning("lease_taken_over", table=self.table, previous_holder=other,
                                previous_state=state)
                    return
                continue
            if time.monotonic() >= deadline:
                raise LeaseHeld(
                    f"job {self.job_id!r} is held by instance {other} ({state}, "
                    f"{current.get('az', '?')}, since {current.get('since', '?')}); this instance "
                    f"waited {deadline_s:.0f} s and will not touch the job's volume")
            if not waited:
                log().info("lease_wait", table=self.table, holder=other, holder_state=state)
                waited = True
            time.sleep(self.poll_s)

    def release(self) -> None:
        try:
            self.db.delete_item(TableName=self.table, Key={KEY: {"S": self.job_id}},
                                ConditionExpression="holder = :me",
                                ExpressionAttributeValues={":me": {"S": self.instance_id}})
            log().info("lease_released", table=self.table)
        except ClientError as exc:
            if ec2mod.error_code(exc) != "ConditionalCheckFailedException":
                raise
            log().warning("lease_not_ours_at_release", table=self.table)


def wait_until_unheld(ec2, volume_id: str, instance_id: str, deadline_s: float,
                      poll_s: float = 2.0) -> dict:
    """Wait until ``volume_id`` is not attached to (or detaching from) another instance.

    Returns the volume as last described. Raises LeaseHeld after ``deadline_s``.
    """
    deadline = time.monotonic() + deadline_s
    logged = False
    while True:
        volume = ec2mod.describe_volume(ec2, volume_id)
        if volume is None:
            raise ec2mod.ResourceGone(f"volume {volume_id} no longer exists")
        if volume["State"] == "error":
            raise ec2mod.ResourceFailed(f"volume {volume_id} is in state 'error'")
        att = ec2mod.attachment_of(volume)
        if att is None or att["InstanceId"] == instance_id:
            if volume["State"] in ("available", "in-use"):
                return volume
        else:
            holder_state = instance_state(ec2, att["InstanceId"])
            if time.monotonic() >= deadline:
                raise LeaseHeld(
                    f"volume {volume_id} is still {att['State']} to instance {att['InstanceId']} "
                    f"({holder_state}) after {deadline_s:.0f} s; not touching it")
            if not logged:
                log().info("volume_held_wait", volume_id=volume_id, holder=att["InstanceId"],
                         holder_state=holder_state, attachment_state=att["State"])
                logged = True
        if time.monotonic() >= deadline:
            raise LeaseHeld(f"volume {volume_id} did not become usable in {deadline_s:.0f} s "
                            f"(state {volume['State']})")
        time.sleep(poll_s)

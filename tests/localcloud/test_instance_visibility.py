"""EC2's eventual consistency for instances (issue 21): a just-launched instance can briefly
be unknown to DescribeInstances. The local cloud answers InvalidInstanceID.NotFound for an
instance on request, to the callers named, for a number of lookups or a time, and the
ledger records those answers as injected, not performed."""
from __future__ import annotations

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from spotrun.localcloud.ledger import calls


def instance_client(inst):
    """EC2 as a process on ``inst`` sees it: its own credentials, no retries."""
    env = inst.env()
    return boto3.client("ec2", region_name=env["AWS_DEFAULT_REGION"],
                        endpoint_url=env["AWS_ENDPOINT_URL"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}))


def lookup(ec2, instance_id: str) -> str:
    try:
        found = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError as exc:
        return exc.response["Error"]["Code"]
    return found[0]["Instances"][0]["State"]["Name"]


def test_the_next_lookups_of_a_holder_by_one_caller_answer_not_found_then_it_is_seen(cloud):
    holder = cloud.launch_instance(az="us-east-1a")
    racer = cloud.launch_instance(az="us-east-1b")
    bystander = cloud.launch_instance(az="us-east-1c")
    cloud.instance_not_found(holder.instance_id, lookups=2, callers={racer.access_key_id})
    mine, theirs = instance_client(racer), instance_client(bystander)

    assert lookup(theirs, holder.instance_id) == "running"  # another caller's view is EC2's
    assert [lookup(mine, holder.instance_id) for _ in range(3)] == [
        "InvalidInstanceID.NotFound", "InvalidInstanceID.NotFound", "running"]
    assert lookup(mine, racer.instance_id) == "running"  # only the instance named is hidden
    checker = cloud.client("ec2", faults=False)
    assert checker.describe_instances(InstanceIds=[holder.instance_id])["Reservations"]

    lookups = calls(cloud.ledger(), action="DescribeInstances", resource=holder.instance_id,
                    caller_instance=racer.instance_id)
    assert [(r["error"], (r["injected"] or {}).get("performed")) for r in lookups] == [
        ("InvalidInstanceID.NotFound", False), ("InvalidInstanceID.NotFound", False), (None, None)]


def test_a_timed_rule_hides_the_instance_from_every_caller_until_it_ends(cloud, wait_until):
    holder = cloud.launch_instance(az="us-east-1a")
    racer = cloud.launch_instance(az="us-east-1b")
    cloud.instance_not_found(holder.instance_id, seconds=1.0)
    ec2 = instance_client(racer)
    assert lookup(ec2, holder.instance_id) == "InvalidInstanceID.NotFound"
    assert lookup(cloud.client("ec2", max_attempts=1), holder.instance_id) == \
        "InvalidInstanceID.NotFound"
    # The window ends: the same caller sees the instance again (EC2 caught up).
    wait_until(lambda: lookup(ec2, holder.instance_id) == "running", timeout=10,
               what="the instance to be seen again")


def test_a_rule_without_a_bound_or_with_a_bad_one_is_refused(cloud):
    holder = cloud.launch_instance(az="us-east-1a")
    with pytest.raises(ValueError, match="lookups, seconds"):
        cloud.instance_not_found(holder.instance_id)
    with pytest.raises(ValueError, match="lookups"):
        cloud.instance_not_found(holder.instance_id, lookups=0)
    with pytest.raises(ValueError, match="seconds"):
        cloud.instance_not_found(holder.instance_id, seconds=-1)

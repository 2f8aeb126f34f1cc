"""spotrun.ec2: the client's retry settings and endpoint, create-at-most-once after a
"performed then 5xx" answer (moto's real server), and the waiters' deadlines and failure
states (Stubber: moto cannot put a volume or snapshot into 'error')."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from c2_world import JOB, REGION, aws, clients, make_config  # noqa: E402,F401

from spotrun import ec2 as E  # noqa: E402
from spotrun import tags as T  # noqa: E402


def server_error(op="CreateVolume", code="InternalError", status=500):
    return ClientError({"Error": {"Code": code, "Message": "boom"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


def test_client_uses_config_retry_mode_and_endpoint(aws):
    config = make_config(aws, aws={"retry_mode": "adaptive", "max_attempts": 7})
    c = E.client("ec2", config.aws, REGION)
    assert c.meta.endpoint_url == aws
    assert c.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 7}
    assert c.meta.config.connect_timeout == E.CONNECT_TIMEOUT_S
    once = E.single_attempt(c, config.aws)
    assert once.meta.config.retries["total_max_attempts"] == 1 and once.meta.endpoint_url == aws


def test_create_once_finds_what_a_failed_answer_created(aws):
    ec2, _ = clients(aws)
    token = "spotrun-test-token"
    tags = [{"Key": T.JOB, "Value": JOB}, {"Key": "spotrun:create-token", "Value": token}]
    calls = []

    def create():
        calls.append(1)
        ec2.create_volume(AvailabilityZone="us-east-1a", Size=1,
                          TagSpecifications=[{"ResourceType": "volume", "Tags": tags}])
        raise server_error()  # performed, then answered 5xx

    def find():
        found = ec2.describe_volumes(Filters=[{"Name": "tag:spotrun:create-token", "Values": [token]}])
        return found["Volumes"][0] if found["Volumes"] else None

    volume = E.create_once("test volume", create, find, deadline_s=10)
    assert len(calls) == 1
    assert len(ec2.describe_volumes(Filters=T.job_filters(JOB))["Volumes"]) == 1
    assert volume["VolumeId"] == find()["VolumeId"]


def test_create_once_retries_throttling_and_raises_other_errors():
    attempts = []

    def create():
        attempts.append(1)
        if len(attempts) < 3:
            raise server_error(code="RequestLimitExceeded", status=503)
        return {"VolumeId": "vol-1"}

    assert E.create_once("x", create, lambda: None, deadline_s=10) == {"VolumeId": "vol-1"}
    assert len(attempts) == 3

    def denied():
        raise server_error(code="UnauthorizedOperation", status=403)

    with pytest.raises(ClientError, match="UnauthorizedOperation"):
        E.create_once("x", denied, lambda: None, deadline_s=10)


def test_call_retrying_accepts_work_done_despite_the_error():
    def attach():
        raise server_error("AttachVolume")

    assert E.call_retrying("attach", attach, settled=lambda: True, deadline_s=5) is None
    with pytest.raises(ClientError):
        E.call_retrying("attach", attach, settled=lambda: False, deadline_s=0.3)


def _stubbed():
    config = make_config("http://127.0.0.1:9")
    c = E.client("ec2", config.aws, REGION)
    return c, Stubber(c)


def test_volume_in_error_fails_at_once():
    c, stub = _stubbed()
    stub.add_response("describe_volumes", {"Volumes": [{"VolumeId": "vol-1", "State": "creating"}]})
    stub.add_response("describe_volumes", {"Volumes": [{"VolumeId": "vol-1", "State": "error"}]})
    started = time.monotonic()
    with stub, pytest.raises(E.ResourceFailed, match="volume vol-1 is in state 'error'"):
        E.wait_for_volume(c, "vol-1", ("available",), deadline_s=60, poll_s=0.01)
    assert time.monotonic() - started < 5


def test_snapshot_in_error_fails_at_once_and_gone_is_named():
    c, stub = _stubbed()
    stub.add_response("describe_snapshots", {"Snapshots": [
        {"SnapshotId": "snap-1", "State": "error", "StateMessage": "disk on fire"}]})
    stub.add_client_error("describe_snapshots", service_error_code="InvalidSnapshot.NotFound")
    with stub:
        with pytest.raises(E.ResourceFailed, match="snap-1 is in state 'error': disk on fire"):
            E.wait_for_snapshot(c, "snap-1", deadline_s=60, poll_s=0.01)
        with pytest.raises(E.ResourceGone, match="snapshot snap-1 no longer exists"):
            E.wait_for_snapshot(c, "snap-1", deadline_s=60, poll_s=0.01)


def test_waiter_deadline_names_the_resource_and_last_state():
    c, stub = _stubbed()
    for _ in range(200):
        stub.add_response("describe_snapshots", {"Snapshots": [{"SnapshotId": "snap-1", "State": "pending"}]})
    with stub, pytest.raises(E.WaitTimeout, match="snapshot snap-1 to complete: not done after 0 s .*pending"):
        E.wait_for_snapshot(c, "snap-1", deadline_s=0.2, poll_s=0.01)


def test_attachment_to_another_instance_fails_the_attach_wait():
    c, stub = _stubbed()
    stub.add_response("describe_volumes", {"Volumes": [{"VolumeId": "vol-1", "State": "in-use", "Attachments": [
        {"InstanceId": "i-other", "State": "attached", "VolumeId": "vol-1"}]}]})
    with stub, pytest.raises(E.ResourceFailed, match="attached to another instance, i-other"):
        E.wait_for_attachment(c, "vol-1", "i-me", deadline_s=10, poll_s=0.01)

"""CancelSpotFleetRequests on the local cloud answers as EC2 for a request it does not hold or
one already cancelled (a retry after a dropped answer met moto's HTTP 500 in the long soak)."""
from __future__ import annotations

import boto3
import pytest
from moto import mock_aws
from moto.ec2.responses.spot_fleets import SpotFleets

from spotrun.localcloud import motoserver

MOTO_CANCEL = SpotFleets.cancel_spot_fleet_requests  # as moto ships it, before any patch


@pytest.fixture
def ec2():
    with mock_aws():
        yield boto3.client("ec2", region_name="us-east-1", aws_access_key_id="testing",
                           aws_secret_access_key="testing")


def _spot_fleet(ec2) -> str:
    return ec2.request_spot_fleet(SpotFleetRequestConfig={
        "IamFleetRole": "arn:aws:iam::123456789012:role/fleet", "TargetCapacity": 1,
        "AllocationStrategy": "lowestPrice",
        "LaunchSpecifications": [{"ImageId": "ami-12345678", "InstanceType": "t3.micro"}],
    })["SpotFleetRequestId"]


def test_moto_alone_answers_500_for_a_request_it_forgot(ec2, monkeypatch):
    # What the patch is for (else the test below proves nothing): unpatched, a re-cancel fails.
    monkeypatch.setattr(SpotFleets, "cancel_spot_fleet_requests", MOTO_CANCEL)
    request_id = _spot_fleet(ec2)
    ec2.cancel_spot_fleet_requests(SpotFleetRequestIds=[request_id], TerminateInstances=True)
    # In-process moto lets the KeyError out; its server answers it as HTTP 500.
    with pytest.raises(KeyError, match=request_id):
        ec2.cancel_spot_fleet_requests(SpotFleetRequestIds=[request_id], TerminateInstances=True)


def test_a_forgotten_or_unknown_request_is_refused_by_name(ec2, monkeypatch):
    monkeypatch.setattr(SpotFleets, "cancel_spot_fleet_requests", MOTO_CANCEL)
    motoserver.cancel_spot_fleets_as_ec2()
    request_id = _spot_fleet(ec2)
    first = ec2.cancel_spot_fleet_requests(SpotFleetRequestIds=[request_id], TerminateInstances=True)
    assert [r["SpotFleetRequestId"] for r in first["SuccessfulFleetRequests"]] == [request_id]
    assert first["UnsuccessfulFleetRequests"] == []
    again = ec2.cancel_spot_fleet_requests(
        SpotFleetRequestIds=[request_id, "sfr-00000000000000000"], TerminateInstances=True)
    assert again["SuccessfulFleetRequests"] == []
    assert [(r["SpotFleetRequestId"], r["Error"]["Code"]) for r in again["UnsuccessfulFleetRequests"]] \
        == [(request_id, "fleetRequestIdDoesNotExist"),
            ("sfr-00000000000000000", "fleetRequestIdDoesNotExist")]


def test_one_already_cancelled_is_not_cancellable(ec2, monkeypatch):
    from moto.ec2.models import ec2_backends

    monkeypatch.setattr(SpotFleets, "cancel_spot_fleet_requests", MOTO_CANCEL)
    motoserver.cancel_spot_fleets_as_ec2()
    request_id = _spot_fleet(ec2)
    # The cloud's own fleets keep a request cancelled with termination listed, as EC2 does.
    ec2_backends["123456789012"]["us-east-1"].spot_fleet_requests[request_id].state = "cancelled"
    answer = ec2.cancel_spot_fleet_requests(SpotFleetRequestIds=[request_id], TerminateInstances=True)
    assert [(r["SpotFleetRequestId"], r["Error"]["Code"]) for r in answer["UnsuccessfulFleetRequests"]] \
        == [(request_id, "fleetRequestNotInCancellableState")]
    assert ec2.describe_spot_fleet_requests(SpotFleetRequestIds=[request_id])[
        "SpotFleetRequestConfigs"][0]["SpotFleetRequestState"] == "cancelled"

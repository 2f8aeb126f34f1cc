"""spotrun.identity from the metadata emulator, with DescribeTags on moto's server."""
from __future__ import annotations

import boto3
from botocore.config import Config
import pytest

from spotrun.identity import (Identity, IdentityError, LaunchedBy, identify,
                              launched_by_from_tags)
from spotrun.imds import MetadataClient, MetadataError


def _ec2(endpoint: str, region: str = "us-east-1"):
    return boto3.client("ec2", region_name=region, endpoint_url=endpoint,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _launch(endpoint: str, tags: dict[str, str]) -> str:
    ec2 = _ec2(endpoint)
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    reservation = ec2.run_instances(
        ImageId=image, MinCount=1, MaxCount=1, InstanceType="p3.2xlarge",
        Placement={"AvailabilityZone": "us-east-1b"},
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])
    return reservation["Instances"][0]["InstanceId"]


def test_identity_from_metadata_with_metadata_tags(metadata_server):
    server = metadata_server(tags={"Name": "trainer", "aws:ec2spot:fleet-request-id": "sfr-1234abcd"})
    never_called = pytest.fail  # tags are in metadata, so no EC2 client is made
    identity = identify(MetadataClient(server.endpoint), lambda region: never_called("made"))
    assert identity == Identity(
        instance_id="i-0123456789abcdef0", region="us-east-1", availability_zone="us-east-1b",
        availability_zone_id="use1-az2", instance_type="p3.2xlarge", account_id="123456789012",
        launched_by=LaunchedBy("spot-fleet", "sfr-1234abcd"))
    assert identity.tags == {"Name": "trainer", "aws:ec2spot:fleet-request-id": "sfr-1234abcd"}


def test_identity_falls_back_to_describe_tags_when_metadata_tags_are_off(metadata_server, moto_endpoint):
    instance_id = _launch(moto_endpoint, {"aws:ec2:fleet-id": "fleet-0abc", "spotrun:job": "j1"})
    server = metadata_server(instance_id=instance_id, tags_in_metadata=False,
                             tags={"ignored": "because metadata tags are off"})
    regions = []

    def factory(region):
        regions.append(region)
        return _ec2(moto_endpoint, region)

    identity = identify(MetadataClient(server.endpoint), factory)
    assert regions == ["us-east-1"]
    assert identity.instance_id == instance_id
    assert identity.launched_by == LaunchedBy("ec2-fleet", "fleet-0abc")
    assert identity.tags == {"aws:ec2:fleet-id": "fleet-0abc", "spotrun:job": "j1"}


def test_describe_tags_failing_is_a_clear_error(metadata_server):
    server = metadata_server(tags_in_metadata=False)
    def unreachable_ec2(region):  # nothing listens on the discard port
        return boto3.client("ec2", region_name=region, endpoint_url="http://127.0.0.1:9",
                            aws_access_key_id="testing", aws_secret_access_key="testing",
                            config=Config(retries={"max_attempts": 1, "mode": "standard"}))

    with pytest.raises(IdentityError, match="DescribeTags for i-0123456789abcdef0"):
        identify(MetadataClient(server.endpoint), unreachable_ec2)


def test_without_tags_or_a_client_nothing_launched_it(metadata_server):
    server = metadata_server(tags_in_metadata=False)
    identity = identify(MetadataClient(server.endpoint))
    assert identity.launched_by is None and identity.tags == {}


@pytest.mark.parametrize("tags,expected", [
    ({"aws:autoscaling:groupName": "asg-1", "aws:ec2:fleet-id": "fleet-x"}, LaunchedBy("autoscaling", "asg-1")),
    ({"aws:ec2spot:fleet-request-id": "sfr-1"}, LaunchedBy("spot-fleet", "sfr-1")),
    ({"aws:ec2:fleet-id": "fleet-1"}, LaunchedBy("ec2-fleet", "fleet-1")),
    ({"Name": "x"}, None),
])
def test_launched_by_from_tags(tags, expected):
    assert launched_by_from_tags(tags) == expected


@pytest.mark.parametrize("overrides,field", [
    ({"account_id": "12345"}, "accountId"),
    ({"instance_id": "bogus"}, "instanceId"),
    ({"instance_type": ""}, "instanceType"),
    ({"availability_zone": "eu-west-1a"}, "availabilityZone"),
])
def test_a_malformed_document_names_the_path_and_the_field(metadata_server, overrides, field):
    server = metadata_server(**overrides)
    with pytest.raises(MetadataError, match=f"instance-identity/document: field {field}") as error:
        identify(MetadataClient(server.endpoint))
    assert error.value.path == "dynamic/instance-identity/document"


def test_a_truncated_document_is_a_metadata_error(metadata_server):
    server = metadata_server()
    server.fault("malformed")
    with pytest.raises(MetadataError, match="instance-identity/document: malformed JSON"):
        identify(MetadataClient(server.endpoint))


def test_a_malformed_az_id_names_its_path(metadata_server):
    server = metadata_server(availability_zone_id="not an az id")
    with pytest.raises(MetadataError, match="placement/availability-zone-id"):
        identify(MetadataClient(server.endpoint))

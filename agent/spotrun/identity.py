"""Who this instance is: id, region, AZ and AZ id, type, account, and what launched it.

Everything comes from instance metadata (the instance-identity document and placement),
except the instance's tags when the instance does not expose them in metadata
("instance metadata tags" off): then one DescribeTags call, through a boto3 EC2 client
that the caller's factory makes for the region. A document that is missing a field or has
a malformed one stops here with a MetadataError naming the path and the field, before
anything is touched (invariant 7).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import quote

from spotrun import tags as tagkeys
from spotrun.errors import SpotrunError
from spotrun.imds import MetadataClient, MetadataError
from spotrun.log import get_logger

DOCUMENT_PATH = "dynamic/instance-identity/document"
AZ_ID_PATH = "meta-data/placement/availability-zone-id"
TAGS_PATH = "meta-data/tags/instance"

SPOT_FLEET = "spot-fleet"
EC2_FLEET = "ec2-fleet"
AUTOSCALING = "autoscaling"
# What launched the instance, from the tags AWS puts on it. An Auto Scaling group comes
# first: a group with a mixed-instances policy launches through EC2 Fleet, and the right
# way to stop it is to scale the group, not to touch a fleet it owns.
_LAUNCHER_TAGS = (
    (AUTOSCALING, tagkeys.AUTOSCALING_GROUP),
    (SPOT_FLEET, tagkeys.SPOT_FLEET_REQUEST),
    (EC2_FLEET, tagkeys.EC2_FLEET),
)

_DOCUMENT_FIELDS = {
    "instanceId": re.compile(r"^i-[0-9a-f]{8,17}$"),
    "region": re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$"),
    "availabilityZone": re.compile(r"^[a-z]{2}(-[a-z0-9]+)+$"),
    "instanceType": re.compile(r"^[a-z0-9-]+\.[a-z0-9-]+$"),
    "accountId": re.compile(r"^\d{12}$"),
}
_AZ_ID = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*-az\d+$")


log = get_logger("identity")


class IdentityError(SpotrunError):
    """The instance's tags could not be read (DescribeTags failed)."""


@dataclass(frozen=True)
class LaunchedBy:
    kind: str  # "spot-fleet" | "ec2-fleet" | "autoscaling"
    id: str  # the Spot Fleet request id, the EC2 Fleet id, or the Auto Scaling group name


@dataclass(frozen=True)
class Identity:
    instance_id: str
    region: str
    availability_zone: str
    availability_zone_id: str
    instance_type: str
    account_id: str
    launched_by: LaunchedBy | None = None
    tags: dict = field(default_factory=dict, compare=False)

    def log_context(self) -> dict[str, str]:
        """Keys to bind to every later log event of the agent."""
        return {"instance_id": self.instance_id, "az": self.availability_zone}


def launched_by_from_tags(tags: Mapping[str, str]) -> LaunchedBy | None:
    for kind, key in _LAUNCHER_TAGS:
        if tags.get(key):
            return LaunchedBy(kind, tags[key])
    return None


def _document(client: MetadataClient) -> dict[str, str]:
    doc = client.get_json(DOCUMENT_PATH)
    if doc is None:
        raise MetadataError(f"metadata {DOCUMENT_PATH}: not found (404)", DOCUMENT_PATH)
    if not isinstance(doc, dict):
        raise MetadataError(f"metadata {DOCUMENT_PATH}: expected a JSON object, got "
                            f"{type(doc).__name__}", DOCUMENT_PATH)
    values = {}
    for name, pattern in _DOCUMENT_FIELDS.items():
        value = doc.get(name)
        if value is None:
            raise MetadataError(f"metadata {DOCUMENT_PATH}: field {name} is missing", DOCUMENT_PATH)
        if not isinstance(value, str) or not pattern.match(value):
            raise MetadataError(f"metadata {DOCUMENT_PATH}: field {name} is malformed: {value!r}",
                                DOCUMENT_PATH)
        values[name] = value
    if not values["availabilityZone"].startswith(values["region"]):
        raise MetadataError(f"metadata {DOCUMENT_PATH}: field availabilityZone "
                            f"{values['availabilityZone']!r} is not in region {values['region']!r}",
                            DOCUMENT_PATH)
    return values


def _availability_zone_id(client: MetadataClient) -> str:
    value = client.get(AZ_ID_PATH)
    if value is None:
        # Older regions' metadata may lack it; the AZ name still identifies the placement.
        log.warning("az_id_unavailable", path=AZ_ID_PATH)
        return ""
    value = value.strip()
    if not _AZ_ID.match(value):
        raise MetadataError(f"metadata {AZ_ID_PATH}: malformed availability zone id {value!r}", AZ_ID_PATH)
    return value


def _tags_from_metadata(client: MetadataClient) -> dict[str, str] | None:
    listing = client.get(TAGS_PATH)
    if listing is None:
        return None  # instance metadata tags are not enabled on this instance
    found = {}
    for key in filter(None, (line.strip() for line in listing.splitlines())):
        # Keys in metadata are limited to letters, digits and + - = . _ : @, all literal in a
        # path; quote anything else rather than build a different path.
        value = client.get(f"{TAGS_PATH}/{quote(key, safe=':@+=')}")
        if value is not None:  # a tag removed between the listing and the read
            found[key] = value
    return found


def _tags_from_ec2(ec2: Any, instance_id: str) -> dict[str, str]:
    try:
        pages = ec2.get_paginator("describe_tags").paginate(
            Filters=[{"Name": "resource-id", "Values": [instance_id]}])
        return {t["Key"]: t["Value"] for page in pages for t in page.get("Tags", [])}
    except Exception as exc:  # botocore's ClientError / BotoCoreError, without importing them here
        raise IdentityError(f"ec2:DescribeTags for {instance_id} failed, so what launched the "
                            f"instance is unknown: {exc}") from exc


def identify(client: MetadataClient,
             ec2_client_factory: Callable[[str], Any] | None = None) -> Identity:
    """This instance's identity; launched-by from its tags (metadata, else DescribeTags)."""
    doc = _document(client)
    az_id = _availability_zone_id(client)
    tags = _tags_from_metadata(client)
    source = "metadata"
    if tags is None:
        if ec2_client_factory is None:
            source, tags = "none", {}
            log.warning("instance_tags_unavailable", instance_id=doc["instanceId"],
                        reason="metadata tags are off and no EC2 client was given")
        else:
            source = "describe_tags"
            tags = _tags_from_ec2(ec2_client_factory(doc["region"]), doc["instanceId"])
    identity = Identity(
        instance_id=doc["instanceId"],
        region=doc["region"],
        availability_zone=doc["availabilityZone"],
        availability_zone_id=az_id,
        instance_type=doc["instanceType"],
        account_id=doc["accountId"],
        launched_by=launched_by_from_tags(tags),
        tags=tags,
    )
    launched = identity.launched_by
    log.info("identified", instance_id=identity.instance_id, region=identity.region,
             az=identity.availability_zone, az_id=identity.availability_zone_id,
             instance_type=identity.instance_type, tags_source=source,
             launched_by=f"{launched.kind}:{launched.id}" if launched else None)
    return identity

"""Each instance's metadata says what moto says about that instance (id, AZ, type, tags)."""
from __future__ import annotations

import json

import requests

from spotrun.localcloud.imds import TOKEN_HEADER, TTL_HEADER
from spotrun.tags import as_dict


def test_metadata_identity_matches_the_instance_in_moto(cloud):
    inst = cloud.launch_instance(az=cloud.azs[1], instance_type="g4dn.xlarge",
                                 tags={"Name": "worker", "spotrun:job": "j7"},
                                 user_data=b"#!/bin/sh\nexit 0\n")
    described = cloud.client("ec2", faults=False).describe_instances(
        InstanceIds=[inst.instance_id])["Reservations"][0]["Instances"][0]
    zone_ids = {z["ZoneName"]: z["ZoneId"] for z in cloud.client(
        "ec2", faults=False).describe_availability_zones()["AvailabilityZones"]}
    with requests.Session() as http:
        http.trust_env = False
        token = http.put(inst.imds_endpoint + "/latest/api/token",
                         headers={TTL_HEADER: "60"}, timeout=5).text

        def meta(path: str) -> str:
            answer = http.get(inst.imds_endpoint + "/latest/" + path,
                              headers={TOKEN_HEADER: token}, timeout=5)
            assert answer.status_code == 200, path
            return answer.text

        assert meta("meta-data/instance-id") == described["InstanceId"]
        assert meta("meta-data/instance-type") == described["InstanceType"] == "g4dn.xlarge"
        az = described["Placement"]["AvailabilityZone"]
        assert meta("meta-data/placement/availability-zone") == az == cloud.azs[1]
        assert meta("meta-data/placement/availability-zone-id") == zone_ids[az]
        assert meta("meta-data/placement/region") == cloud.region
        assert meta("meta-data/ami-id") == described["ImageId"]
        assert meta("meta-data/local-ipv4") == described["PrivateIpAddress"]
        moto_tags = as_dict(described["Tags"])
        keys = meta("meta-data/tags/instance").split("\n")
        assert {k: meta(f"meta-data/tags/instance/{k}") for k in keys} == moto_tags
        assert meta("user-data") == "#!/bin/sh\nexit 0\n"
        doc = json.loads(meta("dynamic/instance-identity/document"))
        assert (doc["instanceId"], doc["availabilityZone"], doc["accountId"]) == (
            described["InstanceId"], az, cloud.account_id)

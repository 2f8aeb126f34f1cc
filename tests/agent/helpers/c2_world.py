"""Fixtures and helpers for the volume/migration/lease tests (C2): moto's real server,
a fresh account per test, an identity per "instance", and job-tagged volumes."""
from __future__ import annotations

import types
import urllib.request

import pytest

from spotrun import config as configmod
from spotrun import ec2 as ec2mod
from spotrun import tags as T

REGION = "us-east-1"
JOB = "job-c2"
NAME = "DL-datasets-checkpoints"


@pytest.fixture
def aws(moto_endpoint, monkeypatch, tmp_path):
    """A fresh moto account state; dummy credentials; yields the endpoint."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    urllib.request.urlopen(urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST"))
    return moto_endpoint


def make_config(endpoint: str, **sections) -> configmod.Config:
    mapping = {"job": {"id": JOB}, "aws": {"endpoint_url": endpoint, "region": REGION,
                                           "retry_mode": "standard", "max_attempts": 3}}
    for section, values in sections.items():
        mapping.setdefault(section, {}).update(values)
    return configmod.from_mapping(mapping, "test")


def clients(endpoint: str):
    cfg = make_config(endpoint)
    return (ec2mod.client("ec2", cfg.aws, REGION), ec2mod.client("dynamodb", cfg.aws, REGION))


def launch(ec2, az: str) -> types.SimpleNamespace:
    """A running moto instance and the Identity-shaped record for it."""
    # Any image id does for moto; describing its catalogue takes seconds.
    inst = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="p3.2xlarge",
                             Placement={"AvailabilityZone": az},
                             TagSpecifications=[{"ResourceType": "instance",
                                                 "Tags": [{"Key": T.JOB, "Value": JOB}]}])
    iid = inst["Instances"][0]["InstanceId"]
    return types.SimpleNamespace(instance_id=iid, region=REGION, availability_zone=az,
                                 availability_zone_id=az, instance_type="p3.2xlarge",
                                 account_id="123456789012", launched_by={}, tags={})


def job_volume(ec2, az: str, **extra_tags: str) -> dict:
    tags = {T.NAME: NAME, T.JOB: JOB, T.ROLE: "volume", T.GENERATION: "1", **extra_tags}
    return ec2.create_volume(AvailabilityZone=az, Size=8, VolumeType="gp3", Iops=3000,
                             Throughput=125, Encrypted=True,
                             TagSpecifications=[{"ResourceType": "volume", "Tags": T.as_list(tags)}])

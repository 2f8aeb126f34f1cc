"""``spotrun init``: the job's volume, instance role + policy + profile, fleet role, lease table,
and a sweep's dataset snapshot.

Idempotent: each resource is looked up first and adopted when it exists (the policy is
rewritten only when it differs from what the agent needs). Replaces the seed's steps 1, 2
and the fleet-role part of step 4. The volume is created empty; the agent formats it on
its first attach (no throwaway on-demand instance). A sweep makes no volume; with
``sweep.dataset_volume`` it snapshots that volume once (the dataset, prepared once), and each
experiment's first volume is made from the snapshot by the instance that first claims it.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from spotrun import iam, lease, tags
from spotrun.config import ConfigError
from spotrun.errors import SpotrunError
from spotrun.operator import validate
from spotrun.operator.aws import Aws, error_code, oplog as _log
from spotrun.operator.jobfile import Job
from spotrun.operator.progress import Reporter


EC2_TRUST = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
SPOT_FLEET_TRUST = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "spotfleet.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
SPOT_FLEET_MANAGED_POLICY = "arn:aws:iam::aws:policy/service-role/AmazonEC2SpotFleetTaggingRole"
AGENT_POLICY_NAME = "spotrun-agent"
LIVE_VOLUME_STATES = ["creating", "available", "in-use"]


@dataclass
class Step:
    kind: str  # volume | role | policy | instance-profile | spot-fleet-role | lease-table |
    #            dataset-snapshot
    name: str
    action: str = "plan"  # plan | created | adopted | updated
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"resource": self.kind, "name": self.name, "action": self.action, "detail": self.detail}


def plan(job: Job) -> list[Step]:
    """What init would ensure, computed from the job file alone (no AWS call)."""
    scope = f"{job.id} or {job.id}-* (the sweep's experiments)" if job.experiments else job.id
    steps = [] if job.experiments else [  # a sweep's volumes: made by the agent that first claims each
        Step("volume", job.config.volume.name_tag,
             detail=f"{job.config.volume.size_gib} GiB {job.config.volume.type}"
                    f"{' encrypted' if job.config.volume.encrypted else ''} in "
                    f"{job.volume_az or '(the region first AZ)'}, tagged {tags.JOB}={job.id}; "
                    "formatted by the agent on first attach")]
    steps += [
        Step("role", job.role_name, detail="trusted by ec2.amazonaws.com"),
        Step("policy", f"{job.role_name}/{AGENT_POLICY_NAME}",
             detail=f"least privilege for the agent, scoped by {tags.JOB}={scope}"),
        Step("instance-profile", job.role_name, detail=f"holds role {job.role_name}"),
    ]
    if job.launch.fleet == "spot-fleet":
        steps.append(Step("spot-fleet-role", job.launch.spot_fleet_role,
                          detail=f"trusted by spotfleet.amazonaws.com, {SPOT_FLEET_MANAGED_POLICY}"))
    if job.lease_table:
        steps.append(Step("lease-table", job.lease_table, detail="DynamoDB, on-demand billing"))
    if job.dataset_volume:
        steps.append(Step("dataset-snapshot", job.dataset_volume, detail=(
            f"one snapshot of {job.dataset_volume}, tagged {tags.JOB}={job.id} and {tags.ROLE}="
            f"{tags.DATASET_SNAPSHOT_ROLE}; each experiment's first volume is made from it")))
    return steps


DATASET_SNAPSHOT_STATES = ("pending", "completed")


def dataset_snapshots(ec2: Any, job: Job) -> list[dict]:
    """The sweep's dataset snapshots, pending or completed, oldest first (the one kept)."""
    filters = tags.job_filters(job.id) + [
        {"Name": f"tag:{tags.ROLE}", "Values": [tags.DATASET_SNAPSHOT_ROLE]}]
    found = []
    for page in ec2.get_paginator("describe_snapshots").paginate(OwnerIds=["self"], Filters=filters):
        found += [s for s in page["Snapshots"] if s["State"] in DATASET_SNAPSHOT_STATES]
    return sorted(found, key=lambda s: (s["StartTime"], s["SnapshotId"]))


def _same_volume(job: Job, snapshots: list[dict]) -> list[dict]:
    """``snapshots``, refused (naming the field) if one is of another volume than the file's."""
    other = next((s for s in snapshots if s.get("VolumeId") != job.dataset_volume), None)
    if other is not None:
        raise ConfigError("sweep.dataset_volume", (
            f"sweep {job.id} already has the dataset snapshot {other['SnapshotId']}, of "
            f"{other.get('VolumeId')}, not of {job.dataset_volume}: delete it first (`spotrun "
            "teardown --delete-snapshots`; experiments made from it keep their volumes) or name "
            "that volume again"), job.source)
    return snapshots


def check_dataset_volume(ec2: Any, job: Job) -> None:
    """Before init changes anything: the dataset snapshot is there already, or the volume to
    make it from exists (a ConfigError naming the field and the id otherwise)."""
    if _same_volume(job, dataset_snapshots(ec2, job)):
        return  # made by an earlier init; the volume itself may be gone since
    try:
        [volume] = ec2.describe_volumes(VolumeIds=[job.dataset_volume])["Volumes"]
    except Exception as exc:  # noqa: BLE001 - only "not found" is the file's fault
        if error_code(exc) not in ("InvalidVolume.NotFound", "InvalidVolumeID.NotFound"):
            raise
        volume = None
    if volume is None or volume["State"] not in ("available", "in-use"):
        state = "does not exist" if volume is None else f"is {volume['State']}"
        raise ConfigError("sweep.dataset_volume", (
            f"{job.dataset_volume} {state} in {job.region or 'this region'}: it should be the "
            "volume holding the sweep's datasets directory; nothing was changed"), job.source)


def _ensure_dataset_snapshot(aws: Aws, job: Job, reporter: Reporter, step: Step) -> None:
    ec2 = aws.client("ec2")
    existing = _same_volume(job, dataset_snapshots(ec2, job))
    if existing:
        step.action = "adopted"
    else:
        snapshot = ec2.create_snapshot(
            VolumeId=job.dataset_volume, Description=f"spotrun sweep {job.id}: dataset",
            TagSpecifications=[{"ResourceType": "snapshot", "Tags": tags.as_list({
                tags.NAME: f"spotrun {job.id} dataset", tags.JOB: job.id,
                tags.ROLE: tags.DATASET_SNAPSHOT_ROLE})}])
        _log.info("dataset_snapshot_created", job=job.id, snapshot_id=snapshot["SnapshotId"],
                  volume_id=job.dataset_volume)
        step.action = "created"
        # A create retried after a lost answer (or a second init at the same moment) may have
        # made two: every init keeps the oldest and deletes the others.
        existing = _same_volume(job, dataset_snapshots(ec2, job)) or [snapshot]
    kept = existing[0]
    snapshot_id = kept["SnapshotId"]

    def completed() -> tuple[bool, str]:
        current = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]
        if current["State"] == "error":
            raise SpotrunError(f"dataset snapshot {snapshot_id} of {job.dataset_volume} failed "
                               f"({current.get('StateMessage', '')}); run spotrun init again")
        return current["State"] == "completed", f"{current['State']} {current.get('Progress') or ''}".strip()

    reporter.wait(f"dataset snapshot {snapshot_id} of {job.dataset_volume}", completed,
                  job.config.volume.snapshot_timeout_s)
    for extra in existing[1:]:
        ec2.delete_snapshot(SnapshotId=extra["SnapshotId"])
        _log.info("dataset_snapshot_duplicate_deleted", job=job.id, snapshot_id=extra["SnapshotId"])
    step.name = snapshot_id
    step.detail = (f"of {job.dataset_volume} ({kept.get('VolumeSize', '?')} GiB): each experiment's "
                   "first volume is made from it")


def agent_policy_for(job: Job, region: str, account_id: str) -> dict:
    return iam.agent_policy(job.id, region=region, account_id=account_id,
                            lease_table=job.lease_table or None, sweep=bool(job.experiments))


def find_volumes(ec2: Any, job: Job) -> list[dict]:
    filters = tags.job_filters(job.id, job.config.volume.name_tag) + [
        {"Name": "status", "Values": LIVE_VOLUME_STATES}]
    return ec2.describe_volumes(Filters=filters)["Volumes"]


def _ensure_volume(aws: Aws, job: Job, reporter: Reporter, step: Step) -> None:
    ec2 = aws.client("ec2")
    existing = find_volumes(ec2, job)
    if existing:
        vol = existing[0]
        step.action, step.name = "adopted", vol["VolumeId"]
        step.detail = f"{vol['Size']} GiB in {vol['AvailabilityZone']} ({vol['State']})"
        if len(existing) > 1:
            step.detail += f"; WARNING: {len(existing)} volumes carry this job's tags"
        return
    zone = job.volume_az or ec2.describe_availability_zones(
        Filters=[{"Name": "state", "Values": ["available"]}])["AvailabilityZones"][0]["ZoneName"]
    vc = job.config.volume
    kwargs: dict[str, Any] = {"AvailabilityZone": zone, "Size": vc.size_gib, "VolumeType": vc.type,
                              "Encrypted": vc.encrypted}
    if vc.kms_key_id:
        kwargs["KmsKeyId"] = vc.kms_key_id
    if vc.iops:
        kwargs["Iops"] = vc.iops
    if vc.throughput and vc.type == "gp3":
        kwargs["Throughput"] = vc.throughput
    kwargs["TagSpecifications"] = [{"ResourceType": "volume", "Tags": tags.as_list({
        tags.NAME: vc.name_tag, tags.JOB: job.id, tags.ROLE: "volume", tags.GENERATION: "0"})}]
    # One token per run: botocore's retries of a lost answer return the same volume, while a
    # later init (after `cancel --delete-volume`) still gets a fresh one.
    kwargs["ClientToken"] = f"spotrun-init-{uuid.uuid4()}"
    vol = ec2.create_volume(**kwargs)
    volume_id = vol["VolumeId"]
    _log.info("volume_created", job=job.id, volume_id=volume_id, az=zone)

    def available() -> tuple[bool, str]:
        state = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["State"]
        if state == "error":
            raise SpotrunError(f"volume {volume_id} went to state 'error'")
        return state == "available", state

    reporter.wait(f"volume {volume_id}", available, vc.create_timeout_s)
    step.action, step.name = "created", volume_id
    step.detail = f"{vc.size_gib} GiB {vc.type} in {zone}; the agent formats it on first attach"


def _ensure_role(iam: Any, name: str, trust: dict, step: Step, job_id: str | None) -> None:
    try:
        iam.get_role(RoleName=name)
        step.action = "adopted"
        return
    except Exception as exc:  # noqa: BLE001 - only NoSuchEntity means "create it"
        if error_code(exc) != "NoSuchEntity":
            raise
    role_tags = [{"Key": "spotrun:managed", "Value": "true"}]
    if job_id:
        role_tags.append({"Key": tags.JOB, "Value": job_id})
    iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust), Tags=role_tags,
                    Description="spotrun: created by spotrun init")
    step.action = "created"


def _ensure_policy(iam: Any, job: Job, document: dict, step: Step) -> None:
    try:
        current = iam.get_role_policy(RoleName=job.role_name, PolicyName=AGENT_POLICY_NAME)["PolicyDocument"]
        if isinstance(current, str):
            current = json.loads(current)
        if current == document:
            step.action = "adopted"
            return
        step.action = "updated"
    except Exception as exc:  # noqa: BLE001
        if error_code(exc) != "NoSuchEntity":
            raise
        step.action = "created"
    iam.put_role_policy(RoleName=job.role_name, PolicyName=AGENT_POLICY_NAME,
                        PolicyDocument=json.dumps(document))


def _ensure_profile(iam: Any, name: str, step: Step) -> None:
    try:
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        step.action = "adopted"
    except Exception as exc:  # noqa: BLE001
        if error_code(exc) != "NoSuchEntity":
            raise
        profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        step.action = "created"
    if not any(r["RoleName"] == name for r in profile.get("Roles", [])):
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
        if step.action == "adopted":
            step.action = "updated"


def _ensure_spot_fleet_role(iam: Any, job: Job, step: Step) -> None:
    _ensure_role(iam, job.launch.spot_fleet_role, SPOT_FLEET_TRUST, step, None)
    attached = iam.list_attached_role_policies(RoleName=job.launch.spot_fleet_role)["AttachedPolicies"]
    if not any(p["PolicyArn"] == SPOT_FLEET_MANAGED_POLICY for p in attached):
        iam.attach_role_policy(RoleName=job.launch.spot_fleet_role, PolicyArn=SPOT_FLEET_MANAGED_POLICY)


def _ensure_lease_table(aws: Aws, job: Job, reporter: Reporter, step: Step) -> None:
    dynamodb = aws.client("dynamodb")
    try:
        dynamodb.describe_table(TableName=job.lease_table)
        step.action = "adopted"
        return
    except Exception as exc:  # noqa: BLE001
        if error_code(exc) != "ResourceNotFoundException":
            raise
    try:
        dynamodb.create_table(**lease.table_definition(job.lease_table))
    except Exception as exc:  # noqa: BLE001 - a concurrent init created it first
        if error_code(exc) != "ResourceInUseException":
            raise
    step.action = "created"

    def active() -> tuple[bool, str]:
        status = dynamodb.describe_table(TableName=job.lease_table)["Table"]["TableStatus"]
        return status == "ACTIVE", status

    reporter.wait(f"lease table {job.lease_table}", active, 300)


def apply(aws: Aws, job: Job, reporter: Reporter) -> list[Step]:
    """Create or adopt everything in ``plan(job)``; returns the steps with their outcome."""
    steps = plan(job)
    if job.launch.availability_zones or job.launch.volume_availability_zone:
        # First call, before anything is created: a zone the region lacks stops init here.
        validate.check_zones(job, aws.region or aws.session.region_name, validate.known_zones(aws.client("ec2")))
    if job.dataset_volume:  # before anything is created: a volume not there stops init here
        check_dataset_volume(aws.client("ec2"), job)
    iam = aws.client("iam")
    account = aws.account_id()
    document = agent_policy_for(job, aws.region, account)
    for step in steps:
        if step.kind == "volume":
            _ensure_volume(aws, job, reporter, step)
        elif step.kind == "role":
            _ensure_role(iam, job.role_name, EC2_TRUST, step, job.id)
        elif step.kind == "policy":
            _ensure_policy(iam, job, document, step)
        elif step.kind == "instance-profile":
            _ensure_profile(iam, job.role_name, step)
        elif step.kind == "spot-fleet-role":
            _ensure_spot_fleet_role(iam, job, step)
        elif step.kind == "lease-table":
            _ensure_lease_table(aws, job, reporter, step)
        elif step.kind == "dataset-snapshot":
            _ensure_dataset_snapshot(aws, job, reporter, step)
        _log.info("init_step", job=job.id, resource=step.kind, name=step.name, action=step.action)
    return steps

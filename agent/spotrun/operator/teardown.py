"""``spotrun teardown``: remove what ``init`` and ``launch`` made for one job, after the job.

Removed: the launch template, the instance profile, the role and its inline policy (only a
role ``init`` made for this job: it carries the job tag), and the job's item in the lease
table (the table is shared by jobs; ``--all`` deletes it too). Kept unless asked: the volume
(``--delete-volume``: snapshot first, as ``cancel`` does) and the job's snapshots
(``--delete-snapshots``; a sweep's: each experiment's and the sweep's dataset snapshot).
The Spot Fleet role is shared by every job and is always kept.
Refused while the job still has capacity or a running instance: ``spotrun cancel`` first.
"""
from __future__ import annotations

from typing import Any, Callable

from spotrun import lease, sweepclaim, tags
from spotrun.errors import SpotrunError
from spotrun.operator import cancel as cancel_mod
from spotrun.operator import fleets
from spotrun.operator.aws import Aws, error_code, oplog as _log
from spotrun.operator.init import AGENT_POLICY_NAME
from spotrun.operator.jobfile import Job
from spotrun.operator.progress import Reporter

_NOT_FOUND = {"NoSuchEntity", "ResourceNotFoundException", "InvalidLaunchTemplateName.NotFoundException",
              "InvalidLaunchTemplateId.NotFound", "InvalidSnapshot.NotFound"}


def _gone(call: Callable[..., Any], **kwargs: Any) -> bool:
    """Run a delete; False when the thing was already absent (teardown is idempotent)."""
    try:
        call(**kwargs)
        return True
    except Exception as exc:  # noqa: BLE001 - only "not found" is expected; the rest is a failure
        if error_code(exc) not in _NOT_FOUND:
            raise
        return False


def _get_or_none(call: Callable[..., Any], key: str, **kwargs: Any) -> dict | None:
    """An IAM read; None when the entity does not exist."""
    try:
        return call(**kwargs)[key]
    except Exception as exc:  # noqa: BLE001 - only "no such entity" is expected
        if error_code(exc) != "NoSuchEntity":
            raise
        return None


def job_ids(job: Job) -> list[str]:
    """The jobs whose volumes and snapshots are the file's: its own, or each experiment's."""
    return [e.job_id for e in job.experiments] if job.experiments else [job.id]


def apply(aws: Aws, job: Job, reporter: Reporter, delete_volume: bool = False,
          delete_snapshots: bool = False, delete_table: bool = False,
          timeout_s: float = 3600) -> dict[str, Any]:
    live = fleets.find(aws, job.id)
    running = fleets.job_instances(aws, job.id)
    if live or running:
        what = [f"{c.kind} {c.id}" for c in live] + [i["InstanceId"] for i in running]
        raise SpotrunError(f"job {job.id} still runs ({', '.join(what)}); `spotrun cancel` it first")
    ec2, iam = aws.client("ec2"), aws.client("iam")
    removed: list[dict[str, str]] = []
    kept: list[dict[str, str]] = []

    def note(done: bool, kind: str, name: str) -> None:
        if done:
            removed.append({"resource": kind, "name": name})
            reporter.say(f"removed {kind} {name}")
            _log.info("teardown_removed", job=job.id, resource=kind, name=name)

    # By id: moto's DeleteLaunchTemplate takes no name (AWS takes either).
    templates = ec2.describe_launch_templates(
        Filters=[{"Name": "launch-template-name", "Values": [job.launch_template_name]}])["LaunchTemplates"]
    for template in (t for t in templates if t["LaunchTemplateName"] == job.launch_template_name):
        note(_gone(ec2.delete_launch_template, LaunchTemplateId=template["LaunchTemplateId"]),
             "launch-template", job.launch_template_name)
    profile = _get_or_none(iam.get_instance_profile, "InstanceProfile", InstanceProfileName=job.role_name)
    if profile is not None:
        for role in profile.get("Roles", []):
            iam.remove_role_from_instance_profile(InstanceProfileName=job.role_name, RoleName=role["RoleName"])
        note(_gone(iam.delete_instance_profile, InstanceProfileName=job.role_name),
             "instance-profile", job.role_name)
    role = _get_or_none(iam.get_role, "Role", RoleName=job.role_name)
    if role is not None:
        # A role the user named (launch.instance_role) and init adopted is theirs: kept.
        if tags.as_dict(role.get("Tags")).get(tags.JOB) == job.id:
            note(_gone(iam.delete_role_policy, RoleName=job.role_name, PolicyName=AGENT_POLICY_NAME),
                 "policy", f"{job.role_name}/{AGENT_POLICY_NAME}")
            note(_gone(iam.delete_role, RoleName=job.role_name), "role", job.role_name)
        else:
            kept.append({"resource": "role", "name": job.role_name, "why": "not made by init for this job"})
    if job.lease_table:
        dynamodb = aws.client("dynamodb")
        if delete_table:
            note(_gone(dynamodb.delete_table, TableName=job.lease_table), "lease-table", job.lease_table)
        else:
            # A sweep's items: one per experiment, and the sweep's own (its fleet cancel).
            keys = ([e.job_id for e in job.experiments] + [sweepclaim.sweep_key(job.id)]
                    if job.experiments else [job.id])
            for key in keys:
                try:
                    dynamodb.delete_item(TableName=job.lease_table, Key={lease.KEY: {"S": key}})
                    note(True, "lease-entry", f"{job.lease_table}/{key}")
                except Exception as exc:  # noqa: BLE001
                    if error_code(exc) not in _NOT_FOUND:
                        raise
            kept.append({"resource": "lease-table", "name": job.lease_table, "why": "shared (--all deletes it)"})
    for job_id in job_ids(job):
        volumes = ec2.describe_volumes(Filters=tags.job_filters(job_id))["Volumes"]
        for volume in volumes:
            if delete_volume and volume["State"] != "deleting":
                done = cancel_mod._snapshot_then_delete(aws, job_id, volume, reporter, timeout_s)
                note(True, "volume", f"{done['volume']} (final snapshot {done['snapshot']})")
            else:
                kept.append({"resource": "volume", "name": volume["VolumeId"], "why": "--delete-volume deletes it"})
        snapshots = ec2.describe_snapshots(OwnerIds=["self"], Filters=tags.job_filters(job_id))["Snapshots"]
        for snap in snapshots:
            if delete_snapshots:
                note(_gone(ec2.delete_snapshot, SnapshotId=snap["SnapshotId"]), "snapshot", snap["SnapshotId"])
            else:
                kept.append({"resource": "snapshot", "name": snap["SnapshotId"], "why": "--delete-snapshots deletes it"})
    if job.experiments:
        # The sweep's own snapshots (its dataset snapshot, tagged with the sweep's id).
        for snap in ec2.describe_snapshots(OwnerIds=["self"], Filters=tags.job_filters(job.id))["Snapshots"]:
            if delete_snapshots:
                note(_gone(ec2.delete_snapshot, SnapshotId=snap["SnapshotId"]), "snapshot", snap["SnapshotId"])
            else:
                kept.append({"resource": "snapshot", "name": snap["SnapshotId"],
                             "why": "--delete-snapshots deletes it"})
    for item in kept:
        reporter.say(f"kept {item['resource']} {item['name']} ({item['why']})")
    return {"job": job.id, "removed": removed, "kept": kept}

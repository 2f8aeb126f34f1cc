"""``spotrun cancel``: stop the job's capacity, terminate its instances, keep its data.

The volume survives (it is the job: datasets and checkpoints) unless ``--delete-volume``,
which first snapshots it and waits for the snapshot to complete (nothing is deleted before
its replacement is proven, invariant 2).
"""
from __future__ import annotations

from typing import Any

from spotrun import tags
from spotrun.errors import SpotrunError
from spotrun.operator import fleets
from spotrun.operator.aws import Aws, oplog as _log
from spotrun.operator.progress import Reporter



def _terminate_stragglers(aws: Aws, job_id: str) -> list[str]:
    """Instances tagged for the job that no fleet took down (e.g. a fleet deleted by hand)."""
    ids = [i["InstanceId"] for i in fleets.job_instances(aws, job_id)]
    if ids:
        aws.client("ec2").terminate_instances(InstanceIds=ids)
        _log.info("instances_terminated", job=job_id, instance_ids=ids)
    return ids


def _snapshot_then_delete(aws: Aws, job_id: str, volume: dict, reporter: Reporter,
                          timeout_s: float) -> dict[str, Any]:
    ec2 = aws.client("ec2")
    volume_id = volume["VolumeId"]
    kept = {k: v for k, v in tags.as_dict(volume.get("Tags")).items() if not k.startswith("aws:")}
    kept.update({tags.JOB: job_id, tags.ROLE: "final-snapshot"})
    snap = ec2.create_snapshot(VolumeId=volume_id, Description=f"spotrun {job_id}: before cancel --delete-volume",
                               TagSpecifications=[{"ResourceType": "snapshot", "Tags": tags.as_list(kept)}])
    snapshot_id = snap["SnapshotId"]

    def snapshot_done() -> tuple[bool, str]:
        current = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]
        if current["State"] == "error":
            raise SpotrunError(f"snapshot {snapshot_id} of {volume_id} failed; the volume is kept")
        return current["State"] == "completed", f"{current['State']} {current.get('Progress') or ''}".strip()

    reporter.wait(f"snapshot {snapshot_id} of {volume_id}", snapshot_done, timeout_s)

    def detached() -> tuple[bool, str]:
        state = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["State"]
        return state == "available", state

    # A terminated instance keeps its volumes attached for a while, as on AWS.
    reporter.wait(f"volume {volume_id} to detach", detached, timeout_s)
    ec2.delete_volume(VolumeId=volume_id)
    _log.info("volume_deleted", job=job_id, volume_id=volume_id, snapshot_id=snapshot_id)
    return {"volume": volume_id, "snapshot": snapshot_id}


def apply(aws: Aws, job_id: str, reporter: Reporter, delete_volume: bool = False,
          timeout_s: float = 3600, volume_jobs: list[str] | None = None) -> dict[str, Any]:
    """``volume_jobs``: the jobs whose volumes are this job's (a sweep's experiments; default
    the job itself). The fleet and instances are found by ``job_id``."""
    cancelled = []
    for capacity in fleets.find(aws, job_id):
        fleets.cancel(aws, capacity)
        cancelled.append(capacity.as_dict())
        reporter.say(f"cancelled {capacity.kind} {capacity.id} (terminating {len(capacity.instance_ids)} instance(s))")
    stragglers = _terminate_stragglers(aws, job_id)
    for instance_id in stragglers:
        reporter.say(f"terminated {instance_id}")
    result: dict[str, Any] = {"job": job_id, "cancelled": cancelled, "terminated": stragglers,
                              "volumes_kept": [], "volumes_deleted": []}
    for owner in volume_jobs or [job_id]:
        volumes = aws.client("ec2").describe_volumes(Filters=tags.job_filters(owner))["Volumes"]
        for volume in volumes:
            if delete_volume and volume["State"] != "deleting":
                result["volumes_deleted"].append(_snapshot_then_delete(aws, owner, volume, reporter,
                                                                       timeout_s))
            else:
                result["volumes_kept"].append(volume["VolumeId"])
    for done in result["volumes_deleted"]:
        reporter.say(f"deleted volume {done['volume']} (kept snapshot {done['snapshot']})")
    for volume_id in result["volumes_kept"]:
        reporter.say(f"kept volume {volume_id}")
    return result

"""The job's capacity, whichever kind: EC2 Fleet, Auto Scaling group or (legacy) Spot Fleet.

Found by the ``spotrun:job`` tag that ``launch`` puts on each, so status and cancel work
from any laptop without local state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spotrun import ec2 as ec2mod
from spotrun import tags
from spotrun.operator.aws import Aws, error_code, oplog as _log
from spotrun.operator.jobfile import Job


_EC2_FLEET_DONE = {"deleted", "deleted_running", "deleted_terminating", "failed"}
_SPOT_FLEET_DONE = {"cancelled", "cancelled_running", "cancelled_terminating", "failed"}


@dataclass
class Capacity:
    kind: str  # ec2-fleet | asg | spot-fleet
    id: str
    state: str
    target: int
    fulfilled: float
    instance_ids: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Cancelled, deleted or failed: EC2 lists such fleets (and their terminated instances)
        for a while, but they will never run anything again."""
        return self.state in _EC2_FLEET_DONE | _SPOT_FLEET_DONE | {"deleting"}

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id, "state": self.state, "target": self.target,
                "fulfilled": self.fulfilled, "instances": list(self.instance_ids),
                "finished": self.finished}


def _job_of(tag_list: list[dict] | None) -> str | None:
    return tags.as_dict(tag_list).get(tags.JOB)


def _ec2_fleets(ec2: Any, job_id: str | None, include_done: bool, ids: list[str] | None = None) -> list[Capacity]:
    found = []
    for page in ec2.get_paginator("describe_fleets").paginate(**({"FleetIds": ids} if ids else {})):
        for fleet in page["Fleets"]:
            if job_id is not None and _job_of(fleet.get("Tags")) != job_id:
                continue
            if not include_done and fleet.get("FleetState") in _EC2_FLEET_DONE:
                continue
            spec = fleet.get("TargetCapacitySpecification", {})
            instances = ec2.describe_fleet_instances(FleetId=fleet["FleetId"]).get("ActiveInstances", [])
            found.append(Capacity("ec2-fleet", fleet["FleetId"], fleet.get("FleetState", "?"),
                                  int(spec.get("TotalTargetCapacity", 0)),
                                  float(fleet.get("FulfilledCapacity", 0.0)),
                                  [i["InstanceId"] for i in instances]))
    return found


def _spot_fleets(ec2: Any, job_id: str | None, include_done: bool, ids: list[str] | None = None) -> list[Capacity]:
    found = []
    for page in ec2.get_paginator("describe_spot_fleet_requests").paginate(
            **({"SpotFleetRequestIds": ids} if ids else {})):
        for req in page["SpotFleetRequestConfigs"]:
            if job_id is not None and _job_of(req.get("Tags")) != job_id:
                continue
            state = req.get("SpotFleetRequestState", "?")
            if not include_done and state in _SPOT_FLEET_DONE:
                continue
            cfg = req.get("SpotFleetRequestConfig", {})
            instances = ec2.describe_spot_fleet_instances(
                SpotFleetRequestId=req["SpotFleetRequestId"]).get("ActiveInstances", [])
            found.append(Capacity("spot-fleet", req["SpotFleetRequestId"], state,
                                  int(cfg.get("TargetCapacity", 0)),
                                  float(cfg.get("FulfilledCapacity", 0.0)),
                                  [i["InstanceId"] for i in instances]))
    return found


def _groups(autoscaling: Any, job_id: str | None, names: list[str] | None = None) -> list[Capacity]:
    found = []
    query = ({"AutoScalingGroupNames": names} if names
             else {"Filters": [{"Name": f"tag:{tags.JOB}", "Values": [job_id]}]})
    for page in autoscaling.get_paginator("describe_auto_scaling_groups").paginate(**query):
        for group in page["AutoScalingGroups"]:
            if job_id is not None and _job_of(group.get("Tags")) != job_id:  # the filter is trusted, but checked
                continue
            instances = [i for i in group.get("Instances", [])
                         if i.get("LifecycleState") not in ("Terminating", "Terminated")]
            state = "deleting" if group.get("Status") == "Delete in progress" else "active"
            found.append(Capacity("asg", group["AutoScalingGroupName"], state,
                                  int(group.get("DesiredCapacity", 0)), float(len(instances)),
                                  [i["InstanceId"] for i in instances]))
    return found


def find(aws: Aws, job_id: str, include_done: bool = False) -> list[Capacity]:
    """Every fleet/group carrying this job's tag (live ones unless ``include_done``)."""
    ec2 = aws.client("ec2")
    return (_ec2_fleets(ec2, job_id, include_done) + _groups(aws.client("autoscaling"), job_id)
            + _spot_fleets(ec2, job_id, include_done))


def find_many(aws: Aws, job_ids: list[str]) -> dict[str, list[Capacity]]:
    """Every fleet/group carrying one of these jobs' tag (finished ones too), by job. One job:
    :func:`find`. Several: each kind listed once and its matches described by id, so the
    number of calls does not grow with the number of jobs (a sweep's status refresh)."""
    if len(job_ids) == 1:
        return {job_ids[0]: find(aws, job_ids[0], include_done=True)}
    ec2, wanted = aws.client("ec2"), set(job_ids)
    owner: dict[tuple[str, str], str] = {}
    for page in ec2.get_paginator("describe_fleets").paginate():
        for fleet in page["Fleets"]:
            if (job := _job_of(fleet.get("Tags"))) in wanted:
                owner[("ec2-fleet", fleet["FleetId"])] = job
    for page in ec2.get_paginator("describe_spot_fleet_requests").paginate():
        for req in page["SpotFleetRequestConfigs"]:
            if (job := _job_of(req.get("Tags"))) in wanted:
                owner[("spot-fleet", req["SpotFleetRequestId"])] = job
    groups = ec2mod.describe_by_job(aws.client("autoscaling"), "describe_auto_scaling_groups",
                                    "AutoScalingGroups", job_ids)
    for job, found in groups.items():
        owner.update({("asg", g["AutoScalingGroupName"]): job for g in found})
    by_job: dict[str, list[Capacity]] = {job: [] for job in job_ids}
    for cap in by_ids(aws, {kind: {i for k, i in owner if k == kind} for kind in _KINDS}):
        by_job[owner[(cap.kind, cap.id)]].append(cap)
    return by_job


_KINDS = ("ec2-fleet", "spot-fleet", "asg")
_GROUP_NAMES = 50  # DescribeAutoScalingGroups takes at most 50 names a call


def by_ids(aws: Aws, ids: dict[str, set[str]]) -> list[Capacity]:
    """The fleets/groups of these ids (kind -> ids), finished ones too, whatever their tags."""
    ec2, found = aws.client("ec2"), []
    if ids.get("ec2-fleet"):
        found += _ec2_fleets(ec2, None, True, sorted(ids["ec2-fleet"]))
    if ids.get("spot-fleet"):
        found += _spot_fleets(ec2, None, True, sorted(ids["spot-fleet"]))
    names = sorted(ids.get("asg") or ())
    for start in range(0, len(names), _GROUP_NAMES):
        found += _groups(aws.client("autoscaling"), None, names[start:start + _GROUP_NAMES])
    return found


def launched_by(aws: Aws, instances: list[dict], known: set[str]) -> list[Capacity]:
    """The fleets/groups that launched these instances (AWS's own instance tags), for status:
    capacity requested by hand or by another tool, without the job tag. Never used to cancel."""
    wanted: dict[str, set[str]] = {kind: set() for kind in _KINDS}
    for inst in instances:
        itags = tags.as_dict(inst.get("Tags"))
        for kind, key in (("ec2-fleet", tags.EC2_FLEET), ("spot-fleet", tags.SPOT_FLEET_REQUEST),
                          ("asg", tags.AUTOSCALING_GROUP)):
            if itags.get(key) and itags[key] not in known:
                wanted[kind].add(itags[key])
    return by_ids(aws, wanted)


def cancel(aws: Aws, capacity: Capacity) -> None:
    """Stop the capacity and terminate its instances (never touches volumes)."""
    if capacity.kind == "ec2-fleet":
        aws.client("ec2").delete_fleets(FleetIds=[capacity.id], TerminateInstances=True)
    elif capacity.kind == "spot-fleet":
        aws.client("ec2").cancel_spot_fleet_requests(SpotFleetRequestIds=[capacity.id],
                                                     TerminateInstances=True)
    elif capacity.kind == "asg":
        try:
            aws.client("autoscaling").delete_auto_scaling_group(
                AutoScalingGroupName=capacity.id, ForceDelete=True)
        except Exception as exc:  # noqa: BLE001 - a delete already in progress is the goal
            if error_code(exc) != "ScalingActivityInProgress":
                raise
    _log.info("capacity_cancelled", kind=capacity.kind, fleet_id=capacity.id)


def job_instances(aws: Aws, job: Job | str, states: tuple[str, ...] = ("pending", "running",
                                                                         "stopping", "stopped")) -> list[dict]:
    """Instances tagged for the job (the launch template tags every instance it starts)."""
    job_id = job if isinstance(job, str) else job.id
    ec2 = aws.client("ec2")
    found = []
    for page in ec2.get_paginator("describe_instances").paginate(
            Filters=tags.job_filters(job_id) + [{"Name": "instance-state-name", "Values": list(states)}]):
        for reservation in page["Reservations"]:
            found.extend(reservation["Instances"])
    return found


def describe_instances(aws: Aws, instance_ids: list[str]) -> list[dict]:
    if not instance_ids:
        return []
    found = []
    pages = aws.client("ec2").get_paginator("describe_instances").paginate(InstanceIds=instance_ids)
    for page in pages:
        for reservation in page["Reservations"]:
            found.extend(reservation["Instances"])
    return found

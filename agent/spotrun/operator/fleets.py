"""The job's capacity, whichever kind: EC2 Fleet, Auto Scaling group or (legacy) Spot Fleet.

Found by the ``spotrun:job`` tag that ``launch`` puts on each, so status and cancel work
from any laptop without local state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


def launched_by(aws: Aws, instances: list[dict], known: set[str]) -> list[Capacity]:
    """The fleets/groups that launched these instances (AWS's own instance tags), for status:
    capacity requested by hand or by another tool, without the job tag. Never used to cancel."""
    wanted: dict[str, set[str]] = {"ec2-fleet": set(), "spot-fleet": set(), "asg": set()}
    for inst in instances:
        itags = tags.as_dict(inst.get("Tags"))
        for kind, key in (("ec2-fleet", tags.EC2_FLEET), ("spot-fleet", tags.SPOT_FLEET_REQUEST),
                          ("asg", tags.AUTOSCALING_GROUP)):
            if itags.get(key) and itags[key] not in known:
                wanted[kind].add(itags[key])
    ec2 = aws.client("ec2")
    found = []
    if wanted["ec2-fleet"]:
        found += _ec2_fleets(ec2, None, True, sorted(wanted["ec2-fleet"]))
    if wanted["spot-fleet"]:
        found += _spot_fleets(ec2, None, True, sorted(wanted["spot-fleet"]))
    if wanted["asg"]:
        found += _groups(aws.client("autoscaling"), None, sorted(wanted["asg"]))
    return found


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

"""Tag keys spotrun reads and writes on AWS resources: one place, stable names.

Tags are the job's durable, shared record: the next instance and the operator read
the same keys. Values are strings of at most 256 characters (an EC2 limit).
"""
from __future__ import annotations

from typing import Iterable, Mapping

NAME = "Name"
PREFIX = "spotrun:"
JOB = "spotrun:job"
# On a sweep's instance that lowered its fleet's capacity (spotrun.fleet.leave): the new target.
LEFT_FLEET = PREFIX + "left-fleet"
# On an instance of a job without a lease table, right before it creates the job's first
# volume: "<create token> <unix time>" (spotrun.firstvolume).
FIRST_VOLUME = PREFIX + "first-volume"
# Which copy of the job's volume this is; +1 at each cross-AZ migration.
GENERATION = "spotrun:generation"
# What the resource is to spotrun: "volume" or "migration-snapshot" / "drain-snapshot", or a
# sweep's "dataset-snapshot" (tagged with the sweep's id: every experiment's first volume is
# made from it; `spotrun init` makes it, only `spotrun teardown --delete-snapshots` deletes it).
ROLE = "spotrun:role"
DATASET_SNAPSHOT_ROLE = "dataset-snapshot"

# Progress, written by the agent on the job's volume for the operator CLI and the next instance.
PHASE = "spotrun:phase"
PROGRESS = "spotrun:progress"  # JSON: {"epoch":..,"step":..,"checkpoint_time":..}
INTERRUPTIONS = "spotrun:interruptions"
HELD = "spotrun:held"  # a sweep experiment's held seconds by type@zone (spotrun.heldtime)
COMPLETED = "spotrun:completed"  # ISO time once the completion record is durable
RESULT = "spotrun:result"  # compact JSON of the trainer's final metrics
FAILURE = "spotrun:failure"  # why the failure policy applied
COMMIT = "spotrun:commit"  # the training code commit last run
INSTANCE = "spotrun:instance"  # the instance that last held the volume

# Tags AWS puts on instances launched by a fleet or group (read to know what to cancel).
SPOT_FLEET_REQUEST = "aws:ec2spot:fleet-request-id"
EC2_FLEET = "aws:ec2:fleet-id"
AUTOSCALING_GROUP = "aws:autoscaling:groupName"

MAX_VALUE = 256


def as_dict(tags: Iterable[Mapping[str, str]] | None) -> dict[str, str]:
    """EC2's [{"Key": k, "Value": v}, ...] as {k: v}."""
    return {t["Key"]: t["Value"] for t in (tags or [])}


def as_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    for key, value in tags.items():
        if len(value) > MAX_VALUE:
            raise ValueError(f"tag {key} value is {len(value)} characters; EC2 allows {MAX_VALUE}")
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def job_filters(job_id: str, name: str | None = None) -> list[dict]:
    """EC2 Describe* filters that select only this job's resources (invariant 6)."""
    filters = [{"Name": f"tag:{JOB}", "Values": [job_id]}]
    if name:
        filters.append({"Name": f"tag:{NAME}", "Values": [name]})
    return filters

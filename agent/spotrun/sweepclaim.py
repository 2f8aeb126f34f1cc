"""Claiming a sweep's experiment through the lease table (issue 19).

Each experiment is a job with its own lease item (``spotrun.lease``); claiming one is taking
that lease with :meth:`Lease.try_acquire` -- a conditional write, so two instances racing for
the same experiment cannot both win, and a finished experiment (its item says so) is never
taken again. Which one to try is :func:`spotrun.claimpolicy.choose`, from what the items say:

- held: a holder EC2 does not show ending (alive, or not known yet: a just-launched holder
  may be "not found" for a while, and a claim never waits to prove it gone);
- finished: released with ``finished`` (the queue's "done", or failed past its restarts);
- the volume's zone: EC2's word, from one DescribeVolumes for the whole sweep (filter
  ``tag:spotrun:job`` = every experiment's job id), not the last holder's zone in the item: a
  holder killed mid-migration leaves the old zone there. Of several volumes for one job (a
  migration under way) the one :func:`spotrun.migration.resolve` calls the job's volume (the
  source until a copy is verified, then the copy); when resolve will not decide (its volumes
  are not one source and its copies), the highest generation. An experiment EC2 shows no
  volume for: the item's zone if it was ever held (EC2 may not list a just-made volume yet, or
  the lookup failed), else "" (never started);
- released at: when the last holder let go, for "the longest waiting first".

A lost race reads the items again and chooses again; an instance gives up only when no
experiment is free.

The end of the sweep: the fleet is cancelled once every experiment is finished, by exactly one
instance even when the last two finish together -- :func:`take_fleet_cancel`, one conditional
write on the sweep's own item in the same table (``sweep#<sweep id>``; job ids cannot hold
``#``, so it never meets an experiment's item).
"""
from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Callable, Sequence

from botocore.exceptions import BotoCoreError, ClientError

from spotrun import ec2 as ec2mod
from spotrun import lease as leasemod
from spotrun import migration
from spotrun import tags as T
from spotrun.claimpolicy import (ZONE_FIRST, Choice, ExperimentState,  # noqa: F401 - ExperimentState: the read callback's type
                                 choose)
from spotrun.log import get_logger, structlog

log = get_logger("sweep")


def states(leases: Sequence[leasemod.Lease]) -> list[ExperimentState]:
    """Each experiment's state as its lease item says (one consistent read each), with its
    volume's zone as EC2 says (one DescribeVolumes for all of them)."""
    zones = volume_zones(leases[0].ec2, [lease.job_id for lease in leases]) if leases else {}
    found = []
    for order, lease in enumerate(leases):
        item = lease.item()
        if item is None:
            found.append(ExperimentState(job_id=lease.job_id, order=order,
                                         volume_zone=(zones or {}).get(lease.job_id, "")))
            continue
        mine = item.holder == lease.instance_id
        held = item.holder is not None and (
            mine or leasemod.instance_state(lease.ec2, item.holder) not in leasemod.GONE_STATES)
        held_before = item.az if item.count and item.az != "?" else ""
        found.append(ExperimentState(
            job_id=lease.job_id, order=order, finished=bool(item.finished), held=held, mine=mine,
            volume_zone=(zones or {}).get(lease.job_id) or held_before,
            released_at=_seconds(item.released)))
    return found


def volume_zones(ec2, job_ids: Sequence[str]) -> dict[str, str] | None:
    """{job id: the zone of that job's volume} for the jobs EC2 shows a volume for, from one
    DescribeVolumes (paged; 200 filter values a call) filtered on the job tag; None when EC2
    could not be asked (the caller falls back on the lease items)."""
    try:
        by_job = ec2mod.describe_by_job(ec2, "describe_volumes", "Volumes", job_ids)
    except (BotoCoreError, ClientError) as exc:
        log.warning("sweep_volume_zones_unknown", error=str(exc))
        return None
    zones = {}
    for job, found in by_job.items():
        volumes = [v for v in found if T.as_dict(v.get("Tags")).get(T.ROLE, migration.ROLE_VOLUME)
                   == migration.ROLE_VOLUME]
        current = _current_volume(volumes)
        if current is not None:
            zones[job] = current["AvailabilityZone"]
    return zones


def _current_volume(volumes: list[dict]) -> dict | None:
    """The volume that holds the job's data: migration.resolve's answer, else (volumes it will
    not decide between) the live one with the highest generation, the newest of equals."""
    try:
        plan = migration.resolve(volumes)
        return plan.current if plan is not None else None
    except migration.VolumeDecisionError:
        pass
    live = [v for v in volumes if v["State"] not in ("deleting", "deleted", "error")]

    def rank(volume: dict) -> tuple:
        try:
            generation = int(T.as_dict(volume.get("Tags")).get(T.GENERATION, "1"))
        except ValueError:
            generation = 0
        created = volume.get("CreateTime")
        return generation, created.timestamp() if isinstance(created, datetime) else 0.0

    return max(live, key=rank, default=None)


def claim(leases: Sequence[leasemod.Lease], zone: str, *,
          read: Callable[[Sequence[leasemod.Lease]], list[ExperimentState]] = states,
          policy: str = ZONE_FIRST) -> tuple[leasemod.Lease, Choice] | None:
    """Take one experiment's lease (the policy's choice); None when none is free. Each lease
    in ``leases`` is this instance's handle on one experiment, in the sweep's order."""
    by_job = {lease.job_id: lease for lease in leases}
    lost: set[str] = set()
    for _ in range(2 * len(leases) + 1):  # every lost race marks one experiment held
        seen = [dataclasses.replace(s, held=True, mine=False) if s.job_id in lost else s
                for s in read(leases)]
        choice = choose(seen, zone, policy)
        if choice is None:
            log.info("sweep_nothing_to_claim", experiments=len(leases),
                     finished=sum(s.finished for s in seen), held=sum(s.held for s in seen))
            return None
        lease = by_job[choice.job_id]
        # The lease's own events (taken, taken over) name the experiment tried as their job.
        with structlog.contextvars.bound_contextvars(job=choice.job_id):
            if lease.try_acquire():
                log.info("sweep_claimed", job_id=choice.job_id, reason=choice.reason,
                         generation=lease.generation)
                return lease, choice
            log.info("sweep_claim_lost", job_id=choice.job_id, reason=choice.reason)
        lost.add(choice.job_id)
    return None


def _seconds(stamp: str) -> float:
    """An item's ISO time as epoch seconds (0 when absent or unreadable: waited longest)."""
    try:
        return datetime.fromisoformat(stamp).timestamp() if stamp else 0.0
    except ValueError:
        return 0.0


def all_finished(leases: Sequence[leasemod.Lease]) -> bool:
    """Every experiment's item says finished (consistent reads)."""
    return all((item := lease.item()) is not None and bool(item.finished) for lease in leases)


def sweep_key(sweep_id: str) -> str:
    return f"sweep#{sweep_id}"


def take_fleet_cancel(dynamodb, table: str, sweep_id: str, instance_id: str, ec2=None) -> bool:
    """True for exactly one live caller per sweep: the instance that cancels the fleet. A retry
    by the instance that already took it (its answer lost) is True again; anyone else False --
    unless (``ec2`` given) the instance that took it is gone: it may have died between the take
    and the cancel, so the cancel is taken over (cancelling is idempotent; never cancelling
    would bill a finished sweep for good)."""
    key = {leasemod.KEY: {"S": sweep_key(sweep_id)}}
    for _ in range(3):
        taker = _fleet_cancel_taker(dynamodb, table, key)
        if taker not in (None, instance_id):
            state = leasemod.instance_state(ec2, taker) if ec2 is not None else None
            if state not in leasemod.GONE_STATES:
                log.info("sweep_fleet_cancel_taken_elsewhere", sweep=sweep_id, by=taker)
                return False
        condition = (f"attribute_not_exists({leasemod.KEY}) OR fleet_cancel_by = :me"
                     if taker in (None, instance_id) else "fleet_cancel_by = :taker")
        values = {":me": {"S": instance_id}} if taker in (None, instance_id) else {
            ":taker": {"S": taker}}
        try:
            dynamodb.put_item(
                TableName=table, Item={**key, "fleet_cancel_by": {"S": instance_id},
                                       "since": {"S": datetime.now(timezone.utc).isoformat(
                                           timespec="seconds")}},
                ConditionExpression=condition, ExpressionAttributeValues=values)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                continue  # someone moved first: read again
            raise
        log.info("sweep_fleet_cancel_taken", sweep=sweep_id,
                 **({"taken_over_from": taker} if taker not in (None, instance_id) else {}))
        return True
    log.info("sweep_fleet_cancel_taken_elsewhere", sweep=sweep_id)
    return False


def _fleet_cancel_taker(dynamodb, table: str, key: dict) -> str | None:
    item = dynamodb.get_item(TableName=table, Key=key, ConsistentRead=True).get("Item") or {}
    return item.get("fleet_cancel_by", {}).get("S")

"""Exclusive ownership of a job: one agent trains on, or migrates, a job's volume at a time.

With a lease table (``aws.lease_table``, created by the operator's ``spotrun init`` with
:func:`table_definition`) the lease is one DynamoDB item per job, changed only by
compare-and-swap writes (a conditional PutItem on the holder *and* the generation read just
before), so "who holds it" is decided atomically on AWS's side:

- **generation** (a fencing token): +1 on every acquisition, by whoever acquires. The holder
  keeps the generation it got and, before every destructive or journal-changing call
  (DeleteVolume, DeleteSnapshot, a migration-step tag, CreateVolume/Snapshot, AttachVolume, the
  mount tag), re-reads the item with a consistent read (:meth:`Lease.validate`). If the item no
  longer names it with that generation it raises :class:`LeaseLost` and touches nothing.
- **takeover** only from a holder proven gone: EC2 shows it ``shutting-down``/``terminated``
  (states it never leaves), or answers "not found" on *every* lookup over
  ``absent_window_s`` (at least ``absent_lookups`` lookups). EC2 is eventually consistent: a
  just-launched instance can be unknown to DescribeInstances for a while, and AWS advises
  backing off "up to a few minutes" before believing it; one NotFound proves nothing. A
  holder that is pending/running/stopping/stopped still holds (a stopped one keeps its volume
  attached and may start again). There is no time-based expiry: a slow drain must never let
  a second agent in while the first still writes.
- **release** after the volume is detached: the item stays (the generation must keep
  counting) without a holder. ``draining`` is set when the holder starts letting go.
- **the first volume in the making** (``first_volume``, spotrun.firstvolume): a holder
  states it right before it creates the job's first volume, and every later write of the
  item keeps it, so a next holder that lists no volume waits for that one.
- **a loser gets out of the way**: an instance that finds the job held by a live holder that
  is not draining waits at most ``loser_wait_s`` and raises :class:`LeaseHeld` (exit 1); one
  whose holder is draining waits up to the caller's drain deadline. A loser makes no mutating
  call on the job's resources (no lease write, no tag); the agent reports the give-up in its
  state file and journal (``spotrun.agentcmd``).

The bounds are the ``[lease]`` config section (``takeover_window_s``, ``takeover_lookups``,
``loser_wait_s``); the constants below are its defaults.

Without a table (allowed only with ``aws.single_instance = true``, the operator's promise that
no second instance can run) :func:`wait_until_free` is the guard: the agent never touches a
volume that is attached to, or being released by, another instance; it waits until the volume
is ``available`` — at most ``loser_wait_s`` while a live instance simply keeps it. It cannot
keep two agents that start at the same moment apart.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

from botocore.exceptions import ClientError

from spotrun import ec2 as ec2mod
from spotrun import firstvolume
from spotrun.config import LeaseConfig
from spotrun.errors import SpotrunError
from spotrun.log import get_logger
from spotrun.waiting import wait_until


log = get_logger("lease")


KEY = "job"
# A stopped instance keeps its volumes attached and may start again: it still holds the job.
ALIVE_STATES = ("pending", "running", "stopping", "stopped")
# States EC2 never leaves: one sighting proves the holder is gone.
GONE_STATES = ("shutting-down", "terminated")
ABSENT = "absent"
# Defaults (config [lease]), read when a Lease is made (tests set them through the constructor).
# AWS: a resource just created may be "not found" for a while; retry with backoff from a
# couple of seconds "up to a few minutes". 300 s of NotFound on every lookup is proof.
ABSENT_WINDOW_S = LeaseConfig.takeover_window_s
ABSENT_LOOKUPS = LeaseConfig.takeover_lookups
# A live holder that is not draining will not let go soon: the loser stops after this long.
# 90 s per start, RestartSec=10 and StartLimitBurst=5 in 600 s: systemd gives up on the 5th.
LOSER_WAIT_S = LeaseConfig.loser_wait_s
GAVE_UP_HINT = ("This instance is not needed while the holder keeps the job: systemd retries a few "
                "times, then leaves spotrun-agent failed; terminate this instance or lower the "
                "fleet's target capacity (it keeps running, and is paid for, until you do)")


class LeaseHeld(SpotrunError):
    """Another live instance holds the job (or the volume) and is not letting go."""

    def __init__(self, message: str, *, holder: str | None = None, holder_state: str | None = None,
                 waited_s: float | None = None):
        super().__init__(message)
        self.holder = holder
        self.holder_state = holder_state
        self.waited_s = waited_s


class LeaseLost(SpotrunError):
    """This agent's lease was taken by another acquisition: it must not touch anything."""


def table_definition(name: str) -> dict:
    """``create_table`` keyword arguments for the lease table (the operator's init uses them)."""
    return {
        "TableName": name,
        "AttributeDefinitions": [{"AttributeName": KEY, "AttributeType": "S"}],
        "KeySchema": [{"AttributeName": KEY, "KeyType": "HASH"}],
        "BillingMode": "PAY_PER_REQUEST",
    }


def instance_state(ec2, instance_id: str) -> str:
    """EC2's state name for ``instance_id``; 'absent' when EC2 does not know it (now)."""
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError as exc:
        if ec2mod.error_code(exc) in ("InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"):
            return ABSENT
        raise
    for reservation in reservations:
        for instance in reservation["Instances"]:
            return instance["State"]["Name"]
    return ABSENT


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Item:
    """The lease item as read; ``generation`` None for an item written before generations."""
    holder: str | None
    generation: int | None
    az: str = "?"
    since: str = "?"
    draining: str = ""
    released: str = ""
    finished: str = ""
    first_volume: str = ""

    def kept(self) -> dict[str, str]:
        """What every write of the item carries on: the first volume's statement."""
        return {"first_volume": self.first_volume} if self.first_volume else {}

    @property
    def count(self) -> int:
        return self.generation or 0


class Lease:
    def __init__(self, dynamodb, table: str, job_id: str, instance_id: str, az: str, ec2,
                 *, poll_s: float = 2.0, loser_wait_s: float | None = None,
                 absent_window_s: float | None = None, absent_lookups: int | None = None):
        self.db = dynamodb
        self.table = table
        self.job_id = job_id
        self.instance_id = instance_id
        self.az = az
        self.ec2 = ec2
        self.poll_s = poll_s
        self.loser_wait_s = LOSER_WAIT_S if loser_wait_s is None else loser_wait_s
        self.absent_window_s = ABSENT_WINDOW_S if absent_window_s is None else absent_window_s
        self.absent_lookups = ABSENT_LOOKUPS if absent_lookups is None else absent_lookups
        self.generation: int | None = None  # the generation this agent acquired

    # -- the item -------------------------------------------------------------------------

    def _missing_table(self, exc: ClientError) -> None:
        if ec2mod.error_code(exc) == "ResourceNotFoundException":
            raise SpotrunError(
                f"aws.lease_table: DynamoDB table {self.table!r} does not exist "
                "(create it with 'spotrun init')") from None

    def _read(self) -> Item | None:
        try:
            raw = self.db.get_item(TableName=self.table, Key={KEY: {"S": self.job_id}},
                                   ConsistentRead=True).get("Item")
        except ClientError as exc:
            self._missing_table(exc)
            raise
        if raw is None:
            return None
        value = {k: v.get("S", v.get("N")) for k, v in raw.items()}
        generation = value.get("generation")
        return Item(value.get("holder") or None, int(generation) if generation else None,
                    value.get("az", "?"), value.get("since", "?"), value.get("draining", ""),
                    value.get("released", ""), value.get("finished", ""),
                    value.get("first_volume", ""))

    def _swap(self, expected: Item | None, item: dict[str, str | int]) -> bool:
        """Write ``item`` iff the stored one still is ``expected`` (holder and generation)."""
        values: dict = {}
        if expected is None:
            condition = f"attribute_not_exists({KEY})"
        else:
            parts = []
            if expected.generation is None:
                parts.append("attribute_not_exists(generation)")
            else:
                parts.append("generation = :g")
                values[":g"] = {"N": str(expected.generation)}
            if expected.holder is None:
                parts.append("attribute_not_exists(holder)")
            else:
                parts.append("holder = :h")
                values[":h"] = {"S": expected.holder}
            condition = " AND ".join(parts)
        body = {KEY: {"S": self.job_id}}
        for name, val in item.items():
            body[name] = {"N": str(val)} if isinstance(val, int) else {"S": val}
        kwargs = {"ExpressionAttributeValues": values} if values else {}
        try:
            self.db.put_item(TableName=self.table, Item=body, ConditionExpression=condition, **kwargs)
            return True
        except ClientError as exc:
            if ec2mod.error_code(exc) == "ConditionalCheckFailedException":
                return False
            self._missing_table(exc)
            raise

    def item(self) -> Item | None:
        """The item as it is now (a consistent read); None for a job never held."""
        return self._read()

    def holder(self) -> dict | None:
        """Who holds the job (holder, az, since, generation as strings); None when free."""
        item = self._read()
        if item is None or item.holder is None:
            return None
        return {"holder": item.holder, "az": item.az, "since": item.since,
                "generation": str(item.count)}

    def _take(self, current: Item | None) -> bool:
        generation = (current.count if current else 0) + 1
        if not self._swap(current, {"holder": self.instance_id, "az": self.az, "since": _now(),
                                    "generation": generation, **(current.kept() if current else {})}):
            return False
        self.generation = generation
        return True

    # -- acquire, validate, drain, release ------------------------------------------------

    def acquire(self, drain_wait_s: float) -> None:
        """Take the job's lease. Waits up to ``drain_wait_s`` for a holder that is draining,
        at most ``loser_wait_s`` for one that is not, and through the takeover window for one
        EC2 does not know."""
        if self.generation is not None and self._is_mine(self._read()):
            return
        start = time.monotonic()
        absent: tuple[tuple, float, int] | None = None  # (holder, generation), since, lookups
        waited = False
        while True:
            current = self._read()
            if current is None or current.holder in (None, self.instance_id):
                if self._take(current):
                    log.info("lease_acquired", table=self.table, generation=self.generation,
                             waited=waited)
                    return
                continue
            other = current.holder
            state = instance_state(self.ec2, other)
            now = time.monotonic()
            proof = None
            if state in GONE_STATES:
                proof = state
            elif state == ABSENT:
                key = (other, current.generation)
                if absent is None or absent[0] != key:
                    absent = (key, now, 0)
                absent = (key, absent[1], absent[2] + 1)
                if absent[2] >= self.absent_lookups and now - absent[1] >= self.absent_window_s:
                    proof = f"not found on {absent[2]} lookups over {now - absent[1]:.0f} s"
            else:
                absent = None  # seen alive: any NotFound before was EC2 catching up
            if proof is not None:
                if self._take(current):
                    log.warning("lease_taken_over", table=self.table, previous_holder=other,
                                previous_generation=current.count, proof=proof,
                                generation=self.generation)
                    return
                absent = None
                continue
            if not waited:
                log.info("lease_wait", table=self.table, holder=other, holder_state=state,
                         draining=bool(current.draining))
                waited = True
            if absent is not None:  # proving it gone: back off, as AWS advises
                time.sleep(min(self.poll_s * 2 ** absent[2],
                               max(self.poll_s, self.absent_window_s / self.absent_lookups)))
                continue
            limit = drain_wait_s if current.draining else min(self.loser_wait_s, drain_wait_s)
            if now - start >= limit:
                message = (f"job {self.job_id!r} is held by instance {other} ({state}, "
                           f"{current.az}, since {current.since}"
                           f"{', draining' if current.draining else ''}); this instance waited "
                           f"{limit:.0f} s and did not touch the job's volume")
                log.error("lease_gave_up", table=self.table, holder=other, holder_state=state,
                          waited_s=round(now - start, 1), hint=GAVE_UP_HINT)
                raise LeaseHeld(f"{message}. {GAVE_UP_HINT}", holder=other, holder_state=state,
                                waited_s=round(now - start, 1))
            time.sleep(self.poll_s)

    def try_acquire(self) -> bool:
        """Take the lease now if it is free, ours, or held by an instance EC2 shows ending;
        False (nothing written) while another instance may still hold it. For a sweep's claim
        (spotrun.sweepclaim): an instance with other experiments to choose from never waits."""
        for _ in range(3):  # a lost compare-and-swap: read again (someone else moved first)
            current = self._read()
            if current is not None and current.finished:
                return False
            if current is not None and current.holder not in (None, self.instance_id):
                state = instance_state(self.ec2, current.holder)
                if state not in GONE_STATES:
                    return False
                if self._take(current):
                    log.warning("lease_taken_over", table=self.table, previous_holder=current.holder,
                                previous_generation=current.count, proof=state,
                                generation=self.generation)
                    return True
                continue
            if self._take(current):
                log.info("lease_acquired", table=self.table, generation=self.generation, waited=False)
                return True
        return False

    def _is_mine(self, current: Item | None) -> bool:
        return (current is not None and current.holder == self.instance_id
                and self.generation is not None and current.generation == self.generation)

    def validate(self) -> None:
        """Consistent read: raise LeaseLost unless the item still names this agent with the
        generation it acquired. Called right before every step that changes the job."""
        current = self._read()
        if self._is_mine(current):
            return
        if current is None or current.holder is None:
            now = "nobody holds it now"
        else:
            now = f"instance {current.holder} holds it with generation {current.count} since {current.since}"
        log.error("lease_lost", table=self.table, generation=self.generation,
                  holder=current.holder if current else None)
        raise LeaseLost(f"job {self.job_id!r}: this agent acquired the lease as generation "
                        f"{self.generation} but {now}; stopping without touching the job's "
                        f"volumes or snapshots")

    def mark_draining(self) -> None:
        """Tell waiting instances this holder is letting go (they wait for the drain)."""
        current = self._read()
        if not self._is_mine(current) or current.draining:
            return
        self._swap(current, {"holder": self.instance_id, "az": current.az, "since": current.since,
                             "generation": current.count, "draining": _now(), **current.kept()})

    def note_first_volume(self, create_token: str) -> None:
        """State, right before the CreateVolume, that this holder is making the job's first
        volume with ``create_token`` (spotrun.firstvolume). Also the lease check before that
        call: LeaseLost unless the item still names this agent with its generation."""
        for _ in range(3):  # a lost compare-and-swap with this agent's own drain mark: again
            current = self._read()
            if not self._is_mine(current):
                self.validate()  # raises LeaseLost, naming who holds it now
            if self._swap(current, {"holder": self.instance_id, "az": current.az,
                                    "since": current.since, "generation": current.count,
                                    **({"draining": current.draining} if current.draining else {}),
                                    "first_volume": firstvolume.statement(create_token)}):
                return
        raise LeaseLost(f"job {self.job_id!r}: the lease item kept changing while this agent "
                        "wrote to it; stopping without creating a volume")

    def first_volume_stated(self) -> tuple[str, float] | None:
        """(create token, unix time) of the last statement of a first volume in the making;
        None when there is none or it cannot be read (then nothing is awaited)."""
        item = self._read()
        stated = firstvolume.parse(item.first_volume if item else None)
        if item is not None and item.first_volume and stated is None:
            log.warning("first_volume_unreadable", table=self.table, value=item.first_volume[:80])
        return stated

    def release(self, *, finished: bool = False) -> None:
        """Let go (after the volume is detached); the generation stays for the next holder.
        ``finished``: the job is done (a sweep's experiment), and no claim takes it again."""
        current = self._read()
        if current is None or current.holder != self.instance_id or (
                self.generation is not None and current.generation != self.generation):
            log.warning("lease_not_ours_at_release", table=self.table, generation=self.generation,
                        holder=current.holder if current else None)
            return
        item: dict[str, str | int] = {"generation": current.count, "az": current.az,
                                      "since": current.since, "released": _now(),
                                      **current.kept()}
        if finished:
            item["finished"] = item["released"]
        if self._swap(current, item):
            log.info("lease_released", table=self.table, generation=current.count)
        else:
            log.warning("lease_not_ours_at_release", table=self.table, generation=self.generation)
        self.generation = None


def wait_until_free(ec2, volume_id: str, instance_id: str, deadline_s: float,
                    poll_s: float = 2.0, *, loser_wait_s: float | None = None
                    ) -> tuple[dict, str | None]:
    """Wait until ``volume_id`` is not attached to (or detaching from) another instance.

    Returns the volume as last described and the instance it waited for (None if it did not
    wait). A live instance that keeps it attached is waited for at most ``loser_wait_s``; one
    detaching it, or one EC2 is ending, up to ``deadline_s``. Raises LeaseHeld after that.
    """
    loser_wait_s = LOSER_WAIT_S if loser_wait_s is None else loser_wait_s
    start = time.monotonic()
    waited_for = None
    volume: dict = {}

    def usable() -> bool:
        # The shorter limit for a live holder depends on what each poll sees, so it is
        # checked here; the helper keeps the overall deadline.
        nonlocal volume, waited_for
        volume = ec2mod.describe_volume(ec2, volume_id)
        if volume is None:
            raise ec2mod.ResourceGone(f"volume {volume_id} no longer exists")
        if volume["State"] == "error":
            raise ec2mod.ResourceFailed(f"volume {volume_id} is in state 'error'")
        att = ec2mod.attachment_of(volume)
        if att is None or att["InstanceId"] == instance_id:
            return volume["State"] in ("available", "in-use")
        holder_state = instance_state(ec2, att["InstanceId"])
        keeps_it = att["State"] in ("attaching", "attached") and holder_state in ALIVE_STATES
        limit = min(loser_wait_s, deadline_s) if keeps_it else deadline_s
        if time.monotonic() - start >= limit:
            log.error("volume_held_gave_up", volume_id=volume_id, holder=att["InstanceId"],
                      holder_state=holder_state, hint=GAVE_UP_HINT if keeps_it else "")
            raise LeaseHeld(
                f"volume {volume_id} is still {att['State']} to instance {att['InstanceId']} "
                f"({holder_state}) after {limit:.0f} s; not touching it"
                + (f". {GAVE_UP_HINT}" if keeps_it else ""),
                holder=att["InstanceId"], holder_state=holder_state,
                waited_s=round(time.monotonic() - start, 1))
        if waited_for is None:
            log.info("volume_held_wait", volume_id=volume_id, holder=att["InstanceId"],
                     holder_state=holder_state, attachment_state=att["State"])
            waited_for = att["InstanceId"]
        return False

    wait_until(usable, deadline_s, interval_s=poll_s, what=f"volume {volume_id} to be usable",
               error=lambda: LeaseHeld(f"volume {volume_id} did not become usable in "
                                       f"{deadline_s:.0f} s (state {volume['State']})"))
    return volume, waited_for


def wait_until_unheld(ec2, volume_id: str, instance_id: str, deadline_s: float,
                      poll_s: float = 2.0, *, loser_wait_s: float | None = None) -> dict:
    """:func:`wait_until_free`, the volume only."""
    return wait_until_free(ec2, volume_id, instance_id, deadline_s, poll_s,
                           loser_wait_s=loser_wait_s)[0]

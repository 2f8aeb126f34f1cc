"""Invariant 1 under races, judged from the local cloud's call ledger (never the agents' logs).

The ledger (:mod:`spotrun.localcloud.ledger`) is written by the cloud's proxies; the agent
cannot write or read it. From it, per job:

- **never two job volumes attached at once**: the performed AttachVolume/DetachVolume/
  DeleteVolume calls on the job's volumes, an attachment also ending when its instance is
  terminated (TerminateInstances, the checker's calls included), plus the cloud's own
  attachment state at the end;
- **no job volume deleted while it was the newest copy**: each volume's data is dated by the
  ledger's order — "now" while it is attached for training, the detach (or its instance's
  termination) once it is not; a copy made from a snapshot carries the snapshot's date until
  the agent tags it proven (verified/done), since until then it holds only the source's data;
  a DeleteVolume of the volume whose date is later than every other live job volume's is a
  violation;
- **no loser mutating call after the winner's acquisition**: the lease item's holder is
  followed through the performed PutItems on it; a mutating call on the job's volumes,
  snapshots or lease item by an instance while another holds it is a violation (a conditional
  PutItem refused is the lease protocol working, not a violation), and so is a takeover from a
  holder that was never terminated.

Each violation is one sentence naming the invariant. Steps lost to a race are judged by the
soak's resume checks (:mod:`spotrun.harness.soakcheck`: the counting trainer's exact sum and the steps
redone per interruption).
"""
from __future__ import annotations

import math
from typing import Iterable

from spotrun import tags as T
from spotrun.localcloud.ledger import is_mutating, performed

STEP = "spotrun:migration-step"          # spotrun.migration.STEP
PROVEN_STEPS = ("verified", "done")      # spotrun.migration.PROVEN_STEPS
LEASE_KEY = "job"                        # spotrun.lease.KEY


def _ordered(records: Iterable[dict]) -> list[dict]:
    return sorted(records, key=lambda r: r.get("seq", 0))


def _of(record: dict, prefix: str) -> list[str]:
    return [i for i in record.get("resources", []) if isinstance(i, str) and i.startswith(prefix)]


def _ec2(record: dict, action: str) -> bool:
    return record.get("action") == action and record.get("service") in (None, "ec2")


def job_resources(records: Iterable[dict], job_id: str) -> tuple[set[str], set[str]]:
    """The job's volumes and snapshots: created with its tag, tagged with it, or (snapshots,
    and volumes made from them) made from one of its resources."""
    volumes: set[str] = set()
    snapshots: set[str] = set()
    for r in _ordered(records):
        mine = (r.get("tags") or {}).get(T.JOB) == job_id
        created = r.get("created") or []
        if _ec2(r, "CreateVolume") and (mine or set(_of(r, "snap-")) & snapshots):
            volumes.update(i for i in created if i.startswith("vol-"))
        elif _ec2(r, "CreateSnapshot") and (mine or set(_of(r, "vol-")) & volumes):
            snapshots.update(i for i in created if i.startswith("snap-"))
        elif _ec2(r, "CreateTags") and mine and performed(r):
            volumes.update(_of(r, "vol-"))
            snapshots.update(_of(r, "snap-"))
    return volumes, snapshots


def _terminated(record: dict) -> list[str]:
    """Instances a performed TerminateInstances ended (anyone's call, the checker's too)."""
    return _of(record, "i-") if _ec2(record, "TerminateInstances") and performed(record) else []


def attachment_violations(records: Iterable[dict], volumes: set[str],
                          attached_now: dict[str, str] | None = None) -> list[str]:
    """Never two job volumes attached at once."""
    attached: dict[str, tuple[str, int]] = {}  # volume -> (instance, seq of the attach)
    seen: set[frozenset] = set()
    out = []
    for r in _ordered(records):
        for instance in _terminated(r):
            for volume in [v for v, (i, _) in attached.items() if i == instance]:
                del attached[volume]
        if not performed(r) or r.get("checker"):
            continue
        volume = next(iter(_of(r, "vol-")), None)
        if volume not in volumes:
            continue
        if _ec2(r, "AttachVolume"):
            instance = next(iter(_of(r, "i-")), None)
            attached[volume] = (instance or "?", r["seq"])
            others = {v: a for v, a in attached.items() if v != volume}
            for other, (holder, since) in others.items():
                pair = frozenset((volume, other))
                if pair not in seen:
                    seen.add(pair)
                    out.append(f"inv1 never two volumes attached: job volumes {other} (to {holder}, "
                               f"ledger seq {since}) and {volume} (to {instance}, ledger seq "
                               f"{r['seq']}) were attached at once")
        elif _ec2(r, "DetachVolume") or _ec2(r, "DeleteVolume"):
            attached.pop(volume, None)
    now = {v: i for v, i in (attached_now or {}).items() if v in volumes}
    if len(now) > 1:
        out.append(f"inv1 never two volumes attached: the cloud shows job volumes "
                   f"{sorted(now.items())} attached at once at the end")
    return out


def deletion_violations(records: Iterable[dict], volumes: set[str]) -> list[str]:
    """No job volume deleted while it was the newest copy."""
    dated: dict[str, float] = {}       # live job volume -> the ledger seq of its data (inf: in use)
    attached: dict[str, str] = {}      # job volume -> instance
    unproven: set[str] = set()         # copies not yet tagged verified/done
    snapshot_date: dict[str, float] = {}
    out = []
    for r in _ordered(records):
        seq = r.get("seq", 0)
        for instance in _terminated(r):
            for volume in [v for v, i in attached.items() if i == instance]:
                del attached[volume]
                dated[volume] = min(dated.get(volume, 0), seq)
        if not performed(r) or r.get("checker"):
            continue
        if _ec2(r, "CreateSnapshot"):
            source = next(iter(_of(r, "vol-")), None)
            if source in dated:
                for snap in r.get("created", []):
                    snapshot_date[snap] = min(dated[source], seq)
            continue
        if _ec2(r, "CreateVolume"):
            for volume in (v for v in r.get("created", []) if v in volumes):
                source = next(iter(_of(r, "snap-")), None)
                dated.setdefault(volume, snapshot_date.get(source, 0) if source else 0)
                if (r.get("tags") or {}).get(STEP) not in (None, *PROVEN_STEPS):
                    unproven.add(volume)
            continue
        volume = next(iter(_of(r, "vol-")), None)
        if volume not in volumes or volume not in dated:
            continue
        if _ec2(r, "AttachVolume"):
            attached[volume] = next(iter(_of(r, "i-")), "?")
            if volume not in unproven:
                dated[volume] = math.inf
        elif _ec2(r, "CreateTags") and (r.get("tags") or {}).get(STEP) in PROVEN_STEPS:
            if volume in unproven:
                unproven.discard(volume)
                if volume in attached:
                    dated[volume] = math.inf
        elif _ec2(r, "DetachVolume"):
            attached.pop(volume, None)
            dated[volume] = min(dated[volume], seq)
        elif _ec2(r, "DeleteVolume"):
            date = dated.pop(volume)
            attached.pop(volume, None)
            unproven.discard(volume)
            others = dict(dated)
            if date > 0 and all(date > d for d in others.values()):
                since = "in use" if date == math.inf else f"written up to ledger seq {date:.0f}"
                out.append(f"inv1 no newest copy deleted: {r.get('instance') or 'a caller'} deleted "
                           f"job volume {volume} (ledger seq {seq}) while it was the newest copy "
                           f"({since}; the other copies: "
                           f"{ {v: ('in use' if d == math.inf else d) for v, d in others.items()} })")
    return out


def _lease_write(r: dict, job_id: str, table: str | None) -> bool:
    # GetItem/UpdateItem/DeleteItem name the item by "key"; a PutItem's "item" holds it.
    return (r.get("service") == "dynamodb" and (table is None or r.get("table") == table)
            and job_id in ((r.get("key") or {}).get(LEASE_KEY), (r.get("item") or {}).get(LEASE_KEY)))


def _touches(r: dict, job_id: str, table: str | None, resources: set[str]) -> bool:
    if _lease_write(r, job_id, table):
        return True
    return bool(set(r.get("resources", [])) & resources or set(r.get("created") or []) & resources)


def _refused_swap(r: dict) -> bool:
    """A compare-and-swap on the lease that the table refused: the protocol, not a write."""
    return r.get("action") == "PutItem" and r.get("error") == "ConditionalCheckFailedException"


def lease_violations(records: Iterable[dict], job_id: str, table: str | None,
                     volumes: set[str], snapshots: set[str],
                     skip_instances: Iterable[str] = ()) -> list[str]:
    """No mutating call on the job by an instance that does not hold its lease, and no
    takeover from a holder still alive. ``skip_instances``: judged by :func:`race_violations`."""
    resources = volumes | snapshots
    skip = set(skip_instances)
    holder: str | None = None
    released_by: str | None = None
    generation = None
    gone: set[str] = set()
    flagged: dict[str, list[str]] = {}
    after_release: dict[str, list[str]] = {}
    out = []
    for r in _ordered(records):
        gone.update(_terminated(r))
        instance = r.get("instance")
        if r.get("checker") or not instance or not is_mutating(r.get("service"), r.get("action")):
            continue
        if not _touches(r, job_id, table, resources) or _refused_swap(r):
            continue
        if _lease_write(r, job_id, table) and r.get("action") == "PutItem" and performed(r):
            item = r.get("item") or {}
            new = item.get("holder")
            if new and new != holder and holder is not None and holder not in gone:
                out.append(f"inv1 lease taken over from a live holder: {new} took job {job_id}'s "
                           f"lease (generation {item.get('generation')}) from {holder} "
                           f"(generation {generation}), which was never terminated "
                           f"(ledger seq {r['seq']})")
            released_by = instance if holder is not None and not new else None
            holder, generation = new or None, item.get("generation")
            continue
        # While another holds it, any write is a second writer; after letting it go, the
        # releaser's own write (its last tags, say) can land on a copy a successor already
        # trusts: the final tags belong inside the release.
        if holder is not None and instance != holder and instance not in skip:
            flagged.setdefault(instance, []).append(f"{r.get('action')}@{r['seq']}")
        elif holder is None and instance == released_by:
            after_release.setdefault(instance, []).append(f"{r.get('action')}@{r['seq']}")
    for instance, what in flagged.items():
        out.append(f"inv1 no mutating call without the lease: {instance} made {len(what)} mutating "
                   f"call(s) on job {job_id}'s resources while another instance held the lease: "
                   f"{what[:8]}")
    for instance, what in after_release.items():
        out.append(f"inv1 no mutating call after letting go: {instance} made {len(what)} mutating "
                   f"call(s) on job {job_id}'s resources after releasing its lease: {what[:8]}")
    return out


def acquisitions(records: Iterable[dict], job_id: str, table: str | None,
                 instance: str) -> list[int]:
    """Ledger seqs of the performed lease writes that made ``instance`` the holder (a write
    by the holder itself, e.g. marking it draining, is not an acquisition)."""
    holder = None
    seqs = []
    for r in _ordered(records):
        if _lease_write(r, job_id, table) and r.get("action") == "PutItem" and performed(r):
            new = (r.get("item") or {}).get("holder")
            if new == instance and holder != instance:
                seqs.append(r["seq"])
            holder = new
    return seqs


def contended(records: Iterable[dict], job_id: str, table: str | None, winner: str,
              loser: str, since_seq: int = 0) -> bool:
    """The race landed: the loser asked for the job's lease (read it, or had its swap refused)
    while the winner held it, after ``since_seq``."""
    holder = None
    for r in _ordered(records):
        if not _lease_write(r, job_id, table):
            continue
        if r.get("action") == "PutItem" and performed(r):
            holder = (r.get("item") or {}).get("holder")
        elif r.get("instance") == loser and r.get("seq", 0) > since_seq and holder == winner:
            return True
    return False


def race_violations(races: list[dict], records: Iterable[dict], job_id: str,
                    table: str | None, volumes: set[str], snapshots: set[str]) -> list[str]:
    """Invariant 1 under a race: after the winner's acquisition (its lease PutItem in the
    ledger; without a table, from the race's start) the one that did not win made no mutating
    call on the job's volumes, snapshots or lease item."""
    ordered = _ordered(records)
    resources = volumes | snapshots
    out = []
    for race in races:
        winner, loser = race.get("winner"), race.get("loser")
        start = race.get("since_seq", 0)
        takes = acquisitions(ordered, job_id, table, winner)
        before = [s for s in takes if s <= start]
        after = [s for s in takes if s > start]
        # The winner held the job when the race began (a live holder raced), or won it after.
        acquired = before[-1] if before else after[0] if after else start
        # Until the loser's own acquisition, if the winner let go later and it took the job
        # then (a takeover from a live holder is lease_violations' to name).
        until = next((s for s in acquisitions(ordered, job_id, table, loser) if s > acquired),
                     math.inf)
        touched = sorted({r.get("action") for r in ordered
                          if acquired < r.get("seq", 0) < until and r.get("instance") == loser
                          and not r.get("checker")
                          and is_mutating(r.get("service"), r.get("action"))
                          and _touches(r, job_id, table, resources) and not _refused_swap(r)})
        race["touched"] = touched
        if touched:
            what = str(race.get("kind") or "two replacements").replace("_", " ")
            out.append(f"inv1 {what}: the one that did not win ({loser}) acted on the job after "
                       f"{winner}'s acquisition (ledger seq {acquired}): {touched}")
    return out


def check(records: list[dict], job_id: str, table: str | None, races: list[dict] | None = None,
          attached_now: dict[str, str] | None = None) -> list[str]:
    """Every ledger check of one job; ``table`` None or "" when the job has no lease table."""
    volumes, snapshots = job_resources(records, job_id)
    out = attachment_violations(records, volumes, attached_now)
    out += deletion_violations(records, volumes)
    races = races or []
    if table:
        out += lease_violations(records, job_id, table, volumes, snapshots,
                                skip_instances={r.get("loser") for r in races})
    out += race_violations(races, records, job_id, table or None, volumes, snapshots)
    return out


# -- snapshots created per drain/migration (issue 15: count creations, not what is left) ----

def snapshot_creations(records: Iterable[dict], job: str | Iterable[str]) -> dict:
    """Every snapshot the job's CreateSnapshot calls made (a performed-then-5xx or dropped-after
    one included: the ledger keeps what the call created), grouped per drain/migration: per
    source volume, between one performed AttachVolume of it and the next. ``job``: the job's
    tag value, or its volume ids. Returns ``{"created": n, "groups": [(volume, [(seq, id,
    instance)])]}``."""
    ordered = _ordered(records)
    volumes = job_resources(ordered, job)[0] if isinstance(job, str) else set(job)
    epoch: dict[str, int] = {}
    groups: dict[tuple[str, int], list[tuple[int, str, str | None]]] = {}
    for r in ordered:
        if r.get("checker"):
            continue
        volume = next(iter(_of(r, "vol-")), None)
        if volume not in volumes:
            continue
        if _ec2(r, "AttachVolume") and performed(r):
            epoch[volume] = epoch.get(volume, 0) + 1
        elif _ec2(r, "CreateSnapshot"):
            made = [i for i in r.get("created") or [] if i.startswith("snap-")]
            groups.setdefault((volume, epoch.get(volume, 0)), []).extend(
                (r.get("seq", 0), i, r.get("instance")) for i in made)
    return {"created": sum(len(g) for g in groups.values()),
            "groups": [(volume, made) for (volume, _), made in groups.items() if made]}


def duplicate_snapshots(records: Iterable[dict], job: str | Iterable[str]) -> list[str]:
    """Exactly one snapshot per drain/migration: one sentence per group that made more."""
    out = []
    for volume, made in snapshot_creations(records, job)["groups"]:
        if len(made) > 1:
            out.append(f"duplicate snapshots: {len(made)} snapshots created from job volume "
                       f"{volume} in one drain/migration (between two of its attaches): "
                       + ", ".join(f"{i} by {who or 'an unknown caller'} at ledger seq {seq}"
                                   for seq, i, who in made))
    return out

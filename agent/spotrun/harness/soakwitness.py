"""Invariants 2, 5 and 6 judged from the local cloud's call ledger and the volume image.

The companion of :mod:`spotrun.harness.soakledger` (invariant 1, races, duplicate snapshots): the
agent can neither write the ledger nor fake what its volume's image holds, so these checks do
not take its word (its logs, or the tags it writes about itself) for anything. Per job:

- **inv6, only the job's own resources**: every mutating call made by one of the job's
  instances names only the job's resources — its instances and fleet, the volumes and
  snapshots its instances created, or ones created with its tag by someone else (the
  operator). Ownership is followed in ledger order, so an agent that tags another job's
  volume with its own job tag has touched a foreign resource with that very call. Lease
  writes must be on the job's own item. And every volume and snapshot an agent instance
  created (the ledger's ``created``, tagged or not, a call answered 5xx after it was
  performed included) is accounted for at the end: gone, the job's final volume, or a
  snapshot kept with the job's tag and a spotrun role.
- **inv5, only success cancels**: the fleet cancel (CancelSpotFleetRequests, DeleteFleets, or
  an Auto Scaling group update — the agent updates its group only to scale it to zero, and
  the ledger does not keep the capacity asked for) comes only when the job's final volume
  image holds the completion record, and not before the record's own time; a completed
  image with no cancel is a violation too. The image is read after the job (at cancel time
  the volume may still be attached): the record's time, written by the agent just before
  it released the volume, is compared with the ledger's time of the first cancel.
- **inv2, copy before delete**: in every migration (a job volume made from a snapshot of
  another job volume), the old volume's DeleteVolume comes after a copy made from it was
  attached (a performed AttachVolume) and then proven (a CreateTags putting the
  verified/done migration step on it); a snapshot a copy was made from is deleted only after
  one of its copies was proven, unless every copy of it was already gone (an abandoned
  migration: the source still holds the data and invariant 1 judges its deletion).

Each violation is one sentence naming the invariant.
"""
from __future__ import annotations

from datetime import datetime
from typing import Iterable

from spotrun import tags as T
from spotrun.localcloud.ledger import is_mutating, performed
from spotrun.harness.soakledger import PROVEN_STEPS, STEP, _ordered

# The completion record's name at the volume's root (spotrun.boot.COMPLETION_RECORD; not
# imported so this checker does not load the agent's lifecycle).
COMPLETION_RECORD = ".spotrun-completed.json"
# The trainer's own record that it trained to the end (spotrun_trainer.protocol), in the
# job's checkpoints directory: the agent's record alone is the agent's word.
TRAINER_COMPLETION = "checkpoints/.spotrun-trainer-completed.json"
SNAPSHOT_ROLES = ("migration-snapshot", "drain-snapshot")
CANCEL_ACTIONS = ("CancelSpotFleetRequests", "DeleteFleets", "UpdateAutoScalingGroup",
                  "SetDesiredCapacity")


def _by_agent(r: dict, instances: set[str]) -> bool:
    return not r.get("checker") and r.get("instance") in instances


def _jobs(job_id: str | Iterable[str]) -> set[str]:
    """One job's id, or a sweep's experiments' (and its own items' keys): one set of ids."""
    return {job_id} if isinstance(job_id, str) else set(job_id)


def _job_tagged(r: dict, job_id: str | Iterable[str]) -> bool:
    return (r.get("tags") or {}).get(T.JOB) in _jobs(job_id)


def _lease_job(r: dict) -> str | None:
    for field in ("key", "item"):
        value = (r.get(field) or {}).get("job")
        if value is not None:
            return str(value)
    return None


# -- inv6 -----------------------------------------------------------------------------------

def _name(jobs: set[str]) -> str:
    return next(iter(jobs)) if len(jobs) == 1 else "/".join(sorted(jobs))


def foreign_touches(records: Iterable[dict], job_id: str | Iterable[str], instances: Iterable[str],
                    fleets: Iterable[str]) -> list[str]:
    """Mutating calls by the job's instances that name a resource that is not the job's.
    ``job_id``: a set of ids for a sweep (its experiments', and its cancel item's key)."""
    jobs = _jobs(job_id)
    instances = set(instances)
    owned: set[str] = set(instances) | set(fleets)
    flagged: dict[tuple[str, str], list[str]] = {}
    for r in _ordered(records):
        created = [i for i in r.get("created") or [] if isinstance(i, str)]
        agent = _by_agent(r, instances)
        if agent and is_mutating(r.get("service"), r.get("action"), r.get("method", "POST")):
            if r.get("service") == "dynamodb":
                other = _lease_job(r)
                if other is not None and other not in jobs:
                    flagged.setdefault((r["instance"], f"lease item of job {other}"),
                                       []).append(f"{r.get('action')}@{r.get('seq')}")
            else:
                for resource in r.get("resources") or []:
                    if resource not in owned:
                        flagged.setdefault((r["instance"], resource), []).append(
                            f"{r.get('action')}@{r.get('seq')}")
        # What a job instance created is the job's (tagged or not: the accounting below
        # judges whether it was cleaned up); so is what anyone created with the job's tag.
        if agent or (_job_tagged(r, job_id) and (r.get("action") or "").startswith("Create")
                     and r.get("action") != "CreateTags"):
            owned.update(created)
        # The operator (not an agent) may adopt a resource into the job by tagging it.
        if not agent and r.get("action") == "CreateTags" and _job_tagged(r, job_id) \
                and performed(r):
            owned.update(r.get("resources") or [])
    return [f"inv6 only the job's own resources: {instance} called {calls[:6]} on {resource}, "
            f"which is not job {_name(jobs)}'s (neither created by its instances nor with its tag, "
            f"nor its fleet or instances)"
            for (instance, resource), calls in flagged.items()]


def unaccounted(records: Iterable[dict], job_id: str | Iterable[str], instances: Iterable[str], *,
                final_volumes: Iterable[str], existing_volumes: Iterable[str],
                existing_snapshots: Iterable[str]) -> list[str]:
    """Every volume and snapshot the job's instances created is gone at the end, or is the
    job's final volume, or a snapshot kept with the job's tag and a spotrun role.
    ``existing_*``: what the cloud's own (fault-free) view still holds after the job."""
    instances = set(instances)
    final, volumes, snapshots = set(final_volumes), set(existing_volumes), set(existing_snapshots)
    creation: dict[str, dict] = {}
    for r in _ordered(records):
        if _by_agent(r, instances):
            for made in r.get("created") or []:
                if isinstance(made, str) and made.startswith(("vol-", "snap-")):
                    creation.setdefault(made, r)
    out = []
    for made, r in creation.items():
        tags = r.get("tags") or {}
        if made.startswith("vol-"):
            if made in volumes and made not in final:
                out.append(f"inv6 every volume accounted for: {made}, created by {r['instance']} "
                           f"(ledger seq {r.get('seq')}, tags {tags or 'none'}), is still there "
                           f"and is not the job's final volume {sorted(final)}")
        elif made in snapshots and not (tags.get(T.JOB) in _jobs(job_id)
                                        and tags.get(T.ROLE) in SNAPSHOT_ROLES):
            out.append(f"inv6 every snapshot accounted for: {made}, created by {r['instance']} "
                       f"(ledger seq {r.get('seq')}, tags {tags or 'none'}), is still there "
                       f"without job {_name(_jobs(job_id))}'s tag and a spotrun role")
    return out


# -- inv5 -----------------------------------------------------------------------------------

def cancels(records: Iterable[dict], instances: Iterable[str], fleets: Iterable[str]) -> list[dict]:
    """The agents' calls that cancel the job's fleet (or scale its group), tried or performed:
    the attempt is the decision, whatever EC2 answered."""
    instances, fleets = set(instances), set(fleets)
    return [r for r in _ordered(records) if _by_agent(r, instances)
            and r.get("action") in CANCEL_ACTIONS and set(r.get("resources") or []) & fleets]


def _epoch(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def cancel_violations(records: Iterable[dict], instances: Iterable[str], fleets: Iterable[str],
                      completion: dict | None, *, image_error: str | None = None,
                      expect_cancel: bool = True, trainer_completion: dict | None = None,
                      require_trainer_record: bool = False) -> list[str]:
    """Only success cancels, and success does. ``completion``: the completion record read from
    the job's final volume image (None: the image holds none); ``image_error``: why the image
    could not be read; ``expect_cancel``: False when the soak itself cancelled the fleet.
    ``require_trainer_record`` (a trainer that speaks the protocol, as the soak's does): a
    cancel also needs the trainer's own record on the image (``trainer_completion``), or an
    agent that took a stopped trainer for a finished one and wrote its own record passes."""
    made = cancels(records, instances, fleets)
    first = made[0] if made else None
    where = (f"{first.get('instance')} called {first.get('action')} on "
             f"{sorted(set(first.get('resources') or []) & set(fleets))} at ledger seq "
             f"{first.get('seq')}") if first else ""
    if image_error is not None:
        return [f"inv5 only success cancels: {where}, and the job's final volume image could "
                f"not be read to show a completion record ({image_error})"] if first else []
    if first is None:
        if completion is not None and expect_cancel:
            return [f"inv5 success cancels: the final volume image holds the completion record "
                    f"({COMPLETION_RECORD}, time {completion.get('time')}) but no agent "
                    f"cancelled the fleet {sorted(fleets)} (ledger)"]
        return []
    if completion is None:
        return [f"inv5 only success cancels: {where}, but the job's final volume image holds "
                f"no completion record ({COMPLETION_RECORD})"]
    written = _epoch(completion.get("time"))
    if written is None:
        return [f"inv5 only success cancels: {where}, but the completion record on the image "
                f"has no readable time ({completion.get('time')!r})"]
    # The record's time is whole seconds (floored), the ledger's is not: floored ≤ exact.
    if written > float(first.get("t", 0)):
        return [f"inv5 cancel after the completion record: {where} (t={first.get('t'):.3f}), "
                f"before the completion record on the image was written "
                f"(time {completion.get('time')})"]
    if require_trainer_record and trainer_completion is None:
        return [f"inv5 only success cancels: {where}; the image holds the agent's completion "
                f"record but not the trainer's own ({TRAINER_COMPLETION}): nothing the trainer "
                f"wrote says it trained to the end"]
    return []


# -- inv2 -----------------------------------------------------------------------------------

def migration_violations(records: Iterable[dict], job_id: str,
                         image_at_delete: dict[str, dict[str, int | None]] | None = None) -> list[str]:
    """In every migration the old volume, and the snapshot its copy was made from, are deleted
    only after a copy was attached and then proven (verified/done) — by the ledger; and, with
    ``image_at_delete`` (spotrun.harness.soakdeletes: the newest readable checkpoint step of each job
    volume's image when the delete arrived), only once a copy's image held the old volume's
    newest checkpoint — by the bytes, not by the agent's "verified" tag."""
    snapshot_of: dict[str, str] = {}            # snapshot -> its source volume
    copies: dict[str, tuple[str, str]] = {}     # copy volume -> (snapshot, source volume)
    attached: set[str] = set()
    proven: set[str] = set()
    gone: set[str] = set()
    out = []
    for r in _ordered(records):
        if r.get("checker"):
            continue
        action, seq, who = r.get("action"), r.get("seq"), r.get("instance") or "a caller"
        resources = [i for i in r.get("resources") or [] if isinstance(i, str)]
        if action == "CreateSnapshot":
            source = next((i for i in resources if i.startswith("vol-")), None)
            for snap in r.get("created") or []:
                if source:
                    snapshot_of[snap] = source
        elif action == "CreateVolume":
            snap = next((i for i in resources if i.startswith("snap-") and i in snapshot_of), None)
            for volume in r.get("created") or []:
                if snap:
                    copies[volume] = (snap, snapshot_of[snap])
        if not performed(r):
            continue
        volume = next((i for i in resources if i.startswith("vol-")), None)
        if action == "AttachVolume" and volume in copies:
            attached.add(volume)
        elif action == "CreateTags" and (r.get("tags") or {}).get(STEP) in PROVEN_STEPS:
            proven.update(v for v in resources if v in attached)
        elif action == "DeleteVolume" and volume:
            made = [w for w, (_, source) in copies.items() if source == volume]
            if made and not set(made) & proven:
                out.append(f"inv2 copy before delete: {who} deleted job {job_id}'s old volume "
                           f"{volume} (ledger seq {seq}) before a copy of it was attached and "
                           f"verified "
                           f"(copies {_state(made, attached, proven)})")
            elif made and image_at_delete is not None and volume not in gone:
                out += _copy_held_it(image_at_delete.get(volume), volume, made, job_id, who, seq)
            gone.add(volume)
        elif action == "DeleteSnapshot":
            for snap in (i for i in resources if i.startswith("snap-")):
                made = [w for w, (s, _) in copies.items() if s == snap]
                if made and not set(made) & proven and set(made) - gone:
                    out.append(f"inv2 migration snapshot kept until the copy is proven: {who} "
                               f"deleted job {job_id}'s {snap} (ledger seq {seq}) while its "
                               f"copies were unproven ({_state(made, attached, proven)})")
    return out


def _copy_held_it(steps: dict[str, int | None] | None, volume: str, made: list[str],
                  job_id: str, who: str, seq) -> list[str]:
    where = f"{who} deleted job {job_id}'s old volume {volume} (ledger seq {seq})"
    if steps is None:
        return [f"inv2 copy before delete: {where} and no image was read when the delete "
                f"arrived (the cloud-side witness missed it)"]
    source = steps.get(volume)
    held = [steps.get(w) for w in made if steps.get(w) is not None]
    if source is not None and (not held or max(held) < source):
        return [f"inv2 copy before delete: {where} while no copy's image held its newest "
                f"checkpoint (step {source}; the copies' newest: "
                f"{ {w: steps.get(w) for w in made} })"]
    return []


def _state(volumes: list[str], attached: set[str], proven: set[str]) -> str:
    def one(v: str) -> str:
        return "verified" if v in proven else "attached" if v in attached else "not attached"
    return ", ".join(f"{v}: {one(v)}" for v in volumes)


def check(records: list[dict], job_id: str, instances: Iterable[str], fleets: Iterable[str], *,
          completion: dict | None, image_error: str | None = None, expect_cancel: bool = True,
          final_volumes: Iterable[str] = (), existing_volumes: Iterable[str] = (),
          existing_snapshots: Iterable[str] = (), trainer_completion: dict | None = None,
          require_trainer_record: bool = False,
          image_at_delete: dict[str, dict[str, int | None]] | None = None) -> list[str]:
    """Invariants 2, 5 and 6 of one job, from its ledger records and its final image."""
    instances, fleets = set(instances), set(fleets)
    out = migration_violations(records, job_id, image_at_delete)
    out += cancel_violations(records, instances, fleets, completion, image_error=image_error,
                             expect_cancel=expect_cancel, trainer_completion=trainer_completion,
                             require_trainer_record=require_trainer_record)
    out += foreign_touches(records, job_id, instances, fleets)
    out += unaccounted(records, job_id, instances, final_volumes=final_volumes,
                       existing_volumes=existing_volumes, existing_snapshots=existing_snapshots)
    return out

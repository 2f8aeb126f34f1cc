"""A sweep's claim protocol as the local cloud recorded it (its ledger), never as the agents
say (the soak's witness for sweeps; used by spotrun.harness.soaksweep, hence by the soak's sweep
kinds, the sweep e2e test, `make demo-sweep` and the sweep bench): who held which
experiment's lease when (the PutItems on the lease table, with their items), and which
instance changed which experiment's volumes and snapshots when (the mutating EC2 calls)."""
from __future__ import annotations

from typing import Iterable

from spotrun import tags as T
from spotrun.localcloud.ledger import calls, performed

VOLUME_MUTATIONS = ("AttachVolume", "DetachVolume", "CreateTags", "DeleteVolume", "CreateSnapshot",
                    "DeleteSnapshot", "CreateVolume", "DeleteTags")
# The sweep's own item in the lease table (spotrun.sweepclaim.sweep_key): who cancels the fleet.
SWEEP_ITEM_PREFIX = "sweep#"
# The lease protocol writes its items with PutItem only (spotrun.lease): any other write on an
# experiment's item is outside it.
OTHER_WRITES = ("UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems")


def _item_job(record: dict) -> str | None:
    for field in ("item", "key"):
        value = (record.get(field) or {}).get("job")
        if value is not None:
            return str(value)
    return None


def lease_history(ledger: list[dict], jobs: Iterable[str]) -> dict[str, list[dict]]:
    """job -> its lease item's performed writes in order: {t, seq, holder (None when let go),
    finished, by}."""
    wanted = set(jobs)
    history: dict[str, list[dict]] = {job: [] for job in wanted}
    for record in calls(ledger, action="PutItem", service="dynamodb"):
        item = record.get("item") or {}
        if performed(record) and item.get("job") in wanted:
            history[item["job"]].append({"t": record["t"], "seq": record.get("seq"),
                                         "holder": item.get("holder"),
                                         "finished": bool(item.get("finished")),
                                         "by": record.get("instance")})
    return history


def cancel_takes(ledger: list[dict], sweep_id: str) -> list[dict]:
    """The performed writes of the sweep's cancel item, in order: {t, seq, by, taker}."""
    key = f"{SWEEP_ITEM_PREFIX}{sweep_id}"
    return [{"t": r["t"], "seq": r.get("seq"), "by": r.get("instance"),
             "taker": (r.get("item") or {}).get("fleet_cancel_by")}
            for r in calls(ledger, action="PutItem", service="dynamodb")
            if performed(r) and (r.get("item") or {}).get("job") == key]


def resource_jobs(ledger: list[dict], jobs: Iterable[str]) -> dict[str, str]:
    """Every volume and snapshot of each experiment -> its job id: created with its job tag
    (or tagged with it), a snapshot of one of its volumes, a volume made from one of its
    snapshots."""
    wanted = set(jobs)
    owner: dict[str, str] = {}
    for r in sorted(ledger, key=lambda r: r.get("seq", 0)):
        if r.get("service") not in (None, "ec2"):
            continue
        job = (r.get("tags") or {}).get(T.JOB)
        action = r.get("action")
        sources = [owner[i] for i in r.get("resources") or [] if i in owner]
        if action in ("CreateVolume", "CreateSnapshot", "CopySnapshot"):
            made_for = job if job in wanted else (sources[0] if sources else None)
            if made_for:
                owner.update({i: made_for for i in r.get("created") or []
                              if isinstance(i, str) and i.startswith(("vol-", "snap-"))})
        elif action == "CreateTags" and job in wanted and performed(r):
            owner.update({i: job for i in r.get("resources") or []
                          if isinstance(i, str) and i.startswith(("vol-", "snap-"))})
    return owner


def _held(ledger: list[dict], jobs: set[str]) -> tuple[dict, list[str]]:
    """job -> [(from, to, holder)] from the lease writes; and every take after finished."""
    found = []
    held: dict[str, list[tuple[float, float, str]]] = {}  # job -> (from, to, holder)
    for job, writes in lease_history(ledger, jobs).items():
        holder, since, finished = None, 0.0, False
        for write in writes:
            if write["holder"] and write["holder"] != holder:
                if finished:
                    found.append(f"{job} taken by {write['holder']} after it finished")
                if holder is not None:
                    held.setdefault(job, []).append((since, write["t"], holder))
                holder, since = write["holder"], write["t"]
            elif not write["holder"] and holder is not None:
                held.setdefault(job, []).append((since, write["t"], holder))
                holder = None
            finished = finished or write["finished"]
        if holder is not None:
            held.setdefault(job, []).append((since, float("inf"), holder))
    return held, found


def violations(ledger: list[dict], volume_jobs: dict[str, str]) -> list[str]:
    """What breaks the protocol: an experiment taken again after it finished, or a volume or
    snapshot of it changed (or one made for it) by an instance that did not hold its lease at
    that moment (a takeover ends the previous holder's time). ``volume_jobs``: volume (or
    snapshot) id -> experiment job id (:func:`resource_jobs`)."""
    jobs = set(volume_jobs.values())
    held, found = _held(ledger, jobs)
    for record in calls(ledger, action=VOLUME_MUTATIONS, service="ec2"):
        if not performed(record) or not record.get("instance"):
            continue
        named = [(i, volume_jobs[i]) for i in record.get("resources", []) if i in volume_jobs]
        tagged = (record.get("tags") or {}).get(T.JOB)
        if record["action"] in ("CreateVolume", "CreateSnapshot") and tagged in jobs:
            named += [(i, tagged) for i in record.get("created") or [] or ["(new)"]]
        for resource, job in dict(named).items():
            if not any(start <= record["t"] <= end and who == record["instance"]
                       for start, end, who in held.get(job, [])):
                found.append(f"{record['action']} on {resource} ({job}) by {record['instance']} "
                             f"at {record['t']:.3f}, which did not hold {job} then")
    return found


def lease_write_violations(ledger: list[dict], jobs: Iterable[str], *,
                           table: str | None = None) -> list[str]:
    """Every write of an experiment's lease item by an instance follows the protocol: a take
    names its writer as the holder, a holder's own update (draining) or release is written
    by that holder; nothing but PutItem writes it. And the sweep's cancel item names its
    writer. Calls without an instance (the operator's, the harness's) are not judged."""
    wanted = set(jobs)
    found = []
    holder: dict[str, str | None] = {}
    for r in sorted(ledger, key=lambda r: r.get("seq", 0)):
        if r.get("service") != "dynamodb" or r.get("checker"):
            continue
        if table is not None and r.get("table") not in (None, table):
            continue
        job = _item_job(r)
        who = r.get("instance")
        action = r.get("action")
        if job is None or not who:
            continue
        sweep_item = job.startswith(SWEEP_ITEM_PREFIX)
        if job not in wanted and not sweep_item:
            continue
        if action in OTHER_WRITES and performed(r):
            found.append(f"{action} on {job}'s lease item by {who} (ledger seq {r.get('seq')}): "
                         "the lease protocol writes with PutItem only")
            continue
        if action != "PutItem" or not performed(r):
            continue
        item = r.get("item") or {}
        if sweep_item:
            if item.get("fleet_cancel_by") != who:
                found.append(f"{who} wrote {job} naming {item.get('fleet_cancel_by')} as the "
                             f"fleet's canceller (ledger seq {r.get('seq')})")
            continue
        new, current = item.get("holder") or None, holder.get(job)
        if new is not None and new != who:
            found.append(f"{who} wrote {job}'s lease naming {new} as its holder (ledger seq "
                         f"{r.get('seq')})")
        elif new is None and current != who:
            found.append(f"{who} let go of {job}'s lease, held by {current} (ledger seq "
                         f"{r.get('seq')})")
        holder[job] = new
    return found

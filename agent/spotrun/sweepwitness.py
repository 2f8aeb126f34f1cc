"""A sweep's claim protocol as the local cloud recorded it (its ledger), never as the agents
say (the soak's witness for sweeps; used by the sweep e2e test, `make demo-sweep`): who held which experiment's lease when (the PutItems on the lease table, with their items),
and which instance changed which experiment's volume when (the mutating EC2 calls)."""
from __future__ import annotations

from typing import Iterable

from spotrun.localcloud.ledger import calls, performed

VOLUME_MUTATIONS = ("AttachVolume", "DetachVolume", "CreateTags", "DeleteVolume", "CreateSnapshot")


def lease_history(ledger: list[dict], jobs: Iterable[str]) -> dict[str, list[dict]]:
    """job -> its lease item's performed writes in order: {t, holder (None when let go),
    finished, by}."""
    wanted = set(jobs)
    history: dict[str, list[dict]] = {job: [] for job in wanted}
    for record in calls(ledger, action="PutItem", service="dynamodb"):
        item = record.get("item") or {}
        if performed(record) and item.get("job") in wanted:
            history[item["job"]].append({"t": record["t"], "holder": item.get("holder"),
                                         "finished": bool(item.get("finished")),
                                         "by": record.get("instance")})
    return history


def violations(ledger: list[dict], volume_jobs: dict[str, str]) -> list[str]:
    """What breaks the protocol: an experiment taken again after it finished, or a volume of
    it changed by an instance that did not hold its lease at that moment (a takeover ends the
    previous holder's time). ``volume_jobs``: volume id -> experiment job id."""
    found = []
    history = lease_history(ledger, set(volume_jobs.values()))
    held: dict[str, list[tuple[float, float, str]]] = {}  # job -> (from, to, holder)
    for job, writes in history.items():
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
    for record in calls(ledger, action=VOLUME_MUTATIONS, service="ec2"):
        if not performed(record) or not record.get("instance"):
            continue
        for volume_id in record.get("resources", []):
            job = volume_jobs.get(volume_id)
            if job is None:
                continue
            if not any(start <= record["t"] <= end and who == record["instance"]
                       for start, end, who in held.get(job, [])):
                found.append(f"{record['action']} on {volume_id} ({job}) by {record['instance']} "
                             f"at {record['t']:.3f}, which did not hold {job} then")
    return found

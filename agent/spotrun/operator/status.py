"""``spotrun status``: the job at a glance from a laptop, read from AWS alone.

Capacity and instances from EC2/Auto Scaling, the agent's phase and progress from the tags
it writes on the job's volume, volumes and snapshots by the job tag, the spot price now,
and an estimated cost against the same hours on demand. A sweep's rows add each experiment's
latest metrics from CloudWatch (curves.latest, one read for all of them).
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import botocore.exceptions
import botocore.parsers

from spotrun import ec2 as ec2mod
from spotrun import heldtime
from spotrun import tags
from spotrun.operator import curves, fleets, pricing
from spotrun.progress import epoch_step
from spotrun.operator.aws import Aws

_ALL_STATES = ("pending", "running", "stopping", "stopped", "shutting-down", "terminated")
# EC2 writes the time in StateTransitionReason as "User initiated (2017-03-22 19:40:37 GMT)";
# moto (and so the local cloud) as "... UTC)"; ISO forms with T, Z or an offset are accepted too.
_TRANSITION_TIME = re.compile(r"(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d)(?:\.\d+)?\s*"
                              r"(GMT|UTC|Z|[+-]\d\d:?\d\d)?(?![\d:])")


def transition_time(reason: str) -> datetime | None:
    match = _TRANSITION_TIME.search(reason or "")
    if not match:
        return None
    stamp = datetime.strptime(f"{match.group(1)} {match.group(2)}", "%Y-%m-%d %H:%M:%S")
    zone = match.group(3) or "UTC"
    if zone in ("GMT", "UTC", "Z"):
        return stamp.replace(tzinfo=timezone.utc)
    sign = 1 if zone[0] == "+" else -1
    digits = zone[1:].replace(":", "")
    offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return stamp.replace(tzinfo=timezone(sign * offset))


def _ended(instance: dict) -> datetime | None:
    if instance["State"]["Name"] not in ("shutting-down", "terminated", "stopped"):
        return None
    return transition_time(instance.get("StateTransitionReason", ""))


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc)
    if isinstance(value, str) and value:
        try:
            stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)
    return None


def agent_view(volume_tags: dict[str, str], now: datetime) -> dict[str, Any]:
    """The agent's phase and progress as it recorded them on the volume."""
    progress: dict[str, Any] = {}
    raw = volume_tags.get(tags.PROGRESS)
    if raw:
        try:
            progress = json.loads(raw)
        except ValueError:
            progress = {"unreadable": raw}
    # The agent writes last_checkpoint_time (the trainer library's key); checkpoint_time is accepted too.
    stamp = (progress.get("checkpoint_time") or progress.get("last_checkpoint_time")) if isinstance(progress, dict) else None
    checkpoint = _parse_time(stamp)
    return {
        "phase": volume_tags.get(tags.PHASE, "unknown (no agent has reported yet)"),
        "progress": progress,
        "checkpoint_age_s": round((now - checkpoint).total_seconds()) if checkpoint else None,
        "interruptions": int(volume_tags.get(tags.INTERRUPTIONS, "0") or 0),
        "completed": volume_tags.get(tags.COMPLETED),
        "failure": volume_tags.get(tags.FAILURE) if volume_tags.get(tags.FAILURE) not in ("", "-") else None,
        "commit": volume_tags.get(tags.COMMIT),
        "last_instance": volume_tags.get(tags.INSTANCE),
    }


def _generation(volume: dict) -> int:
    try:
        return int(tags.as_dict(volume.get("Tags")).get(tags.GENERATION, "0"))
    except ValueError:
        return 0


def gather(aws: Aws, job_id: str, instance_types: list[str] | None = None,
           now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(timezone.utc)
    return _gather_jobs(aws, [job_id], instance_types, now)["views"][job_id]


_LAUNCHED_BY_TAGS = (("ec2-fleet", tags.EC2_FLEET), ("spot-fleet", tags.SPOT_FLEET_REQUEST),
                     ("asg", tags.AUTOSCALING_GROUP))


def _gather_jobs(aws: Aws, job_ids: list[str], instance_types: list[str] | None,
                 now: datetime) -> dict[str, Any]:
    """Each job's view, with every Describe made once for all of them (a sweep's refresh costs
    the same number of calls for 2 experiments as for 100): ``views`` by job id, the jobs'
    ``instances`` by id (each once), ``own_instances`` (job id -> the instances carrying its
    tag) and the ``spot_prices`` the costs used."""
    ec2 = aws.client("ec2")
    capacity = fleets.find_many(aws, job_ids)
    volumes = ec2mod.describe_by_job(ec2, "describe_volumes", "Volumes", job_ids)
    tagged = ec2mod.describe_by_job(ec2, "describe_instances", "Reservations", job_ids,
                              [{"Name": "instance-state-name", "Values": list(_ALL_STATES)}])
    instances = {i["InstanceId"]: i for found in tagged.values() for i in found}
    # Each job's instances: tagged by our launch template, in its fleets, or holding its volume.
    related = {job: {i for c in capacity[job] for i in c.instance_ids}
               | {a["InstanceId"] for v in volumes[job] for a in v.get("Attachments", [])}
               for job in job_ids}
    missing = sorted({i for ids in related.values() for i in ids} - set(instances))
    for inst in fleets.describe_instances(aws, missing):
        instances[inst["InstanceId"]] = inst
    for inst in instances.values():
        inst["_ended"] = _ended(inst)
    mine = {job: {i["InstanceId"] for i in tagged[job]} | (related[job] & set(instances))
            for job in job_ids}
    # The fleets/groups that launched them (AWS's instance tags), each described once.
    known = {(c.kind, c.id): c for caps in capacity.values() for c in caps}
    for cap in fleets.launched_by(aws, list(instances.values()), {i for _, i in known}):
        known.setdefault((cap.kind, cap.id), cap)
    for job in job_ids:
        own = {c.id for c in capacity[job]}
        launchers = {(order, kind, value) for i in mine[job]
                     for order, (kind, key) in enumerate(_LAUNCHED_BY_TAGS)
                     if (value := tags.as_dict(instances[i].get("Tags")).get(key))
                     and (kind, value) in known and value not in own}
        capacity[job] += [known[(kind, value)] for _, kind, value in sorted(launchers)]
    snapshots = ec2mod.describe_by_job(ec2, "describe_snapshots", "Snapshots", job_ids, OwnerIds=["self"])
    types = sorted(set(instance_types or []) | {i["InstanceType"] for i in instances.values()})
    spot_prices = pricing.current_spot_prices(ec2, types)
    views = {job: _view(job, capacity[job], volumes[job], snapshots[job],
                        [instances[i] for i in mine[job]], spot_prices, now) for job in job_ids}
    return {"views": views, "instances": instances, "spot_prices": spot_prices,
            "own_instances": {job: list(found) for job, found in tagged.items()}}


def _view(job_id: str, capacity: list, volumes: list[dict], snapshots: list[dict],
          job_instances: list[dict], spot_prices: dict, now: datetime) -> dict[str, Any]:
    """One job's status from what was described."""
    instances = {i["InstanceId"]: i for i in job_instances}
    data_volumes = [v for v in volumes if tags.as_dict(v.get("Tags")).get(tags.ROLE, "volume") == "volume"]
    newest = max(data_volumes, key=_generation, default=None)
    live = [i for i in instances.values() if i["State"]["Name"] in ("pending", "running")]
    agent = agent_view(tags.as_dict(newest.get("Tags")) if newest else {}, now)
    active = [c for c in capacity if not c.finished]
    finished = [c for c in capacity if c.finished]
    return {
        "job": job_id,
        "time": now.isoformat(timespec="seconds"),
        "agent": agent,
        # A sweep experiment's holders' seconds by type@zone (spotrun.heldtime), for its cost.
        "held_s": heldtime.parse(tags.as_dict(newest.get("Tags")).get(tags.HELD)) if newest else {},
        "capacity": [c.as_dict() for c in active],
        "finished_capacity": [c.as_dict() for c in finished],
        "outcome": outcome(agent, active, finished, live, launched=bool(instances)),
        "instances": [{
            "id": i["InstanceId"], "type": i["InstanceType"],
            "az": i.get("Placement", {}).get("AvailabilityZone"), "state": i["State"]["Name"],
            "lifecycle": i.get("InstanceLifecycle", "on-demand"),
            "launched": i["LaunchTime"].isoformat(timespec="seconds") if i.get("LaunchTime") else None,
            "spot_price_usd_per_hour": spot_prices.get((i["InstanceType"],
                                                        i.get("Placement", {}).get("AvailabilityZone"))),
        } for i in sorted(instances.values(), key=lambda i: i.get("LaunchTime") or now)],
        "volumes": [{"id": v["VolumeId"], "az": v["AvailabilityZone"], "size_gib": v["Size"],
                     "state": v["State"], "generation": _generation(v),
                     "role": tags.as_dict(v.get("Tags")).get(tags.ROLE, "volume"),
                     "attached_to": [a["InstanceId"] for a in v.get("Attachments", [])]} for v in volumes],
        "snapshots": [{"id": s["SnapshotId"], "state": s["State"], "progress": s.get("Progress"),
                       "started": s["StartTime"].isoformat(timespec="seconds"),
                       "role": tags.as_dict(s.get("Tags")).get(tags.ROLE, "")} for s in snapshots],
        "spot_prices_now": [{"type": t, "az": z, "usd_per_hour": p}
                            for (t, z), p in sorted(spot_prices.items())],
        "cost": pricing.estimate(list(instances.values()), spot_prices, now),
        "running": bool(live),
    }


def outcome(agent: dict[str, Any], active: list, finished: list, live: list,
            launched: bool = False) -> str | None:
    """done | failed | cancelled once nothing more will happen to the job, else None.

    Cancelled: no capacity is active and no instance runs, without a completion or failure
    record, after the job was launched: its capacity is listed as finished, or it is gone
    while the job's (terminated) instances remain. A deleted Auto Scaling group vanishes at
    once (on AWS too) and moto forgets a cancelled Spot Fleet request: only their instances
    are left to show the job ever ran. Nothing launched at all is still "not yet"."""
    if agent["completed"] or agent["phase"] == "done":
        return "done"
    if agent["failure"] or agent["phase"] == "failed":
        return "failed"
    if (finished or launched) and not active and not live:
        return "cancelled"
    return None


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds / 3600:.1f}h ago"


def render(view: dict[str, Any]) -> str:
    agent = view["agent"]
    prog = agent["progress"] if isinstance(agent["progress"], dict) else {}
    lines = [f"job            {view['job']}   ({view['time']})",
             f"phase          {agent['phase']}"]
    if prog:
        lines.append(f"progress       {epoch_step(prog) or 'not reported'}; "
                     f"last checkpoint {_age(agent['checkpoint_age_s'])}")
    lines.append(f"interruptions  {agent['interruptions']}")
    if agent["completed"]:
        lines.append(f"completed      {agent['completed']}")
    if agent["failure"]:
        lines.append(f"FAILED         {agent['failure']}")
    if agent["commit"]:
        lines.append(f"code commit    {agent['commit']}")
    if not view["capacity"]:
        lines.append("capacity       none (not launched, cancelled, or finished)")
    for cap in view["capacity"]:
        lines.append(f"capacity       {cap['kind']} {cap['id']}  {cap['state']}  "
                     f"{cap['fulfilled']:g}/{cap['target']} instance(s)")
    for cap in view.get("finished_capacity", []):
        lines.append(f"finished       {cap['kind']} {cap['id']}  {cap['state']}  (runs nothing more)")
    for inst in view["instances"]:
        price = inst["spot_price_usd_per_hour"]
        lines.append(f"instance       {inst['id']}  {inst['type']}  {inst['az']}  {inst['state']}  "
                     f"since {inst['launched']}" + (f"  spot ${price:.4f}/h now" if price is not None else ""))
    for vol in view["volumes"]:
        attached = f" attached to {','.join(vol['attached_to'])}" if vol["attached_to"] else ""
        lines.append(f"volume         {vol['id']}  {vol['size_gib']} GiB  {vol['az']}  {vol['state']}"
                     f"{attached}  (generation {vol['generation']})")
    for snap in view["snapshots"]:
        lines.append(f"snapshot       {snap['id']}  {snap['state']} {snap['progress'] or ''}  "
                     f"{snap['started']}  {snap['role']}")
    cost = view["cost"]
    spot_only = cost.get("spot_only_types", [])
    if cost["on_demand_usd"] and not spot_only:
        lines.append(f"cost (est.)    ${cost['spot_usd']:.2f} at spot vs ${cost['on_demand_usd']:.2f} on demand "
                     f"for {cost['instance_hours']:.2f} instance-hours ({cost['savings_percent']}% saved)")
    elif cost["on_demand_usd"]:
        lines.append(f"cost (est.)    ${cost['spot_usd']:.2f} at spot over {cost['instance_hours']:.2f} "
                     f"instance-hours; of it ${cost['compared_spot_usd']:.2f} vs ${cost['on_demand_usd']:.2f} "
                     f"on demand ({cost['savings_percent']}% saved)")
    else:
        lines.append(f"cost (est.)    ${cost['spot_usd']:.2f} at spot over {cost['instance_hours']:.2f} "
                     "instance-hours")
    if spot_only:
        lines.append(f"               from the spot price history only: no on-demand price known for "
                     f"{', '.join(spot_only)}")
    if cost["unpriced_instance_types"]:
        lines.append(f"               no price for {', '.join(cost['unpriced_instance_types'])}")
    lines.append(f"               estimate: today's spot price x hours; on demand from {cost['on_demand_table']}")
    return "\n".join(lines)


# -- a sweep: one row per experiment (issue 19) ----------------------------------------------

# How a sweep's rows are costed: the fleet's instances carry the sweep's job tag and run one
# experiment after another, and EC2 keeps no record of which instance held which experiment's
# volume when; each holder keeps its time on the volume (spotrun.heldtime), priced here.
SWEEP_COST_NOTE = ("a row's cost: the time its holders kept on its volume (spotrun:held, to "
                   "their last tag write) x today's spot price; the total also counts boots "
                   "and idle time")


def sweep_row(name: str, parameters: dict, view: dict[str, Any],
              cost_usd: float | None = None, latest: dict[str, Any] | None = None,
              metrics_read: bool = True) -> dict[str, Any]:
    """One experiment's line of a sweep's status, from that job's own view. ``cost_usd``: the
    instances that carry the experiment's own job tag (launched as a job of its own), else its
    holders' time kept on its volume, priced; None when neither says anything. ``latest``: its newest point in CloudWatch
    (curves.latest), None when it has published none; ``metrics_read`` False when CloudWatch
    could not be read (then ``metrics`` is None, not {})."""
    agent = view["agent"]
    started = bool(view["volumes"] or view["instances"])
    live = [i for i in view["instances"] if i["state"] in ("pending", "running")]
    return {
        "name": name, "job": view["job"], "parameters": parameters,
        "phase": agent["phase"] if started else "not started",
        "progress": agent["progress"] if isinstance(agent["progress"], dict) else {},
        "instances": [{"id": i["id"], "az": i["az"]} for i in live],
        "interruptions": agent["interruptions"],
        "cost_usd": cost_usd,
        "metrics": (latest or {}).get("metrics", {}) if metrics_read else None,
        "metrics_step": (latest or {}).get("step"),
        "metrics_time": (latest or {}).get("time"),
        "outcome": view["outcome"],
    }


def _brief(exc: Exception) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        text = f"{error.get('Code') or 'error'}: {error.get('Message') or ''}".rstrip(": ")
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= 120 else text[:117] + "..."


def latest_metrics(aws: Aws, job_ids: list[str],
                   now: datetime) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    """Every job's newest CloudWatch point in one read (curves.latest), or None and a note
    naming the error: a report, so CloudWatch being unreachable or refusing never stops it."""
    try:
        return curves.latest(aws.client("cloudwatch"), job_ids, now=now), None
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
            botocore.parsers.ResponseParserError) as exc:
        return None, f"metrics could not be read from CloudWatch ({_brief(exc)}); shown as -"


def sweep_outcome(rows: list[dict[str, Any]]) -> str | None:
    """None while any experiment can still change; then done (all done), failed (any failed)
    or cancelled."""
    outcomes = [row["outcome"] for row in rows]
    if not outcomes or None in outcomes:
        return None
    if all(o == "done" for o in outcomes):
        return "done"
    return "failed" if "failed" in outcomes else "cancelled"


def gather_sweep(aws: Aws, sweep_id: str, experiments: list[tuple[str, str, dict]],
                 instance_types: list[str] | None = None,
                 now: datetime | None = None) -> dict[str, Any]:
    """``experiments``: (name, job id, parameters) in the sweep's order. Each one is looked up
    as the job it is (its volume, instances, capacity by its own job tag), all of them and the
    sweep's own job in one round of Describe calls (split by the job tag afterwards)."""
    now = now or datetime.now(timezone.utc)
    found = _gather_jobs(aws, [sweep_id] + [job for _, job, _ in experiments], instance_types, now)
    views = [found["views"][job_id] for _, job_id, _ in experiments]
    # Each experiment's latest metrics: one CloudWatch read for all of them.
    latest, metrics_note = latest_metrics(aws, [job for _, job, _ in experiments], now)
    rows = []
    for (name, job_id, parameters), view in zip(experiments, views):
        own = found["own_instances"][job_id]
        if own:  # launched as a job of its own: its instances carry its tag
            cost = pricing.estimate(own, found["spot_prices"], now)["spot_usd"]
        elif view["held_s"]:
            cost = round(heldtime.cost(view["held_s"], found["spot_prices"])[0], 2)
        else:
            cost = None
        rows.append(sweep_row(name, parameters, view, cost, (latest or {}).get(job_id),
                              metrics_read=latest is not None))
    if any(row["outcome"] is None for row in rows):
        # An experiment's own lookup knows no capacity of its own (the fleet carries the
        # sweep's id): once the sweep's fleet has ended with nothing running, an experiment not
        # done or failed will never be — cancelled (else `--watch` would wait for ever).
        if found["views"][sweep_id]["outcome"] == "cancelled":
            for row in rows:
                if row["outcome"] is None:
                    row["outcome"] = "cancelled"
    # The total: every instance of the sweep (its fleet's, and any an experiment holds or
    # carries the tag of), each counted once.
    cost = pricing.estimate(list(found["instances"].values()), found["spot_prices"], now)
    return {"sweep": sweep_id, "time": now.isoformat(timespec="seconds"), "experiments": rows,
            "outcome": sweep_outcome(rows), "views": views, "cost": cost,
            "cost_usd": cost["spot_usd"], "cost_note": SWEEP_COST_NOTE,
            "metrics_note": metrics_note}


# The metrics column: at most this many, the preferred ones first, 3 significant digits.
ROW_METRICS = 3
_SHORT = {"accuracy": "acc", "val_accuracy": "val_acc"}


def metrics_text(metrics: dict[str, float] | None) -> str:
    if not metrics:
        return "-"
    return " ".join(f"{_SHORT.get(name, name)} {metrics[name]:.3g}"
                    for name in curves.ordered(list(metrics))[:ROW_METRICS])


def render_sweep(view: dict[str, Any]) -> str:
    rows = view["experiments"]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["outcome"] or row["phase"]] = counts.get(row["outcome"] or row["phase"], 0) + 1
    lines = [f"sweep {view['sweep']}   ({view['time']})   {len(rows)} experiments: "
             + ", ".join(f"{n} {what}" for what, n in sorted(counts.items())),
             f"{'experiment':32} {'phase':12} {'progress':24} {'instance / AZ':34} "
             f"{'interrupted':>11} {'cost':>9}  metrics"]
    for row in rows:
        progress = epoch_step(row["progress"])
        where = ", ".join(f"{i['id']} {i['az']}" for i in row["instances"]) or "-"
        cost = f"${row['cost_usd']:>8.2f}" if row["cost_usd"] is not None else f"{'-':>9}"
        lines.append(f"{row['name'][:32]:32} {(row['outcome'] or row['phase'])[:12]:12} "
                     f"{progress[:24]:24} {where[:34]:34} {row['interruptions']:>11} {cost}  "
                     f"{metrics_text(row.get('metrics'))}")
    cost = view["cost"]
    lines.append(f"cost (est.)    ${cost['spot_usd']:.2f} at spot over {cost['instance_hours']:.2f} "
                 "instance-hours, the whole sweep")
    if cost["unpriced_instance_types"]:
        lines.append(f"               no price for {', '.join(cost['unpriced_instance_types'])}")
    lines.append(f"               {view['cost_note']}")
    if view.get("metrics_note"):
        lines.append(f"metrics        {view['metrics_note']}")
    return "\n".join(lines)

"""``spotrun status``: the job at a glance from a laptop, read from AWS alone.

Capacity and instances from EC2/Auto Scaling, the agent's phase and progress from the tags
it writes on the job's volume, volumes and snapshots by the job tag, the spot price now,
and an estimated cost against the same hours on demand.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from spotrun import tags
from spotrun.operator import fleets, pricing
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
    ec2 = aws.client("ec2")
    capacity = fleets.find(aws, job_id, include_done=True)
    volumes = ec2.describe_volumes(Filters=tags.job_filters(job_id))["Volumes"]
    # The job's instances: tagged by our launch template, in its fleets, or holding its volume.
    related = {i for c in capacity for i in c.instance_ids}
    related |= {a["InstanceId"] for v in volumes for a in v.get("Attachments", [])}
    instances = {i["InstanceId"]: i for i in fleets.job_instances(aws, job_id, _ALL_STATES)}
    for inst in fleets.describe_instances(aws, sorted(i for i in related if i not in instances)):
        instances[inst["InstanceId"]] = inst
    capacity += fleets.launched_by(aws, list(instances.values()), {c.id for c in capacity})
    for inst in instances.values():
        inst["_ended"] = _ended(inst)
    snapshots = ec2.describe_snapshots(OwnerIds=["self"], Filters=tags.job_filters(job_id))["Snapshots"]
    data_volumes = [v for v in volumes if tags.as_dict(v.get("Tags")).get(tags.ROLE, "volume") == "volume"]
    newest = max(data_volumes, key=_generation, default=None)
    types = sorted(set(instance_types or []) | {i["InstanceType"] for i in instances.values()})
    spot_prices = pricing.current_spot_prices(ec2, types)
    live = [i for i in instances.values() if i["State"]["Name"] in ("pending", "running")]
    agent = agent_view(tags.as_dict(newest.get("Tags")) if newest else {}, now)
    active = [c for c in capacity if not c.finished]
    finished = [c for c in capacity if c.finished]
    return {
        "job": job_id,
        "time": now.isoformat(timespec="seconds"),
        "agent": agent,
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
        epoch = f"{prog.get('epoch', '?')}" + (f"/{prog['epochs']}" if prog.get("epochs") else "")
        step = f"{prog.get('step', '?')}" + (f"/{prog['steps_per_epoch']}" if prog.get("steps_per_epoch") else "")
        lines.append(f"progress       epoch {epoch}, step {step}; last checkpoint {_age(agent['checkpoint_age_s'])}")
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

def sweep_row(name: str, parameters: dict, view: dict[str, Any]) -> dict[str, Any]:
    """One experiment's line of a sweep's status, from that job's own view."""
    agent = view["agent"]
    started = bool(view["volumes"] or view["instances"])
    live = [i for i in view["instances"] if i["state"] in ("pending", "running")]
    return {
        "name": name, "job": view["job"], "parameters": parameters,
        "phase": agent["phase"] if started else "not started",
        "progress": agent["progress"] if isinstance(agent["progress"], dict) else {},
        "instances": [{"id": i["id"], "az": i["az"]} for i in live],
        "interruptions": agent["interruptions"],
        "cost_usd": view["cost"]["spot_usd"],
        "outcome": view["outcome"],
    }


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
                 instance_types: list[str] | None = None) -> dict[str, Any]:
    """``experiments``: (name, job id, parameters) in the sweep's order. Each one is looked up
    as the job it is (its volume, instances, capacity by its own job tag)."""
    now = datetime.now(timezone.utc)
    views = [gather(aws, job_id, instance_types, now) for _, job_id, _ in experiments]
    rows = [sweep_row(name, parameters, view)
            for (name, _, parameters), view in zip(experiments, views)]
    if any(row["outcome"] is None for row in rows):
        # An experiment's own lookup knows no capacity of its own (the fleet carries the
        # sweep's id): once the sweep's fleet has ended with nothing running, an experiment not
        # done or failed will never be — cancelled (else `--watch` would wait for ever).
        if gather(aws, sweep_id, instance_types, now)["outcome"] == "cancelled":
            for row in rows:
                if row["outcome"] is None:
                    row["outcome"] = "cancelled"
    return {"sweep": sweep_id, "time": now.isoformat(timespec="seconds"), "experiments": rows,
            "outcome": sweep_outcome(rows), "views": views,
            "cost_usd": round(sum(row["cost_usd"] for row in rows), 4)}


def render_sweep(view: dict[str, Any]) -> str:
    rows = view["experiments"]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["outcome"] or row["phase"]] = counts.get(row["outcome"] or row["phase"], 0) + 1
    lines = [f"sweep {view['sweep']}   ({view['time']})   {len(rows)} experiments: "
             + ", ".join(f"{n} {what}" for what, n in sorted(counts.items())),
             f"{'experiment':32} {'phase':12} {'progress':24} {'instance / AZ':34} "
             f"{'interrupted':>11} {'cost':>9}"]
    for row in rows:
        prog = row["progress"]
        progress = ""
        if prog.get("epoch") is not None:
            progress = f"epoch {prog['epoch']}" + (f"/{prog['epochs']}" if prog.get("epochs") else "")
        if prog.get("step") is not None:
            progress += f"{', ' if progress else ''}step {prog['step']}"
        where = ", ".join(f"{i['id']} {i['az']}" for i in row["instances"]) or "-"
        lines.append(f"{row['name'][:32]:32} {(row['outcome'] or row['phase'])[:12]:12} "
                     f"{progress[:24]:24} {where[:34]:34} {row['interruptions']:>11} "
                     f"${row['cost_usd']:>8.2f}")
    lines.append(f"cost (est.)    ${view['cost_usd']:.2f} at spot, all experiments")
    return "\n".join(lines)

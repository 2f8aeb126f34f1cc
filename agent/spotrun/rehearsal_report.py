"""The rehearsal's report, from the agents' JSON logs and the cloud: what each boot did, what
each interruption cost, and what the job left behind."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from spotrun import tags as T


@dataclass
class InterruptionRecord:
    instance_id: str
    az: str
    at_step: int
    notice_wall: float
    reached_step: int | None = None
    checkpoint_step: int | None = None
    checkpoint_wall: float | None = None
    resumed_from: int | None = None
    drain_s: float | None = None

    @property
    def notice_to_durable_s(self) -> float | None:
        if self.checkpoint_wall is None:
            return None
        return self.checkpoint_wall - self.notice_wall

    @property
    def steps_redone(self) -> int | None:
        if self.reached_step is None or self.resumed_from is None:
            return None
        return max(0, self.reached_step - self.resumed_from)


def read_events(path: Path) -> list[dict]:
    """The JSON events of an agent log (lines shaped `<N>{...}`); other lines are skipped."""
    events = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return events
    for line in text.splitlines():
        if line.startswith("<") and ">" in line[:4]:
            try:
                events.append(json.loads(line[line.index(">") + 1:]))
            except ValueError:
                continue
    return events


def wall_time(iso: str | None) -> float | None:
    from datetime import datetime

    if not iso:
        return None
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def build_report(rehearsal) -> dict:
    """The rehearsal's report: each boot, each interruption (reached, checkpointed, resumed,
    redone) and what the job left behind, from the agents' logs and the cloud."""
    boots = []
    for index, boot in enumerate(rehearsal.boots):
        events = read_events(Path(boot["log"]))
        first = {}
        for event in events:
            first.setdefault(event.get("event"), event)
            if event.get("event") == "phase_changed":
                first.setdefault(f"phase:{event.get('phase')}", event)
        resume = first.get("resume_point", {})
        boot_report = {
            "instance_id": boot["instance_id"], "az": boot["az"],
            "migrated": bool(first.get("volume_ready", {}).get("migrated")),
            "resumed_from_step": resume.get("checkpoint_step"),
            "boot_to_training_s": _delta(boot["boot_wall"], wall_time(first.get("phase:training", {}).get("ts"))),
            "ended": next((e.get("phase") for e in reversed(events)
                           if e.get("event") == "phase_changed"), None),
        }
        boots.append(boot_report)
        for record in rehearsal.interruptions:
            if record.instance_id == boot["instance_id"]:
                drained = first.get("trainer_drained", {})
                record.checkpoint_step = drained.get("checkpoint_step")
                # The progress file is throttled; a checkpoint at step S proves S was reached.
                reached = [s for s in (drained.get("reached_step"), record.checkpoint_step)
                           if isinstance(s, int)]
                record.reached_step = max(reached) if reached else None
                record.checkpoint_wall = drained.get("checkpoint_time")
                record.drain_s = drained.get("seconds")
                if index + 1 < len(rehearsal.boots):
                    nxt = read_events(Path(rehearsal.boots[index + 1]["log"]))
                    record.resumed_from = next((e.get("checkpoint_step") for e in nxt
                                                if e.get("event") == "resume_point"), None)
    ec2 = rehearsal.cloud.moto_client("ec2")
    filters = T.job_filters(rehearsal.plan.job_id)
    volumes = ec2.describe_volumes(Filters=filters)["Volumes"]
    snapshots = ec2.describe_snapshots(Filters=filters, OwnerIds=["self"])["Snapshots"]
    tags = T.as_dict(volumes[0].get("Tags")) if len(volumes) == 1 else {}
    result = {}
    try:
        result = json.loads(tags.get(T.RESULT, "{}"))
    except ValueError:
        pass
    return {
        "job": rehearsal.plan.job_id,
        "interruptions": [{
            "instance_id": r.instance_id, "az": r.az, "notice_at_step": r.at_step,
            "trainer_reached_step": r.reached_step, "checkpoint_step": r.checkpoint_step,
            "resumed_from_step": r.resumed_from, "steps_redone": r.steps_redone,
            "notice_to_durable_checkpoint_s": _round(r.notice_to_durable_s),
            "drain_trainer_s": r.drain_s} for r in rehearsal.interruptions],
        "instances": boots,
        "volumes_left": [{"id": v["VolumeId"], "az": v["AvailabilityZone"], "state": v["State"]}
                         for v in volumes],
        "snapshots_left": [{"id": s["SnapshotId"], "role": T.as_dict(s.get("Tags")).get(T.ROLE)}
                           for s in snapshots],
        "fleet_state": "cancelled" if rehearsal._fleet_cancelled() else "active",
        "completed": tags.get(T.COMPLETED),
        "steps_trained": result.get("global_step", result.get("steps")),
        "final_metrics": result,
        "interruptions_on_volume": tags.get(T.INTERRUPTIONS),
    }


def _delta(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 3)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def format_report(report: dict) -> str:
    lines = [f"spotrun rehearsal — job {report['job']}", ""]
    lines.append("instances:")
    for boot in report["instances"]:
        lines.append(f"  {boot['instance_id']} {boot['az']:<11} migrated={str(boot['migrated']):<5} "
                     f"resumed_from_step={boot['resumed_from_step']} "
                     f"boot→trainer started={boot['boot_to_training_s']} s  ended={boot['ended']}")
    lines.append("interruptions:")
    for r in report["interruptions"]:
        lines.append(f"  {r['instance_id']} notice at step {r['notice_at_step']}: trainer reached "
                     f"{r['trainer_reached_step']}, checkpoint {r['checkpoint_step']}, resumed from "
                     f"{r['resumed_from_step']} → steps redone {r['steps_redone']}; "
                     f"notice→durable checkpoint {r['notice_to_durable_checkpoint_s']} s")
    lines.append(f"volumes left: {', '.join(v['id'] + ' (' + v['az'] + ')' for v in report['volumes_left'])}")
    lines.append(f"snapshots left: {len(report['snapshots_left'])} "
                 f"({', '.join(str(s['role']) for s in report['snapshots_left'])})")
    lines.append(f"fleet: {report['fleet_state']}; completed: {report['completed']}")
    lines.append(f"steps trained: {report['steps_trained']}")
    lines.append(f"final metrics: {json.dumps(report['final_metrics'])}")
    return "\n".join(lines)

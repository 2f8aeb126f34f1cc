"""The rehearsal's report: what each boot did, what each interruption cost, what the job left
behind, the whole timeline, and a verdict on whether a resume really happened.

The resume figures come from evidence the agent does not write: the checkpoints on the volume
images (manifests, and the optimizer's iteration count in the saved model state, read by
rehearsal_volume), the trainer's last progress record there, and the replacement trainer's
own `training_resumed` line. What the agent logged is shown beside them, as its claim.
"""
from __future__ import annotations

import json
import os
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

from spotrun import tags as T
from spotrun.jsonlines import parse_jsonl, read_jsonl
from spotrun.harness.rehearsal_script_report import (ADVICE, cause_of, delta, script_checkpoints,
                                             script_figures, script_summary_lines)


@dataclass
class InterruptionRecord:
    instance_id: str
    az: str
    at_step: int  # the trainer's progress record when the notice was posted (it lags)
    notice_wall: float
    volume_after_drain: dict | None = None  # rehearsal_volume.VolumeState.as_dict()
    volume_read_error: str | None = None
    script_files_after_drain: list[dict] | None = None  # rehearsal_volume.list_script_files
    cause: str = "spot notice"  # or "instance-retirement" (a scheduled maintenance event)


@dataclass
class MissedInterruption:
    target_step: int
    reason: str


@dataclass
class TimelineEntry:
    wall: float
    where: str
    what: str


def read_events(path: Path) -> list[dict]:
    """The JSON events of an agent log (lines shaped `<N>{...}`); other lines are skipped."""
    try:
        return read_jsonl(path, skip_torn_last=False, bad="skip", syslog_prefix=True,
                          errors="replace")
    except OSError:
        return []


class EventLog:
    """An agent log read as it grows: each call parses only what was appended since the last
    (the rehearsal and the soak look for events several times a second, for minutes, in logs
    that grow to thousands of lines). A line is taken once its newline is written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._offset = 0
        self._tail = b""
        self._events: list[dict] = []
        self._lock = threading.Lock()

    def events(self) -> list[dict]:
        with self._lock:
            try:
                with open(self.path, "rb") as log_file:
                    if os.fstat(log_file.fileno()).st_size < self._offset:  # started over
                        self._offset, self._tail, self._events = 0, b"", []
                    log_file.seek(self._offset)
                    chunk = log_file.read()
            except OSError:
                return list(self._events)
            self._offset += len(chunk)
            complete, newline, self._tail = (self._tail + chunk).rpartition(b"\n")
            if newline:
                self._events += parse_jsonl(complete.decode("utf-8", errors="replace") + "\n",
                                            source=str(self.path), bad="skip", syslog_prefix=True)
            return list(self._events)


def wall_time(iso: str | None) -> float | None:
    from datetime import datetime

    if not iso:
        return None
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def trainer_resumed_step(trainer_log: Path) -> int | None:
    """The step the replacement trainer says it restored (spotrun_trainer's `training_resumed`,
    less the steps a `training_resumed_at_epoch_start` replays); None for other trainers."""
    resumed = None
    for event in read_events(trainer_log):
        if event.get("event") == "training_resumed" and isinstance(event.get("global_step"), int):
            resumed = event["global_step"] if resumed is None else resumed
        elif event.get("event") == "training_resumed_at_epoch_start" and resumed is not None:
            resumed -= int(event.get("replayed_steps") or 0)
    return resumed


def _resume_figures(rehearsal, boots: list[dict], final: dict | None) -> tuple[list[dict], int | None]:
    steps_trained = _final_step(final)
    rows = []
    for record in rehearsal.interruptions:
        index = next((i for i, b in enumerate(boots) if b["instance_id"] == record.instance_id), None)
        after = record.volume_after_drain or {}
        checkpoints = after.get("checkpoints") or []
        newest = checkpoints[-1] if checkpoints else {}
        checkpoint_step = newest.get("step")
        reached = [s for s in (after.get("progress_step"), checkpoint_step) if isinstance(s, int)]
        replacement = boots[index + 1] if index is not None and index + 1 < len(boots) else None
        resumed_from, source = None, None
        if replacement is not None:
            resumed_from = trainer_resumed_step(Path(replacement["trainer_log"]))
            source = "trainer" if resumed_from is not None else None
            if resumed_from is None and replacement.get("started_training"):
                resumed_from, source = checkpoint_step, "newest checkpoint on the volume"
        rows.append({
            "instance_id": record.instance_id, "az": record.az, "notice_at_step": record.at_step,
            "cause": record.cause,
            "volume": after.get("volume_id"), "volume_read_error": record.volume_read_error,
            "checkpoint": newest.get("name"), "checkpoint_step": checkpoint_step,
            "checkpoint_epoch": newest.get("epoch"), "checkpoint_step_in_epoch": newest.get("step_in_epoch"),
            "checkpoint_optimizer_iterations": newest.get("iterations"),
            "checkpoint_time": newest.get("time"),
            "trainer_reached_step": max(reached) if reached else None,
            "replacement": replacement["instance_id"] if replacement else None,
            "resumed_from_step": resumed_from, "resumed_from_source": source,
            "notice_to_durable_checkpoint_s": _round(newest["time"] - record.notice_wall)
            if isinstance(newest.get("time"), (int, float)) else None,
        })
    for i, row in enumerate(rows):
        reached, resumed = row["trainer_reached_step"], row["resumed_from_step"]
        row["steps_redone"] = (max(0, reached - resumed)
                               if isinstance(reached, int) and isinstance(resumed, int) else None)
        end = rows[i + 1]["trainer_reached_step"] if i + 1 < len(rows) else steps_trained
        row["replacement_trained_steps"] = (end - resumed if isinstance(end, int)
                                            and isinstance(resumed, int) else None)
    return rows, steps_trained


def _final_step(final: dict | None) -> int | None:
    """The last step trained: the completion record on the final volume, else its newest
    checkpoint (the optimizer's count first, then the manifest)."""
    if not final:
        return None
    step = (final.get("completion") or {}).get("global_step")
    if isinstance(step, int):
        return step
    checkpoints = final.get("checkpoints") or []
    if checkpoints:
        newest = checkpoints[-1]
        return newest.get("iterations") if isinstance(newest.get("iterations"), int) else newest.get("step")
    return None


def verdict(rehearsal, report: dict) -> list[str]:
    """Why this rehearsal does not show what it claims; [] when it does."""
    failures = [f"no interruption landed at step {m.target_step}: {m.reason}" for m in rehearsal.missed]
    if report["fleet_state"] != "cancelled":
        failures.append("the fleet was not cancelled")
    if not report["completed"]:
        failures.append("the job is not recorded as completed on its volume")
    if len(report["volumes_left"]) != 1:
        failures.append(f"{len(report['volumes_left'])} volumes of the job left, not 1")
    trained = report["steps_trained"]
    if rehearsal.plan.interrupt_at_steps and trained is None:
        why = report["final_volume_read_error"] or "no completion record or checkpoint"
        failures.append(f"no final step read from the final volume ({why})")
    for r in report.get("script_interruptions") or []:
        if r["resumed_from_newest"] is False:
            failures.append(
                f"the interruption of {r['instance_id']}: the replacement's first checkpoint is "
                f"{r['replacement_first_checkpoint']} (so it resumed after number "
                f"{r['resumed_after_number']}), but the newest at the stop was "
                f"{r['newest_checkpoint_at_stop']}: {r['numbers_redone']} redone")
    if report.get("script_interruptions"):
        return failures  # the store's figures below do not exist for a script of its own
    for r in report["interruptions"]:
        who = f"the interruption of {r['instance_id']}"
        step = r["checkpoint_step"]
        if step is None:
            why = r["volume_read_error"] or "no checkpoint on it"
            failures.append(f"{who}: no checkpoint read from volume {r['volume']} after the drain ({why})")
            continue
        if isinstance(trained, int) and not (r["notice_at_step"] < step + 1 < trained):
            failures.append(f"{who} did not land mid-training: notice at step {r['notice_at_step']}, "
                            f"checkpoint at step {step}, training ended at step {trained} "
                            f"(wanted notice < checkpoint + 1 < end)")
        if r["replacement_trained_steps"] is None or r["replacement_trained_steps"] <= 0:
            failures.append(f"{who}: the replacement ({r['replacement']}) trained "
                            f"{r['replacement_trained_steps'] or 0} steps after resuming")
        if r["steps_redone"] is None:
            failures.append(f"{who}: no resume point from the replacement's trainer")
        elif r["steps_redone"] > 1:
            failures.append(f"{who}: {r['steps_redone']} steps redone (reached {r['trainer_reached_step']}, "
                            f"resumed from {r['resumed_from_step']}); at most 1 is allowed")
    return failures


def build_report(rehearsal) -> dict:
    boots = []
    timeline = list(rehearsal.timeline)
    for boot in rehearsal.boots:
        events = read_events(Path(boot["log"]))
        first = {}
        for event in events:
            first.setdefault(event.get("event"), event)
            if event.get("event") == "phase_changed":
                first.setdefault(f"phase:{event.get('phase')}", event)
        where = f"{boot['instance_id']} {boot['az']}"
        timeline.append(TimelineEntry(boot["boot_wall"], where, "instance boots; the agent starts"))
        timeline += [TimelineEntry(wall_time(e.get("ts")), where, text) for e, text in
                     ((e, _describe(e)) for e in events) if text and wall_time(e.get("ts"))]
        exits = [e for e in events if e.get("event") == "trainer_exited"]
        boots.append({
            "instance_id": boot["instance_id"], "az": boot["az"],
            "training_wall": wall_time(first.get("phase:training", {}).get("ts")),
            "released_wall": wall_time(first.get("phase:released", {}).get("ts")),
            "trainer_exit": ({"returncode": exits[-1].get("returncode"),
                              "outcome": exits[-1].get("outcome"),
                              "wall": wall_time(exits[-1].get("ts"))} if exits else None),
            "migrated": bool(first.get("volume_ready", {}).get("migrated")),
            "agent_says_resume_from_step": first.get("resume_point", {}).get("checkpoint_step"),
            "boot_to_training_s": delta(boot["boot_wall"],
                                         wall_time(first.get("phase:training", {}).get("ts"))),
            "ended": next((e.get("phase") for e in reversed(events)
                           if e.get("event") == "phase_changed"), None),
            "trainer_log": boot["trainer_log"], "started_training": "phase:training" in first,
        })
    final = rehearsal.final_volume
    interruptions, steps_trained = _resume_figures(rehearsal, boots, final)
    script_mode = any(r.script_files_after_drain is not None for r in rehearsal.interruptions)
    script_rows = script_figures(rehearsal, boots) if script_mode else []
    seen = set()
    for state in [r.volume_after_drain for r in rehearsal.interruptions] + [final]:
        for c in (state or {}).get("checkpoints", []):
            if isinstance(c.get("time"), (int, float)) and (c["sequence"], c["step"]) not in seen:
                seen.add((c["sequence"], c["step"]))
                timeline.append(TimelineEntry(c["time"], f"volume {state['volume_id']}",
                                              f"checkpoint {c['name']} durable at step {c['step']}"))
    ec2 = rehearsal.cloud.moto_client("ec2")
    filters = T.job_filters(rehearsal.plan.job_id)
    volumes = ec2.describe_volumes(Filters=filters)["Volumes"]
    snapshots = ec2.describe_snapshots(Filters=filters, OwnerIds=["self"])["Snapshots"]
    tags = T.as_dict(volumes[0].get("Tags")) if len(volumes) == 1 else {}
    try:
        result = json.loads(tags.get(T.RESULT, "{}"))
    except ValueError:
        result = {}
    start = min((e.wall for e in timeline), default=0.0)
    report = {
        "job": rehearsal.plan.job_id,
        "interruptions": interruptions,
        "missed_interruptions": [m.__dict__ for m in rehearsal.missed],
        "script_interruptions": script_rows,
        "script_checkpoints_final": [{"name": c["name"], "number": c["number"]} for c in
                                     script_checkpoints(getattr(rehearsal, "final_script_files", None))],
        "instances": [{k: v for k, v in b.items()
                       if k not in ("trainer_log", "started_training", "training_wall", "released_wall",
                                    "trainer_exit")}
                      for b in boots],
        "volumes_left": [{"id": v["VolumeId"], "az": v["AvailabilityZone"], "state": v["State"]}
                         for v in volumes],
        "snapshots_left": [{"id": s["SnapshotId"], "role": T.as_dict(s.get("Tags")).get(T.ROLE)}
                           for s in snapshots],
        "fleet_state": "cancelled" if rehearsal._fleet_cancelled() else "active",
        "completed": tags.get(T.COMPLETED),
        "steps_trained": steps_trained,
        "final_volume": final, "final_volume_read_error": rehearsal.final_volume_error,
        "final_metrics": result,
        "interruptions_on_volume": tags.get(T.INTERRUPTIONS),
        "timeline": [{"t_s": round(e.wall - start, 2), "where": e.where, "what": e.what}
                     for e in sorted(timeline, key=lambda e: e.wall)],
    }
    report["failures"] = verdict(rehearsal, report)
    return report


_PHASES = {"acquiring-volume": "looks for the job's volume", "checking-out": "checks out the code",
           "training": "starts the trainer", "draining": "drains: SIGTERM to the trainer",
           "released": "released the volume (checkpoint durable, unmounted)",
           "finishing": "training finished: records completion", "done": "done"}


def _describe(event: dict) -> str | None:
    """One timeline line for the agent events a newcomer should see; None for the rest."""
    name = event.get("event")
    if name == "phase_changed":
        return _PHASES.get(event.get("phase"))
    if name == "volume_ready":
        how = "migrated here" if event.get("migrated") else "created" if event.get("created") else "found"
        return f"volume {event.get('volume_id')} {how}, mounted"
    if name == "resume_point" and event.get("checkpoint_step") is not None:
        return f"agent: the volume's newest checkpoint is at step {event['checkpoint_step']}"
    if name == "rebalance_recommendation":
        return ("agent sees a rebalance recommendation: asks the trainer for a checkpoint (SIGUSR1)"
                if event.get("checkpoint_requested") else "agent sees a rebalance recommendation: "
                "the trainer did not ask for SIGUSR1, so it is left alone")
    if name == "interruption_notice":
        return f"agent sees the spot notice ({event.get('action')} at {event.get('time')})"
    if name == "trainer_exited":
        return f"trainer exits {event.get('returncode')} ({event.get('outcome')})"
    if name == "completion_recorded":
        return "completion recorded on the volume"
    if name == "fleet_cancelled":
        return "agent cancels the Spot Fleet"
    return None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _where_in_epoch(r: dict) -> str:
    epoch, k = r.get("checkpoint_epoch"), r.get("checkpoint_step_in_epoch")
    if not isinstance(epoch, int) or not isinstance(k, int):
        return "position in the epoch unknown"
    return f"{k} steps into epoch {epoch + 1}" if k else f"at the start of epoch {epoch + 1}"


def summary_lines(report: dict) -> list[str]:
    """What happened, in words, for someone who has never seen a spot interruption."""
    if report.get("script_interruptions"):
        return script_summary_lines(report)
    lines = []
    for r in report["interruptions"]:
        if r["checkpoint_step"] is None:
            continue
        lines.append(textwrap.fill(f"The {cause_of(r)} reached {r['instance_id']} ({r['az']}) while "
                                   f"its trainer was "
                     f"at step {r['notice_at_step']} of {report['steps_trained']}. The trainer saved "
                     f"step {r['checkpoint_step']} ({_where_in_epoch(r)}) and stopped; the volume "
                     f"moved to the replacement {r['replacement']}, whose trainer resumed at step "
                     f"{(r['resumed_from_step'] or 0) + 1} and trained the remaining "
                     f"{r['replacement_trained_steps']} steps. Steps redone: {r['steps_redone']}.",
                                   width=100))
    return lines


def format_report(report: dict) -> str:
    lines = [f"spotrun rehearsal — job {report['job']}", ""]
    lines += summary_lines(report)
    lines += ["", "timeline (seconds from the start):"]
    lines += [f"  {e['t_s']:7.2f}  {e['where']:<32} {e['what']}" for e in report["timeline"]]
    lines += ["", "instances:"]
    for boot in report["instances"]:
        lines.append(f"  {boot['instance_id']} {boot['az']:<11} migrated={str(boot['migrated']):<5} "
                     f"boot→trainer started={boot['boot_to_training_s']} s  ended={boot['ended']}")
    script_rows = report.get("script_interruptions") or []
    if script_rows:
        lines.append("interruptions (from the script's own files on the volume images):")
    for r in script_rows:
        lines.append(f"  {r['instance_id']}: trainer ran {r['trainer_ran_s']} s, exit "
                     f"{r['trainer_returncode']} ({r['trainer_outcome']}); newest checkpoint "
                     f"{r['newest_checkpoint_at_stop']} ({r['checkpoint_age_at_stop_s']} s old); "
                     f"training lost {r['training_lost_s']} s"
                     + (f"; torn: {', '.join(r['torn_at_stop'])}" if r["torn_at_stop"] else "")
                     + f"; notice → volume released {r['notice_to_volume_released_s']} s")
        lines.append(f"    replacement {r['replacement']}: first new checkpoint "
                     f"{r['replacement_first_checkpoint']} → resumed after "
                     f"{r['resumed_after_number']}; from the newest: {r['resumed_from_newest']}")
    for rebalance in report.get("rebalances") or []:
        after = rebalance.get("trainer_next_exit") or {}
        fate = ("the trainer died of SIGUSR1 (-10): it has no handler for it"
                if after.get("returncode") == -10 else
                f"the trainer trained on (its next exit: {after.get('returncode')}, {after.get('outcome')})"
                if after else "the trainer trained on")
        lines.append(f"  rebalance recommendation to {rebalance['instance_id']} "
                     f"{rebalance['after_s']:g} s after its trainer started: {fate}")
    if not script_rows:
        lines.append("interruptions (from the checkpoints on the volume images, not the agent's log):")
    for r in report["interruptions"] if not script_rows else []:
        lines.append(f"  {r['instance_id']}: notice at step {r['notice_at_step']} → trainer reached "
                     f"{r['trainer_reached_step']}; checkpoint {r['checkpoint']} at step "
                     f"{r['checkpoint_step']} "
                     f"({_where_in_epoch(r)}; optimizer iterations "
                     f"{r['checkpoint_optimizer_iterations']}) on {r['volume']}, "
                     f"durable {r['notice_to_durable_checkpoint_s']} s after the notice")
        lines.append(f"    replacement {r['replacement']} resumed from step {r['resumed_from_step']} "
                     f"({r['resumed_from_source']}) and trained {r['replacement_trained_steps']} steps; "
                     f"steps redone {r['steps_redone']}")
    for m in report["missed_interruptions"]:
        lines.append(f"  none at step {m['target_step']}: {m['reason']}")
    lines.append(f"volumes left: {', '.join(v['id'] + ' (' + v['az'] + ')' for v in report['volumes_left'])}")
    lines.append(f"snapshots left: {len(report['snapshots_left'])} "
                 f"({', '.join(str(s['role']) for s in report['snapshots_left'])})")
    lines.append(f"fleet: {report['fleet_state']}; completed: {report['completed']}")
    numbered = [c["number"] for c in report.get("script_checkpoints_final") or [] if c["number"] is not None]
    if script_rows or (report["steps_trained"] is None and numbered):
        lines.append(f"the script's checkpoints on the final volume: {len(numbered)}, numbered "
                     f"{min(numbered)}–{max(numbered)}" if numbered else
                     "the script's checkpoints on the final volume: none numbered")
    else:
        lines.append(f"steps trained: {report['steps_trained']} (final volume)")
        lines.append(f"final metrics: {json.dumps(report['final_metrics'])}")
    lines.append("")
    if report["failures"]:
        lines.append("FAILED: this rehearsal does not show a resume:")
        lines += [f"  - {f}" for f in report["failures"]]
    elif not report["interruptions"]:
        lines.append("OK: finished without an interruption (none was asked for or needed).")
    elif script_rows:
        lines.append("OK: interrupted mid-training; each replacement went on from the script's "
                     "newest checkpoint; finished.")
    else:
        lines.append("OK: interrupted mid-training, resumed on the replacement, finished.")
    if script_rows and any(r["training_lost_s"] for r in script_rows):
        lines.append(ADVICE)
    return "\n".join(lines)

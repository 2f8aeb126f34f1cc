"""Figures that need whole instances: boot → training (same AZ / cross AZ) with the agent's own
share, notice → durable checkpoint through the agent process, AWS calls per boot and per drain
(from the local cloud's call ledger), and the idle agent's footprint.

All run the real agent (`python -m spotrun agent run`) on the local spot cloud through
spotrun.rehearsal (a Spot Fleet, metadata over HTTP, loop-device EBS volumes, git checkout, the
trainer as an unprivileged user), with bench/bench_trainer.py as the training code.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from bench import api_calls

HERE = Path(__file__).resolve().parent


def _shared_dir(parent: Path, name: str) -> Path:
    """A directory the unprivileged trainer user can traverse (the rehearsal's trainer is 'nobody')."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
    path.chmod(0o755)
    for p in [parent, *parent.parents]:
        if p == Path("/") or p == Path(tempfile.gettempdir()):
            break
        p.chmod(p.stat().st_mode | 0o011)
    return path


def _repository(where: Path) -> str:
    from spotrun.rehearsal import commit_repository

    return commit_repository(where / "repo", {"train.py": HERE / "bench_trainer.py"},
                             "bench trainer")


def _plan(where: Path, **kw):
    from spotrun.rehearsal import RehearsalPlan

    env = {"STEP_S": "0.02", "STATE_BYTES": "100000"}
    env.update(kw.pop("env", {}))
    return RehearsalPlan(out=where / "run", repository=_repository(where), command=[sys.executable, "train.py"],
                         trainer_env=env, agent_config={"metadata": {"poll_interval_s": 1.0}}, **kw)


def _phase_times(events: list[dict], boot_wall: float) -> dict:
    from spotrun.rehearsal_report import wall_time

    marks = {}
    for event in events:
        if event.get("event") == "phase_changed":
            marks.setdefault(event.get("phase"), wall_time(event.get("ts")))
    keys = ["identifying", "acquiring-volume", "checking-out", "training"]
    out, previous = {}, boot_wall
    for key in keys:
        if marks.get(key) is None:
            return out
        out[f"to_{key}_s"] = round(marks[key] - previous, 3)
        previous = marks[key]
    return out


def modelled_waits(timing, kind: str) -> float:
    """The AWS waits the timing model puts on a boot's path to training (an estimate, by path):
    first boot: create + attach; same AZ: the old volume stays in-use after termination, then
    attach; cross AZ: a volume from the drain's snapshot, then attach."""
    if kind == "first":
        return timing.volume_create_s + timing.attach_s
    if kind == "same-az":
        return timing.detach_after_terminate_s + timing.attach_s
    return timing.volume_create_s + timing.attach_s


def boots(workdir: Path, az_policy: str, interrupt_at: list[int], steps: int, timeout_s: float = 300.0) -> dict:
    """One job with notices at ``interrupt_at``; per boot: kind, boot → training, phases, and the
    AWS calls of its boot and drain windows from the cloud's call ledger (bench/api_calls.py)."""
    from spotrun.localcloud import TimingModel
    from spotrun.rehearsal import Rehearsal
    from spotrun.rehearsal_report import read_events

    where = _shared_dir(workdir, az_policy.replace(":", "-"))
    plan = _plan(where, env={"STEPS": str(steps)}, interrupt_at_steps=interrupt_at, notice_s=8.0,
                 az_policy=az_policy, timeout_s=timeout_s)
    rehearsal = Rehearsal(plan)
    report = rehearsal.run()
    timing = TimingModel.fast()
    ledger = rehearsal.cloud.ledger()  # the cloud's record, still on disk after it stopped
    notices = {record.instance_id: record.notice_wall for record in rehearsal.interruptions}
    out = []
    for index, (boot, summary) in enumerate(zip(rehearsal.boots, report["instances"])):
        if index == 0:
            kind = "first"
        else:
            kind = "cross-az" if summary["migrated"] else "same-az"
        waits = modelled_waits(timing, kind)
        total = summary["boot_to_training_s"]
        events = read_events(Path(boot["log"]))
        windows = {"instance_id": boot["instance_id"], "kind": kind, "boot_wall": boot["boot_wall"],
                   "training_wall": _first_phase(events, "training"),
                   "notice_wall": notices.get(boot["instance_id"]),
                   "released_wall": _first_phase(events, "released")}
        out.append({"kind": kind, "az": summary["az"], "boot_to_training_s": total,
                    "modelled_aws_waits_s": round(waits, 3),
                    "agent_share_s": round(total - waits, 3) if total is not None else None,
                    "phases": _phase_times(events, boot["boot_wall"]),
                    "api_calls": api_calls.instance_calls(ledger, windows)})
    return {"boots": out, "interruptions": report["interruptions"], "completed": bool(report["completed"]),
            "timing_model": "TimingModel.fast()"}


def _first_phase(events: list[dict], phase: str) -> float | None:
    """When the agent entered ``phase`` (its own event: only the window's edge, not a count)."""
    from spotrun.rehearsal_report import wall_time

    return next((wall_time(e.get("ts")) for e in events
                 if e.get("event") == "phase_changed" and e.get("phase") == phase), None)


def idle_footprint(workdir: Path, seconds: float, interval_s: float = 1.0) -> dict:
    """RSS and CPU share of the agent process alone (not its trainer, which only sleeps) while it
    polls metadata every second, sampled with psutil every ``interval_s`` for ``seconds``."""
    import psutil
    from spotrun.rehearsal import Rehearsal

    where = _shared_dir(workdir, "footprint")
    plan = _plan(where, env={"STEP_S": "1.0", "STEPS": "1000000"}, interrupt_at_steps=[],
                 timeout_s=seconds + 120)
    rehearsal = Rehearsal(plan)
    rehearsal.start()
    try:
        deadline = time.monotonic() + 120
        while not rehearsal.boots and time.monotonic() < deadline:
            time.sleep(0.1)  # the fleet boots the instance in its own thread
        if not rehearsal.boots:
            raise TimeoutError("bench footprint: the fleet booted no instance")
        boot = rehearsal.boots[0]
        rehearsal.await_agent_event(boot["instance_id"], "phase_changed", timeout=120, phase="training")
        agent = psutil.Process(boot["process"].pid)
        time.sleep(2.0)  # let the first trainer start and the monitor settle into its rhythm
        rss, cpu_before, wall_before = [], agent.cpu_times(), time.monotonic()
        end = wall_before + seconds
        while time.monotonic() < end:
            rss.append(agent.memory_info().rss / 2**20)
            time.sleep(interval_s)
        cpu_after, wall_after = agent.cpu_times(), time.monotonic()
        used = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
        share = 100.0 * used / (wall_after - wall_before)
        return {"rss_mib": rss, "cpu_percent_of_one_core": share, "seconds": round(wall_after - wall_before, 1),
                "agent_pid": agent.pid, "trainer_excluded": True, "poll_interval_s": 1.0,
                "threads": agent.num_threads(), "phase_during": "training"}
    finally:
        rehearsal.stop()


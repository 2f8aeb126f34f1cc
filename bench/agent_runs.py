"""Figures that need whole instances: boot → training (same AZ / cross AZ) with the agent's own
share, notice → durable checkpoint through the agent process, AWS calls per boot and per drain
(from the local cloud's call ledger), and the idle agent's footprint.

All run the real agent (`python -m spotrun agent run`) on the local spot cloud through
spotrun.harness.rehearsal (a Spot Fleet, metadata over HTTP, loop-device EBS volumes, git checkout, the
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
    from spotrun.harness.rehearsal import commit_repository

    return commit_repository(where / "repo", {"train.py": HERE / "bench_trainer.py"},
                             "bench trainer")


def _plan(where: Path, **kw):
    from spotrun.harness.rehearsal import RehearsalPlan

    env = {"STEP_S": "0.02", "STATE_BYTES": "100000"}
    env.update(kw.pop("env", {}))
    return RehearsalPlan(out=where / "run", repository=_repository(where), command=[sys.executable, "train.py"],
                         trainer_env=env, agent_config={"metadata": {"poll_interval_s": 1.0}}, **kw)


def _phase_times(events: list[dict], boot_wall: float) -> dict:
    from spotrun.harness.rehearsal_report import wall_time

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


def modelled_waits(timing, kind: str, pending_s: float | None = None) -> float:
    """The AWS waits ``timing`` (the model the run's cloud used) puts on a boot's path to
    training (an estimate, by path): first boot: create + attach; same AZ: the old volume's
    detach still under way when the instance boots, then attach; cross AZ: what is left of the
    drain's snapshot when the instance boots, then a volume from it, then attach.
    ``pending_s`` is that leftover (pending_at_boot, from the ledger); without it a same-AZ boot
    is taken to wait the whole in-use-after-terminate time and a cross-AZ one no snapshot."""
    if kind == "first":
        return timing.volume_create_s + timing.attach_s
    if kind == "same-az":
        return (timing.detach_after_terminate_s if pending_s is None else pending_s) + timing.attach_s
    return (pending_s or 0.0) + timing.volume_create_s + timing.attach_s


def pending_at_boot(ledger: list[dict], timing, kind: str, boot_wall: float) -> float | None:
    """Seconds of the previous instance's last AWS operation still to go under ``timing`` when
    this instance booted, by the cloud's ledger: for a cross-AZ boot the drain's snapshot
    (newest CreateSnapshot before the boot + snapshot_s), for a same-AZ boot the drain's
    detach (newest DetachVolume + detach_s; None if the drain never detached: the volume then
    waits out the in-use-after-terminate time). None for a first boot."""
    action, duration = {"cross-az": ("CreateSnapshot", timing.snapshot_s),
                        "same-az": ("DetachVolume", timing.detach_s)}.get(kind, (None, 0.0))
    started = [float(r["t"]) for r in ledger
               if action and r.get("action") == action and not r.get("checker") and not r.get("error")
               and float(r.get("t") or 0.0) <= boot_wall]
    if not started:
        return 0.0 if kind == "cross-az" else None
    return max(0.0, max(started) + duration - boot_wall)


def boots(workdir: Path, az_policy: str, interrupt_at: list[int], steps: int, timeout_s: float = 300.0,
          timing=None, notice_s: float = 8.0) -> dict:
    """One job with notices at ``interrupt_at`` on a local cloud under ``timing`` (a
    TimingModel, default fast); per boot: kind, boot → training, phases, and the AWS calls of
    its boot and drain windows from the cloud's call ledger (bench/api_calls.py). The result's
    ``timing_model`` is read back from the cloud that ran, not from the argument. ``notice_s``
    (notice → termination) must leave the drain its snapshot: EC2's is 120 s, so a slower
    timing model needs a longer notice, or the drain is cut off and the rehearsal waits out its
    timeout for a release that never comes."""
    from spotrun.localcloud import LocalCloud, TimingModel
    from spotrun.harness.rehearsal import Rehearsal
    from spotrun.harness.rehearsal_report import read_events

    where = _shared_dir(workdir, az_policy.replace(":", "-"))
    plan = _plan(where, env={"STEPS": str(steps)}, interrupt_at_steps=interrupt_at, notice_s=notice_s,
                 az_policy=az_policy, timeout_s=timeout_s)
    # The rehearsal would start a fast-model cloud of its own; this one is ours to stop.
    cloud = LocalCloud(Path(plan.out) / "cloud", timing or TimingModel.fast()).start()
    try:
        rehearsal = Rehearsal(plan, cloud=cloud)
        report = rehearsal.run()
    finally:
        cloud.stop()
    ran = cloud.timing
    ledger = cloud.ledger()  # the cloud's record, still on disk after it stopped
    notices = {record.instance_id: record.notice_wall for record in rehearsal.interruptions}
    out = []
    for index, (boot, summary) in enumerate(zip(rehearsal.boots, report["instances"])):
        if index == 0:
            kind = "first"
        else:
            kind = "cross-az" if summary["migrated"] else "same-az"
        pending = pending_at_boot(ledger, ran, kind, boot["boot_wall"])
        waits = modelled_waits(ran, kind, pending)
        total = summary["boot_to_training_s"]
        events = read_events(Path(boot["log"]))
        windows = {"instance_id": boot["instance_id"], "kind": kind, "boot_wall": boot["boot_wall"],
                   "training_wall": _first_phase(events, "training"),
                   "notice_wall": notices.get(boot["instance_id"]),
                   "released_wall": _first_phase(events, "released")}
        out.append({"kind": kind, "az": summary["az"], "boot_to_training_s": total,
                    "modelled_aws_waits_s": round(waits, 3), "aws_op_pending_at_boot_s": None if pending is None else round(pending, 3),
                    "agent_share_s": round(total - waits, 3) if total is not None else None,
                    "phases": _phase_times(events, boot["boot_wall"]),
                    "api_calls": api_calls.instance_calls(ledger, windows)})
    return {"boots": out, "interruptions": report["interruptions"], "completed": bool(report["completed"]),
            "timing_model": timing_config(ran), "notice_s": notice_s}


# -- timing models: every local-cloud figure names the one it ran under -----------------------

def timing_label(timing) -> str:
    """The name a figure carries for ``timing``: "fast timing model", "aws timing model",
    "aws timing model ×0.25" (aws_like().scaled(0.25)) or "instant timing model". A model
    with no such name is refused: a figure must not be measured under a model it cannot name."""
    from spotrun.localcloud import TimingModel

    if timing == TimingModel.fast():
        return "fast timing model"
    if timing == TimingModel.instant():
        return "instant timing model"
    aws = TimingModel.aws_like()
    if timing == aws:
        return "aws timing model"
    factor = round(timing.volume_create_s / aws.volume_create_s, 4)
    if factor > 0 and timing == aws.scaled(factor):
        return f"aws timing model ×{factor:g}"
    raise ValueError(f"timing model {timing!r} has no name (fast, instant, aws or aws scaled)")


def timing_config(timing) -> dict:
    """What a figure's config says of its timing model: its name and every duration (the
    durations are the evidence the name is checked against: check_timing_labels)."""
    import dataclasses

    return {"name": timing_label(timing), "measured_on": "local cloud",
            "durations_s": dataclasses.asdict(timing)}


def check_timing_labels(entries: list[dict]) -> list[str]:
    """Figures whose scheme or config names a timing model other than the one their
    ``config.timing_model.durations_s`` describe, or that name none: one line each."""
    from spotrun.localcloud import TimingModel

    problems = []
    for entry in entries:
        model = entry.get("config", {}).get("timing_model")
        where = f"{entry.get('name')} [{entry.get('scheme')}]"
        if not isinstance(model, dict) or "durations_s" not in model:
            problems.append(f"{where}: no config.timing_model with its durations")
            continue
        try:
            name = timing_label(TimingModel(**model["durations_s"]))
        except (TypeError, ValueError) as exc:
            problems.append(f"{where}: {exc}")
            continue
        if model.get("name") != name:
            problems.append(f"{where}: config names {model.get('name')!r}, its durations are the {name}")
        if not str(entry.get("scheme", "")).endswith(f"{name})"):
            problems.append(f"{where}: the scheme does not end with '{name})'")
    return problems


def figures(runs: list[dict], timing, note: str | None = None) -> list[dict]:
    """The boot figures (boot_to_training, agent_share_of_boot, the whole-agent notice and
    steps redone, API calls per boot and drain) of ``runs`` (boots()'s answers), all measured
    under ``timing``: a run under another model is refused, not relabelled. No runs (a
    --quick skip) gives each figure with ``note`` instead of samples."""
    from bench.figures import figure

    model = timing_config(timing)
    label = model["name"]
    for run in runs:
        if run["timing_model"]["durations_s"] != model["durations_s"]:
            raise ValueError(f"bench boots: a run under the {run['timing_model']['name']} cannot be "
                             f"reported as the {label}")
    boots = [b for run in runs for b in run["boots"]]
    config = {"timing_model": model, "agent": "python -m spotrun agent run, poll 1 s",
              "trainer": "bench/bench_trainer.py (framework-free: trainer start-up not included)",
              "notice_s": runs[0]["notice_s"] if runs else None, "agent_share": "boot → training minus the modelled AWS waits of the "
              "timing model that ran (first: create + attach; same AZ: the drain's detach still "
              "under way at boot, from the ledger's DetachVolume, or the whole in-use-after-terminate "
              "time if it never detached, + attach; cross AZ: the drain's snapshot still pending at "
              "boot, from the ledger's CreateSnapshot, + create + attach)"}
    out = []
    for kind in ("first", "same-az", "cross-az"):
        of_kind = [b for b in boots if b["kind"] == kind]
        missing = note if not runs else None if of_kind else f"n/a: no {kind} boot in this run"
        out.append(figure("boot_to_training", scheme=f"spotrun ({kind}, {label})", unit="s",
                          samples=[b["boot_to_training_s"] for b in of_kind if b["boot_to_training_s"] is not None],
                          config={**config, "phases": [b["phases"] for b in of_kind]}, note=missing))
        out.append(figure("agent_share_of_boot", scheme=f"spotrun ({kind}, {label})", unit="s",
                          samples=[b["agent_share_s"] for b in of_kind if b["agent_share_s"] is not None],
                          config=config, note=missing))
    interruptions = [i for run in runs for i in run["interruptions"]]
    missing = note if not runs else None if interruptions else "n/a: no interruption in this run"
    out.append(figure("notice_to_durable_checkpoint_whole_agent", scheme=f"spotrun (poll 1 s, {label})",
                      unit="s", samples=[i["notice_to_durable_checkpoint_s"] for i in interruptions
                                         if i["notice_to_durable_checkpoint_s"] is not None],
                      config={**config, "what": "the agent process on an instance of the local cloud: "
                              "notice → trainer's checkpoint durable (from the agent's trainer_drained event)"},
                      note=missing))
    out.append(figure("steps_redone_whole_agent", scheme=f"spotrun ({label})", unit="steps redone",
                      samples=[i["steps_redone"] for i in interruptions if i["steps_redone"] is not None],
                      config=config, note=missing))
    return out + api_calls.figures(boots, model, note=note if not runs else None)


def _first_phase(events: list[dict], phase: str) -> float | None:
    """When the agent entered ``phase`` (its own event: only the window's edge, not a count)."""
    from spotrun.harness.rehearsal_report import wall_time

    return next((wall_time(e.get("ts")) for e in events
                 if e.get("event") == "phase_changed" and e.get("phase") == phase), None)


def idle_footprint(workdir: Path, seconds: float, interval_s: float = 1.0) -> dict:
    """RSS and CPU share of the agent process alone (not its trainer, which only sleeps) while it
    polls metadata every second, sampled with psutil every ``interval_s`` for ``seconds``."""
    import psutil
    from spotrun.harness.rehearsal import Rehearsal

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


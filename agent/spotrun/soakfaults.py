"""The soak's fault catalogue: what each kind injects, and when.

Each interruption slot of a soak job has one kind. A kind's ``run`` waits for its moment on
the job's current instance, injects, and returns an :class:`Outcome` saying whether the
instance went away drained (the agent checkpointed and released: steps redone ≤ 1) or
undrained (killed: steps redone ≤ the checkpoint interval). Kinds that act on the *next*
boot (a crash point in the migration, EC2 faults during acquire) have a ``prepare`` that the
driver calls before the previous slot's interruption.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from spotrun.crashpoints import CRASHPOINTS
from spotrun_trainer.store import SAVE_POINTS


@dataclass
class Outcome:
    instance_id: str
    drained: bool
    cause: str                      # work-lost bucket: "drained notice", "instance killed", ...
    observed_step: int | None = None  # progress seen when an undrained kill was injected
    faults: list[str] = dataclasses.field(default_factory=list)  # extra faults injected on the way


@dataclass(frozen=True)
class Kind:
    name: str
    description: str
    run: Callable[[Any, Any], Outcome]
    prepare: Callable[[Any, Any], None] | None = None


# -- helpers on the driver (``job`` is a soak.SoakJob) ------------------------------------------

def _notice_and_drain(job, inst, cause: str, in_seconds: float | None = None,
                      faults: list[str] | None = None,
                      after_notice: Callable[[], None] | None = None) -> Outcome:
    job.before_interruption()
    in_seconds = job.notice_s if in_seconds is None else in_seconds
    job.cloud.interrupt(inst.instance_id, "terminate", in_seconds=in_seconds)
    if after_notice is not None:
        after_notice()
    released = job.await_released_or_gone(inst, timeout=in_seconds + 60)
    if not released:  # the notice's time came first: killed mid-drain, the undrained case
        phase = job.current_phase(inst.instance_id)
        why = "notice ran out mid-drain" if phase in ("draining", "training") else \
            "notice ran out before training"  # the agent acts on notices once training
        return Outcome(inst.instance_id, False, why,
                       observed_step=job.step_of(inst), faults=faults or [])
    # Released: the agent's part is over; the spot service would terminate it at the notice's
    # time, and nothing the agent does changes before then. Terminating now saves soak time.
    job.cloud.terminate(inst.instance_id)
    return Outcome(inst.instance_id, True, cause, faults=faults or [])


def _kill_instance(job, inst, cause: str, faults: list[str] | None = None) -> Outcome:
    step = job.step_of(inst)
    job.before_interruption()
    job.cloud.terminate(inst.instance_id)
    return Outcome(inst.instance_id, False, cause, observed_step=step, faults=faults or [])


def _trained(job, slot):
    return job.await_training_step(slot.at_step)


# -- the kinds --------------------------------------------------------------------------------

def notice(job, slot) -> Outcome:
    return _notice_and_drain(job, _trained(job, slot), "drained notice")


def rebalance_then_notice(job, slot) -> Outcome:
    inst = _trained(job, slot)
    job.cloud.rebalance(inst.instance_id)
    job.await_event(inst.instance_id, "trainer_checkpoint_requested", timeout=30)
    job.pause(slot.rng.uniform(0.2, 1.5))
    return _notice_and_drain(job, inst, "drained notice")


def maintenance(job, slot) -> Outcome:
    inst = _trained(job, slot)
    lead = job.maintenance_lead_s
    job.before_interruption()
    not_before = datetime.now(timezone.utc) + timedelta(seconds=lead + slot.rng.uniform(1.0, 3.0))
    job.cloud.schedule_maintenance(inst.instance_id, code="instance-stop", not_before=not_before,
                                   description="soak: scheduled maintenance")
    job.await_event(inst.instance_id, "phase_changed", phase="released", timeout=lead + 60)
    job.cloud.terminate(inst.instance_id)  # the maintenance itself: the instance goes
    return Outcome(inst.instance_id, True, "drained notice")


def notice_time_past(job, slot) -> Outcome:
    inst = _trained(job, slot)
    past = datetime.now(timezone.utc) - timedelta(seconds=slot.rng.uniform(5, 60))
    job.before_interruption()
    inst.metadata.notice("terminate", past)
    job.cloud.record_event("spot_interruption_notice", instance_id=inst.instance_id,
                           action="terminate", time=past.isoformat(), in_seconds=-1)
    job.await_event(inst.instance_id, "phase_changed", phase="released", timeout=60)
    job.cloud.terminate(inst.instance_id)
    return Outcome(inst.instance_id, True, "drained notice (time past)")


def kill_instance(job, slot) -> Outcome:
    """No notice: the instance vanishes; the replacement boots while the old one still holds
    the volume (a terminated instance's volume stays in-use for a while)."""
    return _kill_instance(job, _trained(job, slot), "instance killed")


def kill_instance_during_drain(job, slot) -> Outcome:
    inst = _trained(job, slot)
    job.before_interruption()
    job.cloud.interrupt(inst.instance_id, "terminate", in_seconds=job.notice_s)
    which = slot.rng.choice(["draining", "trainer_drained"])
    if which == "draining":
        job.await_event(inst.instance_id, "phase_changed", phase="draining", timeout=30)
    else:
        job.await_event(inst.instance_id, "trainer_drained", timeout=30)
    return _kill_instance(job, inst, "instance killed during drain")


def _early_phase_notice(phase: str, label: str):
    def run(job, slot) -> Outcome:
        inst = job.await_current_instance()
        seen = job.await_event_or_training(inst.instance_id, "phase_changed", phase=phase)
        faults = []
        if not seen:  # the phase went by before we looked: an ordinary notice then
            faults.append(f"{label}:missed")
        elif job.current_phase(inst.instance_id) != phase:
            faults.append(f"{label}:late")
        return _notice_and_drain(job, inst, "drained notice", faults=faults)
    return run


notice_during_acquire = _early_phase_notice("acquiring-volume", "acquire")
notice_during_checkout = _early_phase_notice("checking-out", "checkout")


def _signal_pid(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def kill_agent_and_restart(job, slot) -> Outcome:
    """SIGKILL the agent mid-training; systemd (Restart=on-failure) starts it again.

    Under systemd (KillMode=mixed) what is left of the unit, the trainer, is SIGKILLed too;
    half the time the trainer is left running instead, for the agent's leftover-trainer path."""
    inst = _trained(job, slot)
    step = job.step_of(inst)
    proc = job.agent_process(inst.instance_id)
    trainer = job.trainer_pid(inst)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    systemd_like = slot.rng.random() < 0.5
    if systemd_like and trainer is not None:
        _signal_pid(trainer, signal.SIGKILL)
    job.await_agent_restart(inst.instance_id)  # systemd: Restart=on-failure, RestartSec
    job.note_undrained(inst.instance_id, step, "agent killed")
    job.await_training_step(slot.at_step + slot.rng.randint(10, 30))
    return _notice_and_drain(job, inst, "drained notice", faults=[
        "agent_restarted" if systemd_like else "agent_restarted_trainer_orphaned"])


def kill_trainer(job, slot) -> Outcome:
    """SIGKILL the trainer: the agent restarts it with backoff from its last checkpoint."""
    inst = _trained(job, slot)
    pid = job.trainer_pid(inst)
    step = job.step_of(inst)
    if pid is None or not _signal_pid(pid, signal.SIGKILL):
        return _notice_and_drain(job, inst, "drained notice", faults=["kill_trainer:missed"])
    job.await_event(inst.instance_id, "trainer_restart_scheduled", timeout=30)
    job.note_undrained(inst.instance_id, step, "trainer killed")
    job.await_training_step(slot.at_step + slot.rng.randint(10, 30))
    return _notice_and_drain(job, inst, "drained notice")


def corrupt_latest_checkpoint(job, slot) -> Outcome:
    """Flip bytes in the newest checkpoint's state, then kill the trainer: the store must
    skip it (checksum) for the previous one; the running sum proves nothing torn was loaded."""
    inst = _trained(job, slot)
    root = inst.mount_point / "checkpoints" / "spotrun"
    ckpts = sorted(p for p in root.glob("ckpt-*") if (p / "manifest.json").exists())
    pid = job.trainer_pid(inst)
    if len(ckpts) < 2 or pid is None:
        return _notice_and_drain(job, inst, "drained notice", faults=["corrupt:missed"])
    _signal_pid(pid, signal.SIGSTOP)  # hold the trainer still: no save races the corruption
    step = job.step_of(inst)
    target = ckpts[-1] / "state.json"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x5A
    target.write_bytes(bytes(data))
    job.corrupted.append((inst.instance_id, ckpts[-1].name))
    _signal_pid(pid, signal.SIGKILL)
    _signal_pid(pid, signal.SIGCONT)
    job.await_event(inst.instance_id, "trainer_restart_scheduled", timeout=30)
    job.note_undrained(inst.instance_id, step, "corrupt checkpoint", allowance=2)
    job.await_training_step(slot.at_step + slot.rng.randint(10, 30))
    return _notice_and_drain(job, inst, "drained notice")


def _fill(filler: Path) -> None:
    """Allocate all free blocks to ``filler`` (as root: the reserved ones too)."""
    stats = os.statvfs(filler.parent)
    size = stats.f_bfree * stats.f_frsize
    with open(filler, "wb", buffering=0) as fh:  # unbuffered: no ENOSPC left for close()
        while size > 0:
            try:
                os.posix_fallocate(fh.fileno(), 0, size)
                break
            except OSError:
                size -= 256 * 1024  # the extents' own metadata takes some blocks
        chunk = b"\0" * 4096
        try:
            while True:  # the last partial blocks
                fh.write(chunk)
        except OSError:
            pass


def disk_full(job, slot) -> Outcome:
    """Fill the job volume (to the last block an unprivileged writer may use) while training:
    the next save fails with ENOSPC, the previous checkpoint stays, the trainer crashes and
    is restarted; the space comes back (the filler removed) and training resumes."""
    inst = _trained(job, slot)
    mount = inst.mount_point
    if not job.cloud.uses_loop_devices or not os.path.ismount(mount):
        # A directory-backed volume is the host's disk: never fill that.
        return _notice_and_drain(job, inst, "drained notice", faults=["disk_full:missed"])
    step = job.step_of(inst)
    filler = mount / ".soak-filler"
    _fill(filler)
    try:
        job.await_event(inst.instance_id, "trainer_restart_scheduled", timeout=20)
        failed = True
    except TimeoutError:
        failed = False
    finally:
        filler.unlink()
    if failed:
        job.note_undrained(inst.instance_id, step, "disk full")
    job.await_training_step(slot.at_step + slot.rng.randint(10, 30))
    return _notice_and_drain(job, inst, "drained notice",
                             faults=[] if failed else ["disk_full:no_failure"])


# Every point of a save but the last ("saved": the checkpoint is complete by then).
SAVE_HOLD_POINTS = [p for p in SAVE_POINTS if p != "saved"]


def _hold_in_next_save(job, slot, inst):
    """Freeze the trainer inside its next checkpoint save at a random point of the save
    (the counting trainer's ``hold_at``). Returns what it said when it stopped, or None."""
    point = slot.rng.choice(SAVE_HOLD_POINTS)
    where = inst.mount_point / "checkpoints"
    request = where / ".soak-hold"
    request.write_text(point)
    wait_s = job.job_plan.ckpt_every * job.job_plan.step_s * 3 + 15

    def held():
        for marker in where.glob(".soak-held-*"):
            try:
                info = json.loads(marker.read_text())
            except (OSError, ValueError):
                continue  # the trainer is still writing it
            marker.unlink()
            return info
        return None
    try:
        return job.wait(f"the trainer on {inst.instance_id} to stop inside a save at {point}",
                        held, wait_s)
    except TimeoutError:
        request.unlink(missing_ok=True)  # never leave the request for a later trainer
        return None


def notice_during_checkpoint_write(job, slot) -> Outcome:
    """The notice lands while a checkpoint is half written: the trainer, frozen inside the
    save, goes on after a moment with the drain's SIGTERM pending; the save it was in and the
    drain's own save must both be whole, and the next boot resume from the drain's."""
    inst = _trained(job, slot)
    held = _hold_in_next_save(job, slot, inst)
    if held is None:
        return _notice_and_drain(job, inst, "drained notice", faults=["ckpt_write:missed"])

    def release_the_trainer_mid_drain():
        job.await_event(inst.instance_id, "phase_changed", phase="draining", timeout=30)
        job.pause(slot.rng.uniform(0.0, 1.5))
        _signal_pid(held["pid"], signal.SIGCONT)
    return _notice_and_drain(job, inst, "drained notice", faults=[f"ckpt_write:{held['point']}"],
                             after_notice=release_the_trainer_mid_drain)


def kill_during_checkpoint_write(job, slot) -> Outcome:
    """A checkpoint half written when the whole instance dies (no drain), or when the trainer
    alone is SIGKILLed (the agent restarts it): the half save must never be loaded, and
    what is lost is at most the checkpoint interval."""
    inst = _trained(job, slot)
    held = _hold_in_next_save(job, slot, inst)
    if held is None:
        return _notice_and_drain(job, inst, "drained notice", faults=["ckpt_kill:missed"])
    fault = f"ckpt_kill:{held['point']}"
    if slot.rng.random() < 0.5:
        return _kill_instance(job, inst, "instance killed mid-save", faults=[fault])
    step = job.step_of(inst)
    _signal_pid(held["pid"], signal.SIGKILL)
    _signal_pid(held["pid"], signal.SIGCONT)
    job.await_event(inst.instance_id, "trainer_restart_scheduled", timeout=30)
    job.note_undrained(inst.instance_id, step, "trainer killed mid-save")
    job.await_training_step(slot.at_step + slot.rng.randint(10, 30))
    return _notice_and_drain(job, inst, "drained notice", faults=[fault + "/trainer"])


# What an agent that lost the race for the job must never have done.
LOSER_MUST_NOT = ("lease_acquired", "lease_taken_over", "volume_created", "volume_attach_requested",
                  "migration_start", "snapshot_started", "volume_deleted")


def two_replacements(job, slot) -> Outcome:
    """The fleet launches two replacements at once (its target raised to 2 as the instance
    goes, drained or killed): both agents race for the job through the lease; exactly one
    trains, the other waits without touching anything, and the fleet then ends the excess."""
    inst = _trained(job, slot)
    job.fleet.modify_target_capacity(2)
    if slot.rng.random() < 0.5:
        outcome = _notice_and_drain(job, inst, "drained notice")
    else:
        outcome = _kill_instance(job, inst, "instance killed")
    job.gone.append(inst.instance_id)

    def racers():
        booted = {b["instance_id"] for b in job.boots}
        new = [m.instance_id for m in job.fleet.live_members()
               if m.instance_id not in job.gone and m.instance_id in booted]
        return new if len(new) >= 2 else None
    pair = job.wait("two replacements booted", racers, 60)

    def winner():
        training = [i for i in pair if job._matching(i, "phase_changed", 0, {"phase": "training"})]
        return training[0] if training else None
    won = job.wait("one replacement to train", winner, 120)
    job.fleet.modify_target_capacity(1)
    lost = next(i for i in pair if i != won)
    job.gone.append(lost)
    job.cloud.terminate(lost)  # the fleet ends its excess instance
    loser_did = {e.get("event") for e in job.events_of(lost)}
    raced = "lease_wait" in loser_did
    job.race_results.append({"winner": won, "loser": lost, "raced": raced,
                             "touched": sorted(loser_did & set(LOSER_MUST_NOT))})
    outcome.faults.append("two_replacements:raced" if raced else "two_replacements:no_race")
    return outcome


BAD_INPUTS = [
    ("user-data", b"#spotrun-config v1\n[job]\nid = \"unterminated\n", None),
    ("user-data", b"#spotrun-config v1\n[trainer]\nmax_restarts = \"three\"\n", None),
    ("user-data", b"#!/bin/bash\necho not a spotrun stub\n", None),
    ("config", None, {"trainer": {"max_restartz": 1}}),
    ("config", None, {"volume": {"size_gib": -4}}),
]


def bad_input(job, slot) -> Outcome:
    """While the job trains, a second instance boots the agent for the same job with a
    malformed user data or config: it must stop with exit 2 naming the field, and change
    nothing of the job (no volume, snapshot or tag of it created or deleted)."""
    import subprocess
    import sys

    import tomli_w

    inst = _trained(job, slot)
    where, user_data, bad = slot.rng.choice(BAD_INPUTS)
    before = job.job_resources()
    other = job.cloud.launch_instance(az=slot.rng.choice(job.cloud.azs),
                                      user_data=user_data or job.fleet.launch.user_data)
    try:
        config = job._agent_config(other)
        config.update({"job": {"id": job.plan.job_id},
                       "code": {"repository": job.plan.repository}})
        for section, values in (bad or {}).items():
            config.setdefault(section, {}).update(values)
        path = other.root / "agent.toml"
        path.write_text(tomli_w.dumps(config))
        proc = subprocess.run([sys.executable, "-m", "spotrun", "agent", "run", "--config", str(path)],
                              env=other.env(), capture_output=True, text=True, timeout=60)
    finally:
        job.cloud.terminate(other.instance_id)
    after = job.job_resources()
    job.bad_input_results.append({"where": where, "returncode": proc.returncode,
                                  "stderr": proc.stderr[-400:], "changed": before != after})
    return _notice_and_drain(job, inst, "drained notice", faults=[f"bad_input:{where}"])


def _imds_fault_then_notice(kind: str, **options):
    def run(job, slot) -> Outcome:
        inst = _trained(job, slot)
        duration = slot.rng.uniform(2.0, 5.0)
        job.cloud.imds_fault(inst.instance_id, kind, duration_s=duration, **options)
        job.pause(slot.rng.uniform(0.3, duration / 2))
        # The notice lands during the fault; its time leaves a drain's worth after it.
        return _notice_and_drain(job, inst, "drained notice", in_seconds=duration + job.notice_s)
    return run


def prepare_ec2_faults(job, slot) -> None:
    job.set_ec2_faults(throttle=0.08, server_error=0.05,
                       performed_then_5xx={a: 0.2 for a in (
                           "CreateVolume", "AttachVolume", "DetachVolume", "CreateSnapshot",
                           "DeleteVolume", "CreateTags")},
                       seed=slot.rng.randrange(1 << 30))


def ec2_faults_notice(job, slot) -> Outcome:
    """Throttling, 5xx and performed-then-5xx during this boot's acquire/migration and drain."""
    if not job.ec2_faults_on:
        prepare_ec2_faults(job, slot)
    # EC2's retries need the time a real notice (120 s) gives them; 6 s is too short.
    return _notice_and_drain(job, _trained(job, slot), "drained notice", in_seconds=15.0)


def prepare_slow_snapshots(job, slot) -> None:
    job.set_timing(snapshot_s=slot.rng.uniform(3.0, 6.0), volume_create_s=1.5)


def slow_snapshots_notice(job, slot) -> Outcome:
    if not job.slow_timing_on:
        prepare_slow_snapshots(job, slot)
    return _notice_and_drain(job, _trained(job, slot), "drained notice")


MIGRATION_POINTS = [p for p in CRASHPOINTS if p.startswith("migration.")]


def prepare_crash_in_migration(job, slot) -> None:
    job.crash_next_boot = slot.rng.choice(MIGRATION_POINTS)


def crash_in_migration(job, slot) -> Outcome:
    """The replacement's agent is SIGKILLed at a migration step, then restarted (systemd)."""
    inst = job.await_current_instance()
    point = job.crash_armed.get(inst.instance_id)
    faults = []
    if point:
        crashed = job.await_agent_exit_or_training(inst.instance_id)
        if crashed:
            job.await_agent_restart(inst.instance_id)
            faults.append(f"crashpoint:{point}")
        else:
            faults.append("crashpoint:not_reached")
    return _notice_and_drain(job, _trained(job, slot), "drained notice", faults=faults)


CATALOGUE: dict[str, Kind] = {k.name: k for k in [
    Kind("notice", "spot notice at a random training step", notice),
    Kind("rebalance_then_notice", "rebalance recommendation (checkpoint now), then a notice",
         rebalance_then_notice),
    Kind("maintenance", "scheduled maintenance: drain before NotBefore, then the instance goes",
         maintenance),
    Kind("notice_time_past", "a notice whose time is already past", notice_time_past),
    Kind("kill_instance", "whole instance killed, no notice (replacement while the old one "
         "still holds the volume)", kill_instance),
    Kind("kill_instance_during_drain", "notice, then the instance dies mid-drain",
         kill_instance_during_drain),
    Kind("notice_during_acquire", "notice while the replacement acquires/migrates the volume",
         notice_during_acquire),
    Kind("notice_during_checkout", "notice during the code checkout", notice_during_checkout),
    Kind("kill_agent", "agent SIGKILLed mid-training and restarted (systemd), then a notice",
         kill_agent_and_restart),
    Kind("kill_trainer", "trainer SIGKILLed; restarted by the agent; then a notice", kill_trainer),
    Kind("corrupt_checkpoint", "newest checkpoint corrupted, trainer killed; then a notice",
         corrupt_latest_checkpoint),
    Kind("disk_full", "job volume filled while training: saves fail (ENOSPC), trainer restarted; "
         "space freed, then a notice", disk_full),
    Kind("notice_during_checkpoint_write", "notice while the trainer is frozen inside a save "
         "(random point of it); it goes on mid-drain", notice_during_checkpoint_write),
    Kind("kill_during_checkpoint_write", "a save half written when the instance (or the trainer "
         "alone) is killed", kill_during_checkpoint_write),
    Kind("two_replacements", "two replacements at once race for the job (lease); the fleet "
         "ends the excess one", two_replacements),
    Kind("bad_input", "a second agent for the job boots with malformed user data or config",
         bad_input),
    Kind("imds_outage", "metadata refused for seconds; the notice arrives during it",
         _imds_fault_then_notice("refused")),
    Kind("imds_5xx", "metadata answering 500s; the notice arrives during it",
         _imds_fault_then_notice("5xx")),
    Kind("imds_slow", "metadata answers slowly (1.5 s); notice during it",
         _imds_fault_then_notice("slow", delay_s=1.5)),
    Kind("imds_401_storm", "every metadata token refused (401); notice during it",
         _imds_fault_then_notice("401")),
    Kind("imds_malformed", "metadata JSON answers truncated; notice during it",
         _imds_fault_then_notice("malformed")),
    Kind("ec2_faults", "EC2 throttling, 5xx and performed-then-5xx during acquire and drain",
         ec2_faults_notice, prepare_ec2_faults),
    Kind("slow_snapshots", "snapshots pending for seconds, volumes slow to create",
         slow_snapshots_notice, prepare_slow_snapshots),
    Kind("crash_in_migration", "replacement agent SIGKILLed at a migration step, restarted",
         crash_in_migration, prepare_crash_in_migration),
]}


def read_json_lines(path: Path) -> list[dict]:
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def now() -> float:
    return time.time()

"""The soak's fault catalogue: what each kind injects, and when.

Each interruption slot of a soak job has one kind. A kind's ``run`` waits for its moment on
the job's current instance, injects, and returns an :class:`~spotrun.harness.soakinject.Outcome`
saying whether the instance went away drained (the agent checkpointed and released: steps
redone ≤ 1) or undrained (killed: steps redone ≤ the checkpoint interval). Kinds that act on
the *next* boot (a crash point in the migration, EC2 faults during acquire) have a
``prepare`` that the driver calls before the previous slot's interruption.

Here: notices, kills of the instance, agent or trainer, and faults on the checkpoints
(corrupted, disk full, a save interrupted half-way). The rest is in
:mod:`spotrun.harness.soakkinds_cloud`.
"""
from __future__ import annotations

import json
import os
import select
import signal
from datetime import datetime, timedelta, timezone
from pathlib import Path

from spotrun.harness.soakinject import (Kind, Outcome, kill_now, notice_and_drain, signal_pid,
                               train_on_then_notice, trained)
from spotrun.harness.soakkinds_cloud import (bad_input, crash_in_migration, ec2_faults_notice,
                                     imds_fault_then_notice, prepare_crash_in_migration,
                                     prepare_ec2_faults, prepare_slow_snapshots,
                                     slow_snapshots_notice, two_replacements)
from spotrun.harness.soakkinds_races import (holder_lookup_notfound, kill_mid_migration_two_replacements,
                                     prepare_kill_mid_migration, prepare_replacement_during_verify,
                                     prepare_simultaneous_first_boots, replacement_during_drain,
                                     replacement_during_verify, simultaneous_first_boots)
from spotrun.harness.soakkinds_cloud import (attach_incorrect_state, ec2_consistency,  # issue 15
                                     ec2_dropped_connections, ec2_performed_then_fail,
                                     imds_path_slow, prepare_attach_incorrect_state,
                                     prepare_ec2_consistency, prepare_ec2_dropped_connections,
                                     prepare_ec2_performed_then_fail)
from spotrun.harness.soakkinds_maintenance import (maintenance_canceled, maintenance_codes,
                                           maintenance_rescheduled, prepare_fast_maintenance_poll)
from spotrun_trainer.store import SAVE_POINTS


# -- the kinds --------------------------------------------------------------------------------

def notice(job, slot) -> Outcome:
    return notice_and_drain(job, trained(job, slot), "drained notice")


def rebalance_then_notice(job, slot) -> Outcome:
    inst = trained(job, slot)
    job.cloud.rebalance(inst.instance_id)
    job.await_event(inst.instance_id, "trainer_checkpoint_requested", timeout=30)
    job.pause(slot.rng.uniform(0.2, 1.5))
    return notice_and_drain(job, inst, "drained notice")


def maintenance(job, slot) -> Outcome:
    inst = trained(job, slot)
    lead = job.maintenance_lead_s
    job.before_interruption()
    not_before = datetime.now(timezone.utc) + timedelta(seconds=lead + slot.rng.uniform(1.0, 3.0))
    job.cloud.schedule_maintenance(inst.instance_id, code="instance-stop", not_before=not_before,
                                   description="soak: scheduled maintenance")
    job.await_event(inst.instance_id, "phase_changed", phase="released", timeout=lead + 60)
    job.cloud.terminate(inst.instance_id)  # the maintenance itself: the instance goes
    return Outcome(inst.instance_id, True, "drained notice")


def notice_time_past(job, slot) -> Outcome:
    inst = trained(job, slot)
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
    return kill_now(job, trained(job, slot), "instance killed")


def kill_instance_during_drain(job, slot) -> Outcome:
    inst = trained(job, slot)
    job.before_interruption()
    job.cloud.interrupt(inst.instance_id, "terminate", in_seconds=job.notice_s)
    which = slot.rng.choice(["draining", "trainer_drained"])
    if which == "draining":
        job.await_event(inst.instance_id, "phase_changed", phase="draining", timeout=30)
    else:
        job.await_event(inst.instance_id, "trainer_drained", timeout=30)
    return kill_now(job, inst, "instance killed during drain")


def stop_and_start(job, slot) -> Outcome:
    """A notice whose action is stop or hibernate: the agent checkpoints, unmounts and keeps the
    volume attached; the instance stops at the notice's time, EC2 starts it again a little
    later, and the agent, booted anew, resumes on the same volume (≤ 1 step redone). Then an
    ordinary notice."""
    inst = trained(job, slot)
    action = slot.rng.choice(["stop", "hibernate"])
    job.cloud.interrupt(inst.instance_id, action, in_seconds=job.notice_s)
    drained = job.await_event(inst.instance_id, "trainer_drained", timeout=job.notice_s + 30)
    job.await_event(inst.instance_id, "phase_changed", phase="stopped", timeout=30)
    job.wait(f"{inst.instance_id} to stop", lambda: inst.state == "stopped", job.notice_s + 30)
    job.end_boots(inst.instance_id)
    job.pause(slot.rng.uniform(0.2, 2.0))
    job.cloud.client("ec2", faults=False).start_instances(InstanceIds=[inst.instance_id])
    job.wait(f"{inst.instance_id} to run again", lambda: inst.state == "running", 30)
    reached = next((drained.get(k) for k in ("reached_step", "checkpoint_step")
                    if isinstance(drained.get(k), int)), None)
    job.expect_resume_on_same_instance(inst.instance_id, reached, f"drained notice ({action})",
                                       limit=1)
    started = len(job.trainer_starts(inst.instance_id))
    job.boot(job.cloud, inst)
    # The progress on the volume is the stopped trainer's until the new one has started.
    job.wait(f"a trainer on {inst.instance_id} again",
             lambda: len(job.trainer_starts(inst.instance_id)) > started, 60)
    return train_on_then_notice(job, slot, inst, faults=[f"stop:{action}"])


def _early_phase_notice(phase: str, label: str):
    def run(job, slot) -> Outcome:
        inst = job.await_current_instance()
        seen = job.await_event_or_training(inst.instance_id, "phase_changed", phase=phase)
        faults = []
        if not seen:  # the phase went by before we looked: an ordinary notice then
            faults.append(f"{label}:missed")
        elif job.current_phase(inst.instance_id) != phase:
            faults.append(f"{label}:late")
        return notice_and_drain(job, inst, "drained notice", faults=faults)
    return run


notice_during_acquire = _early_phase_notice("acquiring-volume", "acquire")
_racy_notice_during_checkout = _early_phase_notice("checking-out", "checkout")


def prepare_notice_during_checkout(job, slot) -> None:
    job.pause_next_boot = "checkout.started"


def notice_during_checkout(job, slot) -> Outcome:
    """The checkout of a small repository takes ~50 ms, too short to hit from outside
    reliably (two of eleven were late in a long run): the agent, booted with a pause point,
    stops itself as the checkout starts; the notice is posted and the agent goes on."""
    inst = job.await_current_instance()
    if job.pause_armed.pop(inst.instance_id, None) is None:
        return _racy_notice_during_checkout(job, slot)
    pid = job.await_agent_paused(inst.instance_id)
    if pid is None:
        return notice_and_drain(job, inst, "drained notice", faults=["checkout:missed"])
    return notice_and_drain(job, inst, "drained notice", faults=["checkout:paused"],
                            after_notice=lambda: signal_pid(pid, signal.SIGCONT))


def kill_agent_and_restart(job, slot) -> Outcome:
    """SIGKILL the agent mid-training; systemd (Restart=on-failure) starts it again.

    Under systemd (KillMode=mixed) what is left of the unit, the trainer, is SIGKILLed too;
    half the time the trainer is left running instead, for the agent's leftover-trainer path."""
    inst = trained(job, slot)
    step = job.step_of(inst)
    proc = job.agent_process(inst.instance_id)
    trainer = job.trainer_pid(inst)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    systemd_like = slot.rng.random() < 0.5
    if systemd_like and trainer is not None:
        signal_pid(trainer, signal.SIGKILL)
    job.await_agent_restart(inst.instance_id)  # systemd: Restart=on-failure, RestartSec
    job.expect_resume_on_same_instance(inst.instance_id, step, "agent killed")
    return train_on_then_notice(job, slot, inst, faults=[
        "agent_restarted" if systemd_like else "agent_restarted_trainer_orphaned"])


def kill_trainer(job, slot) -> Outcome:
    """SIGKILL the trainer: the agent restarts it with backoff from its last checkpoint."""
    inst = trained(job, slot)
    pid = job.trainer_pid(inst)
    step = job.step_of(inst)
    if pid is None or not signal_pid(pid, signal.SIGKILL):
        return notice_and_drain(job, inst, "drained notice", faults=["kill_trainer:missed"])
    job.expect_trainer_restart(inst.instance_id, step, "trainer killed")
    return train_on_then_notice(job, slot, inst)


def corrupt_latest_checkpoint(job, slot) -> Outcome:
    """Flip bytes in the newest checkpoint's state, then kill the trainer: the store must
    skip it (checksum) for the previous one; the running sum proves nothing torn was loaded."""
    inst = trained(job, slot)
    root = inst.mount_point / "checkpoints" / "spotrun"
    ckpts = sorted(p for p in root.glob("ckpt-*") if (p / "manifest.json").exists())
    pid = job.trainer_pid(inst)
    if len(ckpts) < 2 or pid is None:
        return notice_and_drain(job, inst, "drained notice", faults=["corrupt:missed"])
    signal_pid(pid, signal.SIGSTOP)  # hold the trainer still: no save races the corruption
    step = job.step_of(inst)
    target = ckpts[-1] / "state.json"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x5A
    target.write_bytes(bytes(data))
    job.corrupted.append((inst.instance_id, ckpts[-1].name))
    signal_pid(pid, signal.SIGKILL)
    signal_pid(pid, signal.SIGCONT)
    job.expect_trainer_restart(inst.instance_id, step, "corrupt checkpoint", allowance=2)
    return train_on_then_notice(job, slot, inst)


def _fill(filler: Path) -> None:
    """Allocate all free blocks to ``filler`` (as root: the reserved ones too), in big
    extents first: one allocation of the whole free space fails on the extents' own
    metadata, and shrinking it step by step took seconds on a loaded machine."""
    chunk = 64 * 1024 * 1024
    offset = 0
    with open(filler, "wb", buffering=0) as fh:  # unbuffered: no ENOSPC left for close()
        while chunk >= 4096:
            try:
                os.posix_fallocate(fh.fileno(), offset, chunk)
                offset += chunk
            except OSError:
                chunk //= 8
        fh.seek(offset)
        try:
            while True:  # the last partial blocks
                fh.write(b"\0" * 512)
        except OSError:
            pass


def _await_exit(pid: int | None, timeout: float) -> None:
    """Block until process ``pid`` (not our child) exits, or ``timeout`` passes."""
    if pid is None:
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], timeout)  # a pidfd turns readable when its process exits
    finally:
        os.close(fd)


def disk_full(job, slot) -> Outcome:
    """Fill the job volume (to the last block an unprivileged writer may use) while training:
    the next save fails with ENOSPC, the previous checkpoint stays, the trainer crashes and
    is restarted; the space comes back (the filler removed) and training resumes."""
    inst = trained(job, slot)
    mount = inst.mount_point
    if not job.cloud.uses_loop_devices or not os.path.ismount(mount):
        # A directory-backed volume is the host's disk: never fill that.
        return notice_and_drain(job, inst, "drained notice", faults=["disk_full:missed"])
    step = job.step_of(inst)
    pid = job.trainer_pid(inst)
    filler = mount / ".soak-filler"
    # Held still while the disk fills, so it fails at its next save, not halfway through
    # the filling, with no time left to free the space before its restarts.
    if pid is not None:
        signal_pid(pid, signal.SIGSTOP)
    try:
        _fill(filler)
    finally:
        if pid is not None:
            signal_pid(pid, signal.SIGCONT)
    try:
        # The space must come back before the agent's restart backoff (0.5 s) ends, or every
        # restarted trainer dies on the full disk too and the failure policy gives up: wait on
        # the trainer's exit itself (a kernel event), not on the agent's log, which a loaded
        # machine may leave unread for seconds.
        _await_exit(pid, timeout=20)
    finally:
        filler.unlink()
    try:
        job.await_event(inst.instance_id, "trainer_restart_scheduled", timeout=20)
        failed = True
    except TimeoutError:
        failed = False
    if failed:
        job.expect_resume_on_same_instance(inst.instance_id, step, "disk full")
    return train_on_then_notice(job, slot, inst, faults=[] if failed else ["disk_full:no_failure"])


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
    inst = trained(job, slot)
    held = _hold_in_next_save(job, slot, inst)
    if held is None:
        return notice_and_drain(job, inst, "drained notice", faults=["ckpt_write:missed"])

    def release_the_trainer_mid_drain():
        job.await_event(inst.instance_id, "phase_changed", phase="draining", timeout=30)
        job.pause(slot.rng.uniform(0.0, 1.5))
        signal_pid(held["pid"], signal.SIGCONT)
    return notice_and_drain(job, inst, "drained notice", faults=[f"ckpt_write:{held['point']}"],
                            after_notice=release_the_trainer_mid_drain)


def kill_during_checkpoint_write(job, slot) -> Outcome:
    """A checkpoint half written when the whole instance dies (no drain), or when the trainer
    alone is SIGKILLed (the agent restarts it): the half save must never be loaded, and
    what is lost is at most the checkpoint interval."""
    inst = trained(job, slot)
    held = _hold_in_next_save(job, slot, inst)
    if held is None:
        return notice_and_drain(job, inst, "drained notice", faults=["ckpt_kill:missed"])
    fault = f"ckpt_kill:{held['point']}"
    if slot.rng.random() < 0.5:
        return kill_now(job, inst, "instance killed mid-save", faults=[fault])
    step = job.step_of(inst)
    signal_pid(held["pid"], signal.SIGKILL)
    signal_pid(held["pid"], signal.SIGCONT)
    job.expect_trainer_restart(inst.instance_id, step, "trainer killed mid-save")
    return train_on_then_notice(job, slot, inst, faults=[fault + "/trainer"])


CATALOGUE: dict[str, Kind] = {k.name: k for k in [
    Kind("notice", "spot notice at a random training step", notice),
    Kind("rebalance_then_notice", "rebalance recommendation (checkpoint now), then a notice",
         rebalance_then_notice),
    Kind("maintenance", "scheduled maintenance: drain before NotBefore, then the instance goes",
         maintenance),
    Kind("notice_time_past", "a notice whose time is already past", notice_time_past),
    Kind("stop_and_start", "a stop/hibernate notice: drained, the volume stays attached; the "
         "instance stops, starts again and resumes; then a notice", stop_and_start),
    Kind("kill_instance", "whole instance killed, no notice (replacement while the old one "
         "still holds the volume)", kill_instance),
    Kind("kill_instance_during_drain", "notice, then the instance dies mid-drain",
         kill_instance_during_drain),
    Kind("notice_during_acquire", "notice while the replacement acquires/migrates the volume",
         notice_during_acquire),
    Kind("notice_during_checkout", "notice during the code checkout", notice_during_checkout,
         prepare_notice_during_checkout),
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
         imds_fault_then_notice("refused")),
    Kind("imds_5xx", "metadata answering 500s; the notice arrives during it",
         imds_fault_then_notice("5xx")),
    Kind("imds_slow", "metadata answers slowly (1.5 s); notice during it",
         imds_fault_then_notice("slow", delay_s=1.5)),
    Kind("imds_401_storm", "every metadata token refused (401); notice during it",
         imds_fault_then_notice("401")),
    Kind("imds_malformed", "metadata JSON answers truncated; notice during it",
         imds_fault_then_notice("malformed")),
    Kind("ec2_faults", "EC2 throttling, 5xx and performed-then-5xx during acquire and drain",
         ec2_faults_notice, prepare_ec2_faults),
    Kind("slow_snapshots", "snapshots pending for seconds, volumes slow to create",
         slow_snapshots_notice, prepare_slow_snapshots),
    Kind("crash_in_migration", "replacement agent SIGKILLed at a migration step, restarted",
         crash_in_migration, prepare_crash_in_migration),
    # Races of two agents for one job (issue 21; spotrun.harness.soakkinds_races).
    Kind("holder_lookup_notfound", "a replacement races the live holder while EC2 answers its "
         "lookups of the holder NotFound (transiently)", holder_lookup_notfound),
    Kind("replacement_during_verify", "a replacement boots while the old instance verifies its "
         "migrated copy", replacement_during_verify, prepare_replacement_during_verify),
    Kind("replacement_during_drain", "the fleet's replacement boots while the old instance drains",
         replacement_during_drain),
    Kind("simultaneous_first_boots", "two agents boot at once for a job never started",
         simultaneous_first_boots, prepare_simultaneous_first_boots),
    Kind("kill_mid_migration_two_replacements", "agent SIGKILLed after a migration call, the "
         "instance goes, two replacements start at once", kill_mid_migration_two_replacements,
         prepare_kill_mid_migration),
    # EC2 and metadata as AWS documents them (issue 15; soakkinds_cloud, soakkinds_maintenance).
    Kind("ec2_consistency", "new volumes/snapshots not found (by id and in lists) for seconds "
         "during acquire, migration and drain", ec2_consistency, prepare_ec2_consistency),
    Kind("ec2_performed_then_fail", "every mutating EC2 call may be performed, then answered 500 "
         "or its connection dropped, during migration and drain", ec2_performed_then_fail,
         prepare_ec2_performed_then_fail),
    Kind("ec2_dropped_connections", "EC2 connections dropped without an answer, before or after "
         "the action", ec2_dropped_connections, prepare_ec2_dropped_connections),
    Kind("attach_incorrect_state", "AttachVolume refused IncorrectState though Describe said "
         "available", attach_incorrect_state, prepare_attach_incorrect_state),
    Kind("maintenance_canceled", "a scheduled event armed, then canceled before its drain (no "
         "drain) or after it (volume taken back, training resumes)", maintenance_canceled,
         prepare_fast_maintenance_poll),
    Kind("maintenance_rescheduled", "a scheduled event moved later: the drain moves with it",
         maintenance_rescheduled, prepare_fast_maintenance_poll),
    Kind("maintenance_codes", "a scheduled event of a random code: reboots keep the volume, "
         "system-maintenance needs no drain", maintenance_codes, prepare_fast_maintenance_poll),
    Kind("imds_path_slow", "one metadata path answers in seconds; the notice on instance-action "
         "is acted on at its own pace", imds_path_slow),
]}

"""Soak kinds for scheduled maintenance as AWS changes it (issue 15): an event canceled before
its drain (no drain) or after it (the agent takes the volume back and trains on), an event
rescheduled (the drain moves with it), and every event code (reboot codes keep the volume
attached as a stop does; ``system-maintenance`` needs no drain).

The agent reads scheduled events every ``metadata.maintenance_poll_interval_s`` (5 s by
default): each kind's ``prepare`` sets 1 s for the next boot, so an event's life fits in a
few seconds of training (the job's steps are planned for short slots); on an instance booted
without it the kinds use the 5 s the agent has. A moment that did not land as aimed (the
agent saw the change too late to act on it) is ``:late``, not a violation.
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (Ubuntu 22.04): the vendored tomli
    import tomli as tomllib

from spotrun.localcloud.imdsevents import EVENT_CODES
from spotrun.harness.rehearsal_report import wall_time
from spotrun.harness.soakinject import Outcome, train_on_then_notice, trained
from spotrun.harness.soakkinds_cloud import kind_violation

FAST_POLL_S = 1.0
STOP_CODES = ("instance-stop", "instance-retirement")
REBOOT_CODES = ("instance-reboot", "system-reboot")


def prepare_fast_maintenance_poll(job, slot) -> None:
    job.plan.agent_config.setdefault("metadata", {})["maintenance_poll_interval_s"] = FAST_POLL_S


def _poll_s(inst) -> float:
    try:
        config = tomllib.loads((inst.root / "agent.toml").read_text())
    except (OSError, ValueError):
        return 5.0
    return float(config.get("metadata", {}).get("maintenance_poll_interval_s", 5.0))


def _count(job, instance_id: str, event: str, **match) -> int:
    return sum(1 for e in job.events_of(instance_id) if e.get("event") == event
               and all(e.get(k) == v for k, v in match.items()))


def _await_more(job, instance_id: str, event: str, before: int, timeout: float, **match):
    """The agent's ``before + 1``-th such event, or None if it did not come in time."""
    def more():
        hits = [e for e in job.events_of(instance_id) if e.get("event") == event
                and all(e.get(k) == v for k, v in match.items())]
        return hits[before] if len(hits) > before else None
    try:
        return job.wait(f"{event} {match or ''} from {instance_id}", more, timeout)
    except TimeoutError:
        return None


def _schedule(job, inst, code: str, drain_in: float, description: str | None = None):
    """An event whose drain (NotBefore minus the agent's lead) is ``drain_in`` s away; returns
    (event id, the drain's wall time). NotBefore has whole seconds, as AWS writes it."""
    lead = job.maintenance_lead_s
    not_before = (datetime.now(timezone.utc) + timedelta(seconds=lead + drain_in)).replace(
        microsecond=0)
    event_id = job.cloud.schedule_maintenance(inst.instance_id, code=code, not_before=not_before,
                                              description=description or f"soak: {code}")
    return event_id, not_before.timestamp() - lead


def _until(job, wall: float, what: str) -> None:
    job.wait(what, lambda: time.time() >= wall, max(0.0, wall - time.time()) + 10)


def _drained_step(drained: dict | None) -> int | None:
    return next((drained.get(k) for k in ("reached_step", "checkpoint_step")
                 if isinstance((drained or {}).get(k), int)), None)


def maintenance_canceled(job, slot) -> Outcome:
    """An instance-stop event arms a drain, then is canceled: before its drain time (the job
    must not drain), or after the drain (the agent takes the volume back and trains on)."""
    inst = trained(job, slot)
    iid, poll = inst.instance_id, _poll_s(inst)
    listed = slot.rng.random() < 0.5  # ended events stay listed for a while on some services
    drains = _count(job, iid, "phase_changed", phase="draining")
    if slot.rng.random() < 0.5:
        trainings = _count(job, iid, "phase_changed", phase="training")
        drained_before = _count(job, iid, "trainer_drained")
        event_id, _ = _schedule(job, inst, "instance-stop", poll + 1.5)
        drained = _await_more(job, iid, "trainer_drained", drained_before, poll + 30)
        job.await_event(iid, "phase_changed", phase="released", timeout=30)
        job.expect_resume_on_same_instance(iid, _drained_step(drained),
                                           "maintenance canceled after its drain", limit=1)
        inst.metadata.cancel_maintenance(event_id, listed=listed)
        job.await_event(iid, "maintenance_called_off", timeout=poll + 30)
        job.wait(f"{iid} to train again", lambda: _count(
            job, iid, "phase_changed", phase="training") > trainings, 90)
        return train_on_then_notice(job, slot, inst, faults=["maintenance_canceled:after_drain"])
    armed = _count(job, iid, "maintenance_scheduled")
    event_id, drain_at = _schedule(job, inst, "instance-stop", 2 * poll + 2.0)
    _await_more(job, iid, "maintenance_scheduled", armed, 2 * poll + 5, event_id=event_id)
    late = drain_at - time.time() < poll + 0.5
    inst.metadata.cancel_maintenance(event_id, listed=listed)
    _until(job, drain_at + 1.0, "the canceled event's drain time to pass")
    faults = ["maintenance_canceled:late" if late else "maintenance_canceled:before_drain"]
    if _count(job, iid, "phase_changed", phase="draining") > drains and not late:
        kind_violation(job, f"maintenance_canceled: {iid} drained for event {event_id}, canceled "
                            f"{poll + 0.5:.1f} s or more before its drain time")
    return train_on_then_notice(job, slot, inst, faults=faults)


def maintenance_rescheduled(job, slot) -> Outcome:
    """An instance-stop event armed, then moved later (same EventId, new NotBefore): the drain
    moves with it; the instance goes at the new time."""
    inst = trained(job, slot)
    iid, poll, lead = inst.instance_id, _poll_s(inst), job.maintenance_lead_s
    job.before_interruption()
    armed = _count(job, iid, "maintenance_scheduled")
    event_id, drain_at = _schedule(job, inst, "instance-stop", 2 * poll + 2.0)
    _await_more(job, iid, "maintenance_scheduled", armed, 2 * poll + 5, event_id=event_id)
    new_nb = datetime.fromtimestamp(drain_at + lead + slot.rng.uniform(2.0, 3.0), timezone.utc)
    new_nb = new_nb.replace(microsecond=0)
    late = drain_at - time.time() < poll + 0.5
    inst.metadata.reschedule_maintenance(event_id, new_nb)
    new_drain_at = new_nb.timestamp() - lead
    draining = job.await_event(iid, "phase_changed", phase="draining",
                               timeout=new_drain_at - time.time() + 30)
    started = wall_time(draining.get("ts")) or 0.0
    if started < new_drain_at - 0.5 and not late:
        kind_violation(job, f"maintenance_rescheduled: {iid} drained {new_drain_at - started:.1f} s "
                            f"before the moved event's drain time (event {event_id})")
    job.await_event(iid, "phase_changed", phase="released", timeout=30)
    job.cloud.terminate(iid)  # the maintenance itself, at its new time
    return Outcome(iid, True, "drained notice",
                   faults=["maintenance_rescheduled:late"] if late else [])


def maintenance_codes(job, slot) -> Outcome:
    """A scheduled event of a random code: stop/retirement drain and release; reboots keep the
    volume attached (the instance reboots and the agent resumes on it); system-maintenance
    (network maintenance, the instance keeps running) needs no drain."""
    inst = trained(job, slot)
    iid, poll = inst.instance_id, _poll_s(inst)
    code = slot.rng.choice(EVENT_CODES)
    fault = f"maintenance_codes:{code}"
    drain_in = poll + slot.rng.uniform(1.0, 2.0)
    if code in STOP_CODES:
        job.before_interruption()
        _schedule(job, inst, code, drain_in)
        job.await_event(iid, "phase_changed", phase="released", timeout=drain_in + 60)
        job.cloud.terminate(iid)
        return Outcome(iid, True, "drained notice", faults=[fault])
    if code in REBOOT_CODES:
        return _reboot(job, slot, inst, code, drain_in, fault)
    drains = _count(job, iid, "phase_changed", phase="draining")
    event_id, drain_at = _schedule(job, inst, code, drain_in)
    decided = _await_more(job, iid, "maintenance_no_drain", 0, drain_in + poll + 5,
                          event_id=event_id)
    _until(job, drain_at + 1.0, "the maintenance's time to pass")
    if _count(job, iid, "phase_changed", phase="draining") > drains:
        kind_violation(job, f"maintenance_codes: {iid} drained for {code} (event {event_id}), "
                            "which needs no drain")
    inst.metadata.complete_maintenance(event_id)
    return train_on_then_notice(job, slot, inst, faults=[fault if decided else f"{fault}:missed"])


def _reboot(job, slot, inst, code: str, drain_in: float, fault: str) -> Outcome:
    from spotrun import tags as T

    iid = inst.instance_id
    event_id, _ = _schedule(job, inst, code, drain_in)
    drained = job.await_event(iid, "trainer_drained", timeout=drain_in + 30)
    job.await_event(iid, "phase_changed", phase="stopped", timeout=30)
    ec2 = job.cloud.client("ec2", faults=False)
    attached = ec2.describe_volumes(Filters=T.job_filters(job.plan.job_id) + [
        {"Name": "attachment.instance-id", "Values": [iid]}])["Volumes"]
    if not attached:
        kind_violation(job, f"maintenance_codes: {iid} released the job volume for {code}, "
                            "a reboot that keeps it attached")
    # The reboot: processes and mounts go, the EBS attachments stay; the event completes and
    # the agent boots again on the same instance.
    inst.metadata.complete_maintenance(event_id)
    job.cloud.stop_instance(iid)
    job.end_boots(iid)
    ec2.start_instances(InstanceIds=[iid])
    job.wait(f"{iid} to run again", lambda: inst.state == "running", 30)
    job.expect_resume_on_same_instance(iid, _drained_step(drained), f"maintenance {code}", limit=1)
    started = len(job.trainer_starts(iid))
    job.boot(job.cloud, inst)
    job.wait(f"a trainer on {iid} again", lambda: len(job.trainer_starts(iid)) > started, 60)
    return train_on_then_notice(job, slot, inst, faults=[fault])

"""Soak kinds where two agents meet over one job (issue 21), each aimed at one race:

- ``holder_lookup_notfound``: a replacement races the live holder while EC2 answers its
  lookups of the holder InvalidInstanceID.NotFound (a few times, fewer than the takeover's
  proof needs): it must not take over;
- ``replacement_during_verify``: a replacement boots while the old instance (itself a
  replacement, frozen at its ``migration.verifying`` pause point) still verifies its copy;
- ``replacement_during_drain``: the fleet's replacement boots while the old instance drains;
- ``simultaneous_first_boots``: two agents boot at once for a job never started;
- ``kill_mid_migration_two_replacements``: the agent is SIGKILLed after a migration call, the
  instance goes, and two replacements start at once.

Whether a race landed is read from the cloud's call ledger (the racer asked for the lease
while the other held it); a race that did not land is recorded ``:no_race`` / ``:missed``.
What the racers did is judged by :mod:`spotrun.harness.soakledger`, never from their logs.
"""
from __future__ import annotations

import signal

from spotrun import tags as T
from spotrun.localcloud.ledger import calls
from spotrun.harness.soakinject import Outcome, kill_now, notice_and_drain, signal_pid, trained
from spotrun.harness.soakkinds_cloud import MIGRATION_POINTS
from spotrun.harness.soakledger import contended


def _table(job) -> str | None:
    return job.plan.lease_table or None


def _landed(job, winner: str, loser: str, since: int) -> bool:
    return contended(job.ledger_records(), job.plan.job_id, _table(job), winner, loser, since)


def _launch_racer(job, slot):
    """An instance launched as the fleet's would be (its tags and user data), booted by the
    soak rather than by the fleet, so a fault can be aimed at it before its agent starts."""
    fleet = job.fleet
    tags = {**fleet.launch.tags, T.SPOT_FLEET_REQUEST: fleet.request_id}
    return job.cloud.launch_instance(az=slot.rng.choice(job.cloud.azs),
                                     instance_type=fleet.launch.instance_type, tags=tags,
                                     user_data=fleet.launch.user_data)


def _end(job, instance_id: str) -> None:
    job.gone.append(instance_id)
    job.cloud.terminate(instance_id)


def _await_lease_read(job, holder: str, racer: str, since: int, timeout: float = 60.0) -> bool:
    try:
        job.wait(f"{racer} to ask for the lease {holder} holds",
                 lambda: _landed(job, holder, racer, since), timeout)
        return True
    except TimeoutError:
        return False


def _race_of_two(job, kind: str, since: int) -> tuple[str, str]:
    """Two fleet replacements booted at once: wait for one to train, end the other, lower the
    target again; record the race."""
    def racers():
        booted = {b["instance_id"] for b in job.boots}
        new = [m.instance_id for m in job.fleet.live_members()
               if m.instance_id not in job.gone and m.instance_id in booted]
        return new if len(new) >= 2 else None
    pair = job.wait("two instances booted at once", racers, 60)[:2]

    def winner():
        training = [i for i in pair if job.has_trained(i)]
        return training[0] if training else None
    won = job.wait("one of the two to train", winner, 150)
    job.fleet.modify_target_capacity(1)
    lost = next(i for i in pair if i != won)
    raced = _landed(job, won, lost, since)
    _end(job, lost)  # the fleet's excess instance
    job.race_results.append({"kind": kind, "winner": won, "loser": lost, "raced": raced,
                             "since_seq": since})
    return won, lost


# -- the kinds --------------------------------------------------------------------------------

def holder_lookup_notfound(job, slot) -> Outcome:
    inst = trained(job, slot)
    since = job.ledger_seq()
    racer = _launch_racer(job, slot)
    # Fewer NotFound answers than the takeover's proof needs (lease.takeover_lookups, 5):
    # EC2 catching up, not a holder gone. The racer's lookups only; the holder is running.
    # The racer backs off between lookups (2, 4, ... s): the holder's trainer is held still
    # meanwhile, so the job cannot finish (and hand the lease on) before the race is run.
    lookups = slot.rng.randint(1, 3)
    trainer = job.trainer_pid(inst)
    if trainer is not None:
        signal_pid(trainer, signal.SIGSTOP)
    job.cloud.instance_not_found(inst.instance_id, lookups=lookups,
                                 callers={racer.access_key_id})
    job.boot(job.cloud, racer)

    def looked_up():
        seen = calls(job.ledger_records(), action="DescribeInstances",
                     resource=inst.instance_id, caller_instance=racer.instance_id)
        refused = [r for r in seen if r.get("injected")]
        # Every planted NotFound answered, and the holder seen alive after them.
        return len(refused) >= lookups and len(seen) > len(refused)
    try:
        job.wait(f"{racer.instance_id}'s lookups of {inst.instance_id}", looked_up, 120)
        fooled = True
    except TimeoutError:
        fooled = False
    raced = fooled and _landed(job, inst.instance_id, racer.instance_id, since)
    _end(job, racer.instance_id)
    if trainer is not None:
        signal_pid(trainer, signal.SIGCONT)
    job.race_results.append({"kind": "holder_lookup_notfound", "winner": inst.instance_id,
                             "loser": racer.instance_id, "raced": raced, "since_seq": since,
                             "not_found": lookups})
    return notice_and_drain(job, inst, "drained notice", faults=[
        f"holder_lookup_notfound:{'raced' if raced else 'no_race'}"])


def prepare_replacement_during_verify(job, slot) -> None:
    job.pause_next_boot = "migration.verifying"


def replacement_during_verify(job, slot) -> Outcome:
    inst = job.await_current_instance()
    pid = None
    if job.pause_armed.pop(inst.instance_id, None) is not None:
        pid = job.await_agent_paused(inst.instance_id)
    if pid is None:  # no migration on this boot (or it went past): a plain notice
        return notice_and_drain(job, trained(job, slot), "drained notice",
                                faults=["replacement_during_verify:missed"])
    since = job.ledger_seq()
    racer = _launch_racer(job, slot)
    job.boot(job.cloud, racer)
    raced = _await_lease_read(job, inst.instance_id, racer.instance_id, since)
    signal_pid(pid, signal.SIGCONT)  # the old instance verifies its copy and trains on it
    try:
        inst = trained(job, slot)
    finally:
        _end(job, racer.instance_id)
    job.race_results.append({"kind": "replacement_during_verify", "winner": inst.instance_id,
                             "loser": racer.instance_id, "raced": raced, "since_seq": since})
    return notice_and_drain(job, inst, "drained notice", faults=[
        f"replacement_during_verify:{'raced' if raced else 'no_race'}"])


def replacement_during_drain(job, slot) -> Outcome:
    """The fleet's replacement boots while the old instance drains: it waits for the release
    and takes the job then (no loser here; the ledger's lease check judges it). A drain takes
    a few seconds and an agent's boot as long: the draining agent is held still (a slow
    drain) until the replacement has asked for the lease, so the two do meet."""
    inst = trained(job, slot)
    since = job.ledger_seq()
    found: dict = {}

    def replace_mid_drain():
        job.await_event(inst.instance_id, "phase_changed", phase="draining", timeout=30)
        agent = job.agent_process(inst.instance_id)
        held = agent is not None and signal_pid(agent.pid, signal.SIGSTOP)
        try:
            job.fleet.modify_target_capacity(2)

            def replacement():
                booted = {b["instance_id"] for b in job.boots}
                new = [m.instance_id for m in job.fleet.live_members()
                       if m.instance_id not in job.gone and m.instance_id != inst.instance_id
                       and m.instance_id in booted]
                return new[0] if new else None
            try:
                found["id"] = job.wait("a replacement booted mid-drain", replacement, 30)
            finally:
                job.fleet.modify_target_capacity(1)  # the old one's end launches no third
            found["raced"] = _await_lease_read(job, inst.instance_id, found["id"], since,
                                               timeout=40)
        finally:
            if held:
                signal_pid(agent.pid, signal.SIGCONT)
    # The notice's time leaves room for the held drain (the spot service would not wait).
    outcome = notice_and_drain(job, inst, "drained notice", in_seconds=job.notice_s + 45,
                               after_notice=replace_mid_drain)
    outcome.faults.append(f"replacement_during_drain:{'raced' if found.get('raced') else 'no_race'}")
    return outcome


def prepare_simultaneous_first_boots(job, slot) -> None:
    if job.fleet is None:  # only the job's first boot is a first boot
        job.first_capacity = 2


def simultaneous_first_boots(job, slot) -> Outcome:
    if job.outcomes or job.first_capacity < 2:  # not the job's first slot: nothing to race
        return notice_and_drain(job, trained(job, slot), "drained notice",
                                faults=["simultaneous_first_boots:missed"])
    job.first_capacity = 1
    won, _ = _race_of_two(job, "simultaneous_first_boots", 0)
    raced = job.race_results[-1]["raced"]
    return notice_and_drain(job, trained(job, slot), "drained notice", faults=[
        f"simultaneous_first_boots:{'raced' if raced else 'no_race'}"])


def prepare_kill_mid_migration(job, slot) -> None:
    job.crash_next_boot = slot.rng.choice(MIGRATION_POINTS)


def kill_mid_migration_two_replacements(job, slot) -> Outcome:
    inst = job.await_current_instance()
    point = job.crash_armed.get(inst.instance_id)
    crashed = bool(point) and job.await_agent_exit_or_training(inst.instance_id)
    if crashed:
        job.end_boots(inst.instance_id)  # no systemd restart: the instance goes instead
        faults = [f"kill_mid_migration:{point}"]
    else:
        inst = trained(job, slot)
        faults = ["kill_mid_migration:not_reached"]
    since = job.ledger_seq()
    job.fleet.modify_target_capacity(2)
    outcome = kill_now(job, inst, "instance killed mid-migration" if crashed else "instance killed",
                       faults=faults)
    job.gone.append(inst.instance_id)
    _race_of_two(job, "kill_mid_migration_two_replacements", since)
    outcome.faults.append("kill_mid_migration_two_replacements:"
                          + ("raced" if job.race_results[-1]["raced"] else "no_race"))
    return outcome

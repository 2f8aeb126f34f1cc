"""Soak fault kinds that come from outside the instance: a second agent (malformed input,
or a valid replacement racing for the job), metadata faults, EC2 faults and slow EBS, and a
crash inside the next boot's migration."""
from __future__ import annotations

from spotrun.crashpoints import CRASHPOINTS
from spotrun.soakinject import Outcome, kill_now, notice_and_drain, trained


# What an agent that lost the race for the job must never have done.
LOSER_MUST_NOT = ("lease_acquired", "lease_taken_over", "volume_created", "volume_attach_requested",
                  "migration_start", "snapshot_started", "volume_deleted")


def two_replacements(job, slot) -> Outcome:
    """The fleet launches two replacements at once (its target raised to 2 as the instance
    goes, drained or killed): both agents race for the job through the lease; exactly one
    trains, the other waits without touching anything, and the fleet then ends the excess."""
    inst = trained(job, slot)
    job.fleet.modify_target_capacity(2)
    if slot.rng.random() < 0.5:
        outcome = notice_and_drain(job, inst, "drained notice")
    else:
        outcome = kill_now(job, inst, "instance killed")
    job.gone.append(inst.instance_id)

    def racers():
        booted = {b["instance_id"] for b in job.boots}
        new = [m.instance_id for m in job.fleet.live_members()
               if m.instance_id not in job.gone and m.instance_id in booted]
        return new if len(new) >= 2 else None
    pair = job.wait("two replacements booted", racers, 60)

    def winner():
        training = [i for i in pair if job.has_trained(i)]
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

    inst = trained(job, slot)
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
    return notice_and_drain(job, inst, "drained notice", faults=[f"bad_input:{where}"])


def imds_fault_then_notice(kind: str, **options):
    def run(job, slot) -> Outcome:
        inst = trained(job, slot)
        duration = slot.rng.uniform(2.0, 5.0)
        job.cloud.imds_fault(inst.instance_id, kind, duration_s=duration, **options)
        job.pause(slot.rng.uniform(0.3, duration / 2))
        # The notice lands during the fault; its time leaves a drain's worth after it.
        return notice_and_drain(job, inst, "drained notice", in_seconds=duration + job.notice_s)
    return run


def prepare_ec2_faults(job, slot) -> None:
    job.set_ec2_faults(throttle=0.08, server_error=0.05,
                       performed_then_5xx={a: 0.2 for a in (
                           "CreateVolume", "AttachVolume", "DetachVolume", "CreateSnapshot",
                           "DeleteVolume", "DeleteSnapshot", "CreateTags")},
                       seed=slot.rng.randrange(1 << 30))


def ec2_faults_notice(job, slot) -> Outcome:
    """Throttling, 5xx and performed-then-5xx during this boot's acquire/migration and drain."""
    if not job.ec2_faults_on:
        prepare_ec2_faults(job, slot)
    # EC2's retries need the time a real notice (120 s) gives them; 6 s is too short.
    return notice_and_drain(job, trained(job, slot), "drained notice", in_seconds=15.0)


def prepare_slow_snapshots(job, slot) -> None:
    job.set_timing(snapshot_s=slot.rng.uniform(3.0, 6.0), volume_create_s=1.5)


def slow_snapshots_notice(job, slot) -> Outcome:
    if not job.slow_timing_on:
        prepare_slow_snapshots(job, slot)
    return notice_and_drain(job, trained(job, slot), "drained notice")


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
    return notice_and_drain(job, trained(job, slot), "drained notice", faults=faults)

"""The soak itself: its plans replay exactly, its checker can fail, and the short profile
(real agent, real loop devices, moto, faults from the catalogue) ends with no violation."""
import json
from collections import Counter

import pytest

from spotrun.harness import soak, soakcheck
from spotrun.localcloud import LocalCloud
from spotrun.harness.soakfaults import CATALOGUE

SHORT_SEED = 4  # its 8 slots: disk_full, kill_instance, ec2_faults, crash_in_migration, a notice mid-save, ...
AIMED_SEED = 5  # one job whose three slots are the three kinds of AIMED


def test_the_same_seed_gives_the_same_plan_and_another_seed_another():
    first = [p.describe() for p in soak.plan_jobs("long", 7)]
    assert first == [p.describe() for p in soak.plan_jobs("long", 7)]
    assert first != [p.describe() for p in soak.plan_jobs("long", 8)]
    # Replaying one job: its plan does not depend on how many jobs follow it.
    assert soak.plan_jobs("long", 7, jobs=3)[2].describe() == first[2]


def test_the_long_profile_plans_every_kind_ten_times_and_200_interruptions():
    plans = soak.plan_jobs("long", 1)
    kinds = Counter(s.kind for p in plans if not p.sweep for s in p.slots)
    assert sum(kinds.values()) >= 200
    assert set(kinds) == set(CATALOGUE)
    assert min(kinds.values()) >= 10, kinds
    # ... and sweep jobs among them (issue 19; tests/soak/test_soak_sweeps.py).
    assert {p.slots[0].kind for p in plans if p.sweep} == set(soak.SWEEP_CATALOGUE)


def test_a_kind_that_acts_on_the_next_boot_is_never_a_jobs_first_slot():
    from spotrun.harness.soakplan import FIRST_BOOT_KINDS, NEXT_BOOT_KINDS

    for plan in soak.plan_jobs("long", 3):
        assert plan.slots[0].kind not in NEXT_BOOT_KINDS, plan.describe()
        # ... and a kind about the job's first boot is always its first slot.
        assert all(s.kind not in FIRST_BOOT_KINDS for s in plan.slots[1:]), plan.describe()


def test_the_decoy_check_sees_a_touched_resource(shared_tmp):
    with LocalCloud(shared_tmp / "cloud") as cloud:
        decoy = soakcheck.make_decoy(cloud)
        assert soakcheck.decoy_view(cloud, decoy["volume_id"], decoy["snapshot_id"]) == decoy["view"]
        cloud.client("ec2", faults=False).create_tags(
            Resources=[decoy["snapshot_id"]], Tags=[{"Key": "spotrun:role", "Value": "drain-snapshot"}])
        assert soakcheck.decoy_view(cloud, decoy["volume_id"], decoy["snapshot_id"]) != decoy["view"]


def test_the_summary_names_the_failing_jobs_seed_for_replay():
    result = {"index": 4, "job": "soak-9-4", "completed": False, "interruptions": [], "kinds": {},
              "extra_faults": {}, "missed": [], "lost": {}, "violations": ["inv1 one copy: 2 volumes"]}
    summary = soakcheck.summarize([result], profile="long", seed=9, seconds=1.0)
    table = soakcheck.format_summary(summary)
    assert summary["violations"] == 1
    assert "spotrun soak --profile long --seed 9 --only-job 4" in table
    assert "inv1 one copy" in table


def test_the_race_check_fails_when_the_agent_that_lost_acted_on_the_job():
    """Judged from the cloud's call ledger, not the loser's log (tests/soak/test_soakledger.py
    has one planted ledger per invariant)."""
    def record(seq, action, instance, **fields):
        return {"seq": seq, "service": fields.pop("service", "ec2"), "action": action,
                "instance": instance, "resources": [], "tags": {}, "created": [],
                "status": 200, "error": None, "injected": None, "checker": False, **fields}
    ledger = [record(1, "PutItem", "i-1", service="dynamodb", table="t",
                     item={"job": "j", "holder": "i-1", "generation": "1"}),
              record(2, "CreateVolume", "i-1", tags={"spotrun:job": "j"}, created=["vol-1"]),
              record(3, "GetItem", "i-2", service="dynamodb", table="t", key={"job": "j"})]
    fair = {"winner": "i-1", "loser": "i-2"}
    assert soakcheck.race_violations([dict(fair)], ledger, "j", "t") == []
    ledger.append(record(4, "CreateSnapshot", "i-2", resources=["vol-1"], created=["snap-1"]))
    [violation] = soakcheck.race_violations([dict(fair)], ledger, "j", "t")
    assert "i-2" in violation and "CreateSnapshot" in violation


AIMED = ["notice_during_checkpoint_write", "kill_during_checkpoint_write", "two_replacements"]


@pytest.mark.slow
@pytest.mark.loopdev
def test_faults_aimed_inside_a_save_and_a_race_of_two_replacements_hit_and_lose_nothing(shared_tmp):
    plan = soak.plan_jobs("short", AIMED_SEED, jobs=1, kinds=AIMED)[0]
    assert sorted(s.kind for s in plan.slots) == sorted(AIMED) and plan.lease
    lines = []
    summary = soak.run_soak("short", AIMED_SEED, shared_tmp / "soak", jobs=1, kinds=AIMED,
                            echo=lines.append)
    table = soakcheck.format_summary(summary)
    assert summary["violations"] == 0, table + "\n" + "\n".join(lines)
    assert summary["kinds"] == {kind: 1 for kind in AIMED}, table  # no moment missed
    assert summary["extra_faults"].get("two_replacements:raced") == 1, table
    [job] = json.loads((shared_tmp / "soak" / "results.json").read_text())["jobs"]
    [race] = job["races"]
    assert race["raced"] and race["touched"] == [] and race["winner"] != race["loser"]


@pytest.mark.slow
@pytest.mark.loopdev
def test_short_profile_runs_every_job_through_its_faults_with_no_violation(shared_tmp):
    lines = []
    summary = soak.run_soak("short", SHORT_SEED, shared_tmp / "soak", echo=lines.append)
    table = soakcheck.format_summary(summary)
    assert summary["violations"] == 0, table + "\n" + "\n".join(lines)
    assert summary["jobs"] == summary["completed"] == soak.PROFILES["short"]["jobs"]
    assert summary["interruptions"] >= 6
    assert "invariant violations 0" in table


@pytest.mark.slow
@pytest.mark.loopdev
def test_a_stopped_soak_leaves_no_loop_device_mount_or_process_behind(shared_tmp):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = shared_tmp / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "spotrun", "soak", "--profile", "short",
                             "--jobs", "1", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((out / "cloud" / "instances").glob("*/dltraining/checkpoints")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)  # another process's files: nothing to block on
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped" in err
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(out) not in loops
    assert str(out) not in open("/proc/mounts").read()
    leftover = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout
    assert leftover.strip() == "", leftover
    assert os.path.exists(out / "plan.json")


class _Boots:
    """The part of a soak job the resume lookup reads: boots in order, trainer starts each."""

    def __init__(self, starts: dict):
        self.boots = [{"instance_id": i} for i in starts]
        self._starts = starts

    def trainer_starts(self, instance_id):
        return self._starts[instance_id]


def test_an_interruption_inside_an_instance_is_measured_at_the_next_resume_wherever_it_is():
    """Found by the long soak (seed 1, job 1): an instance stopped and started again; the
    notice that ended it came before its new trainer had logged its start, so the next
    resume was on the next instance, and the checker reported "no resume observed"."""
    note = {"instance_id": "i-a", "starts_before": 1}
    started_again = _Boots({"i-a": [{"resume_step": 0}, {"resume_step": 105}],
                            "i-b": [{"resume_step": 110}]})
    assert soakcheck.resumed_after(started_again, note) == 105
    never_started_again = _Boots({"i-a": [{"resume_step": 0}], "i-b": [{"resume_step": 105}]})
    assert soakcheck.resumed_after(never_started_again, note) == 105
    job_ended = _Boots({"i-a": [{"resume_step": 0}]})
    assert soakcheck.resumed_after(job_ended, note) is None


class _Finished(_Boots):
    def __init__(self, starts: dict, events: dict):
        super().__init__(starts)
        self._events = events

    def events_of(self, instance_id):
        return self._events.get(instance_id, [])


def test_a_fault_that_lands_after_the_job_finished_on_that_instance_costs_nothing_and_is_missed():
    """Found by the long soak (seed 1, job 63): the last slot's metadata outage and notice
    came after the trainer had finished on that instance; the job completed there (exact
    sum), and the checker, looking for a resume on a next instance, reported "no resume"."""
    job = _Finished({"i-a": [{"resume_step": 222}]},
                    {"i-a": [{"event": "resume_point", "checkpoint_step": 222},
                             {"event": "completion_recorded"}]})
    assert soakcheck.finished_on(job, "i-a")
    assert not soakcheck.finished_on(job, "i-b")
    assert soakcheck.is_off_moment("imds_outage:after_completion")
    assert not soakcheck.is_off_moment("two_replacements:raced")


def test_slots_the_job_finished_before_are_missed_moments_not_violations():
    # Long soak seed 7, job 91: a busy harness let the winner of a race train to the end
    # before the next slot; the job was right, the soak called it "could not drive the job".
    missed, violations = soakcheck.unreached_slots(["maintenance_rescheduled", "crash_in_migration"],
                                                   completed=True)
    assert violations == []
    assert missed == ["maintenance_rescheduled/maintenance_rescheduled:after_completion",
                      "crash_in_migration/crash_in_migration:after_completion"]
    assert all(soakcheck.is_off_moment(m.split("/", 1)[1]) for m in missed)
    # Cancelled before its slots and not complete: the fleet went for nothing.
    _, violations = soakcheck.unreached_slots(["crash_in_migration"], completed=False)
    assert violations and "crash_in_migration" in violations[0]
    assert soakcheck.unreached_slots([], completed=False) == ([], [])

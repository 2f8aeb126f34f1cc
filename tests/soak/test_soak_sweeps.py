"""The soak's sweep kinds (issue 19): their plans, each check failing on a fault planted in a
ledger or on a volume, and the three kinds run once each on the local cloud with no violation.

The ledgers here are written by hand as the cloud writes them (spotrun.localcloud.ledger):
two instances, two experiments; the protocol followed is no violation, and each planted break
is named by the check that owns it."""
import json
from collections import Counter

import pytest

from spotrun.harness import soak, soakcheck, soakplan, soaksweep
from spotrun.harness.soakfaults import CATALOGUE
from spotrun.harness.soakkinds_sweep import SWEEP_CATALOGUE, cancel_race, claim_windows, overlapping
from spotrun.harness.sweepwitness import lease_write_violations, resource_jobs, violations

SWEEP = "sw"
JOBS = {"sw-e0": 3, "sw-e1": 4}
FLEET = "sfr-0123456789abcdef0"
SWEEP_SEED = 1  # its three jobs: one of each sweep kind (the interruption: a notice)


# -- ledgers by hand --------------------------------------------------------------------------

def rec(t, action, by, service="ec2", **fields):
    return {"seq": int(t * 100), "t": float(t), "service": service, "action": action,
            "instance": by, "resources": fields.pop("resources", []), "tags": fields.pop("tags", {}),
            "created": fields.pop("created", []), "status": fields.pop("status", 200),
            "error": fields.pop("error", None), "injected": None, "checker": False, **fields}


def put(t, job, by, holder=None, finished=False, **extra):
    item = {"job": job, **({"holder": holder} if holder else {}),
            **({"finished": "2026-12-02T00:00:00"} if finished else {}), **extra}
    return rec(t, "PutItem", by, service="dynamodb", table="soak-leases", item=item,
               resources=["soak-leases"])


def get(t, job, by):
    return rec(t, "GetItem", by, service="dynamodb", table="soak-leases", key={"job": job},
               resources=["soak-leases"])


def train(t, job, volume, by):
    """One experiment's life on one instance: its volume made, attached, detached."""
    return [rec(t, "CreateVolume", by, tags={"spotrun:job": job, "spotrun:role": "volume"},
                created=[volume]),
            rec(t + 0.1, "AttachVolume", by, resources=[volume, by]),
            rec(t + 0.2, "CreateTags", by, resources=[volume], tags={"spotrun:phase": "done"}),
            rec(t + 0.3, "DetachVolume", by, resources=[volume])]


def followed() -> list[dict]:
    """The protocol followed: i-a and i-b claim one each; i-a, done first, finds e1 held and
    leaves the fleet; i-b finishes last, takes the sweep's cancel and cancels."""
    return sorted([
        get(0.9, "sw-e0", "i-a"), get(0.95, "sw-e0", "i-b"),
        put(1.0, "sw-e0", "i-a", holder="i-a"), put(1.05, "sw-e1", "i-b", holder="i-b"),
        *train(2.0, "sw-e0", "vol-0", "i-a"),
        put(4.0, "sw-e0", "i-a", finished=True),
        rec(4.5, "ModifySpotFleetRequest", "i-a", resources=[FLEET]),
        rec(4.6, "TerminateInstances", "i-a", resources=["i-a"]),
        *train(3.0, "sw-e1", "vol-1", "i-b"),
        put(6.0, "sw-e1", "i-b", finished=True),
        put(6.5, f"sweep#{SWEEP}", "i-b", fleet_cancel_by="i-b"),
        rec(7.0, "CancelSpotFleetRequests", "i-b", resources=[FLEET]),
    ], key=lambda r: r["t"])


def fleet_check(ledger, **options):
    return soaksweep.fleet_violations(ledger, JOBS, SWEEP, fleets=[FLEET], **options)


def protocol_check(ledger):
    return soaksweep.protocol_violations(ledger, JOBS, table="soak-leases")


def test_the_protocol_followed_is_no_violation():
    ledger = followed()
    assert fleet_check(ledger) == []
    assert protocol_check(ledger) == []
    assert resource_jobs(ledger, JOBS) == {"vol-0": "sw-e0", "vol-1": "sw-e1"}


# -- the fleet cancelled iff every experiment finished, exactly once, by an instance -----------

def test_a_second_cancel_by_another_instance_is_named():
    ledger = followed() + [rec(7.5, "CancelSpotFleetRequests", "i-c", resources=[FLEET])]
    [found] = fleet_check(ledger)
    assert "exactly once" in found and "i-b" in found and "i-c" in found


def test_a_cancel_before_the_last_experiment_finished_is_named():
    ledger = followed() + [rec(5.0, "CancelSpotFleetRequests", "i-b", resources=[FLEET])]
    [found] = fleet_check(ledger)
    assert "only when every experiment finished" in found and "sw-e1" in found


def test_a_cancel_though_an_experiment_never_finished_is_named():
    ledger = [r for r in followed() if not (r["action"] == "PutItem" and r["t"] == 6.0)]
    found = fleet_check(ledger)
    assert any("never finished" in f and "sw-e1" in f for f in found), found
    # ... and when the volume image says it did not finish though the ledger says so.
    [found] = fleet_check(followed(), all_finished=False)
    assert "only when every experiment finished" in found


def test_no_cancel_once_every_experiment_finished_is_named():
    ledger = [r for r in followed() if r["action"] != "CancelSpotFleetRequests"]
    [found] = fleet_check(ledger)
    assert "no instance cancelled the fleet" in found
    # The harness ended the job itself (out of time): then no cancel was expected of an agent.
    assert fleet_check(ledger, expect_cancel=False) == []


def test_a_cancel_by_the_operator_or_without_the_sweeps_item_is_named():
    ledger = followed() + [rec(7.2, "CancelSpotFleetRequests", None, resources=[FLEET])]
    assert any("no instance of the sweep" in f for f in fleet_check(ledger))
    untaken = [r for r in followed() if not (r["action"] == "PutItem" and r["t"] == 6.5)]
    [found] = fleet_check(untaken)
    assert "without taking the sweep's item" in found


def test_two_live_takers_of_the_cancel_are_named_a_takeover_from_a_gone_one_is_not():
    second = put(6.7, f"sweep#{SWEEP}", "i-c", fleet_cancel_by="i-c")
    [found] = fleet_check(followed() + [second])
    assert "one cancel taker" in found and "i-c" in found
    gone = rec(6.6, "TerminateInstances", None, resources=["i-b"], checker=True)
    assert fleet_check(followed() + [gone, second]) == []


def test_leaving_the_fleet_while_holding_an_experiment_is_named():
    ledger = followed() + [rec(3.5, "ModifySpotFleetRequest", "i-b", resources=[FLEET])]
    [found] = fleet_check(ledger)
    assert "leave only when idle" in found and "i-b" in found and "sw-e1" in found


# -- the claim protocol: no experiment trained by two at once, none trained again -------------

def test_a_finished_experiment_taken_again_is_named():
    ledger = followed() + [put(8.0, "sw-e0", "i-c", holder="i-c")]
    found = protocol_check(ledger)
    assert found == ["sweep claim protocol: sw-e0 taken by i-c after it finished"]


def test_a_volume_changed_by_an_instance_without_its_lease_is_named():
    ledger = followed() + [rec(3.15, "AttachVolume", "i-a", resources=["vol-1", "i-a"])]
    [found] = protocol_check(ledger)
    assert "AttachVolume on vol-1 (sw-e1) by i-a" in found
    # ... and a volume made for an experiment by an instance that does not hold it.
    ledger = followed() + [rec(3.5, "CreateVolume", "i-a", created=["vol-9"],
                               tags={"spotrun:job": "sw-e1"})]
    [found] = protocol_check(ledger)
    assert "CreateVolume on vol-9 (sw-e1) by i-a" in found


def test_lease_writes_outside_the_protocol_are_named():
    ledger = followed()
    assert lease_write_violations(ledger, JOBS) == []
    naming_another = put(1.2, "sw-e0", "i-b", holder="i-a")
    assert "i-b wrote sw-e0's lease naming i-a" in lease_write_violations(
        ledger + [naming_another], JOBS)[0]
    release_by_other = put(3.9, "sw-e0", "i-b")
    assert "i-b let go of sw-e0's lease, held by i-a" in lease_write_violations(
        ledger + [release_by_other], JOBS)[0]
    update = rec(3.9, "UpdateItem", "i-a", service="dynamodb", table="soak-leases",
                 key={"job": "sw-e1"})
    assert "UpdateItem on sw-e1's lease item" in lease_write_violations(ledger + [update], JOBS)[0]
    cancel_for_another = put(6.6, f"sweep#{SWEEP}", "i-a", fleet_cancel_by="i-b")
    assert "naming i-b as the fleet's canceller" in lease_write_violations(
        ledger + [cancel_for_another], JOBS)[0]


def test_a_takeover_ends_the_previous_holders_time_on_its_snapshots_too():
    ledger = [put(1, "sw-e0", "i-a", holder="i-a"),
              rec(2, "CreateSnapshot", "i-a", resources=["vol-0"], created=["snap-0"],
                  tags={"spotrun:job": "sw-e0"}),
              put(3, "sw-e0", "i-b", holder="i-b"),
              rec(4, "DeleteSnapshot", "i-a", resources=["snap-0"])]
    jobs = resource_jobs(ledger, ["sw-e0"])
    assert jobs == {"snap-0": "sw-e0"}
    [found] = violations(ledger, {**jobs, "vol-0": "sw-e0"})
    assert "DeleteSnapshot on snap-0 (sw-e0) by i-a" in found


# -- the bytes on the volume: finished once, with exactly its own steps ------------------------

def test_a_step_trained_twice_or_lost_on_the_volume_is_named():
    assert soaksweep.completion_violations("e", 4, {"metrics": {"sum": 10, "steps": 4}}) == []
    [twice] = soaksweep.completion_violations("e", 4, {"metrics": {"sum": 13, "steps": 4}})
    assert "sum 13" in twice and "trained twice" in twice
    [missing] = soaksweep.completion_violations("e", 4, None)
    assert "no trainer completion record" in missing
    [unreadable] = soaksweep.completion_violations("e", 4, None, image_error="bad superblock")
    assert "could not be read" in unreadable


class _Ec2:
    def __init__(self, volumes):
        self.volumes = volumes

    def describe_volumes(self, Filters):
        job = next(f["Values"][0] for f in Filters if f["Name"] == "tag:spotrun:job")
        return {"Volumes": [{"VolumeId": v, "State": "available",
                             "Tags": [{"Key": "spotrun:job", "Value": job},
                                      {"Key": "spotrun:role", "Value": "volume"}]}
                            for v in self.volumes.get(job, [])]}


def _image(root, volume_id, total, steps):
    image = root / volume_id / "checkpoints"
    image.mkdir(parents=True)
    (image / ".spotrun-trainer-completed.json").write_text(json.dumps(
        {"metrics": {"sum": total, "steps": steps, "runs": 1}}))


def test_check_experiments_reads_the_images_and_names_each_break(tmp_path):
    _image(tmp_path, "vol-0", 6, 3)
    _image(tmp_path, "vol-1", 11, 4)  # step 1 ran twice: 1+1+2+3+4
    ec2 = _Ec2({"sw-e0": ["vol-0"], "sw-e1": ["vol-1"]})
    rows, found = soaksweep.check_experiments(followed(), ec2, lambda v: tmp_path / v, JOBS,
                                              wait_s=0)
    assert [r["sum_ok"] for r in rows] == [True, False]
    assert len(found) == 1 and "sw-e1 ended with sum 11" in found[0]
    ec2 = _Ec2({"sw-e0": ["vol-0", "vol-2"], "sw-e1": ["vol-1"]})
    _, found = soaksweep.check_experiments(followed(), ec2, lambda v: tmp_path / v, JOBS, wait_s=0)
    assert any("sw-e0 has 2" in f for f in found), found


# -- the kinds' own readings of the ledger ------------------------------------------------------

def test_claims_overlap_only_when_each_read_before_the_others_take():
    ledger = followed()
    windows = claim_windows(ledger, JOBS, ["i-a", "i-b"])
    assert windows == {"i-a": (0.9, 1.0), "i-b": (0.95, 1.05)}
    assert overlapping(windows) == [("i-a", "i-b")]
    assert overlapping({"i-a": (0.9, 1.0), "i-b": (1.01, 1.05)}) == []


def test_the_cancel_race_is_who_went_for_the_sweeps_item():
    ledger = followed()
    assert cancel_race(ledger, SWEEP, ["i-a", "i-b"]) == ["i-b"]
    ledger.append(rec(6.4, "GetItem", "i-a", service="dynamodb", key={"job": f"sweep#{SWEEP}"}))
    assert cancel_race(ledger, SWEEP, ["i-a", "i-b"]) == ["i-a", "i-b"]


# -- plans --------------------------------------------------------------------------------------

def test_the_sweep_kinds_are_the_plans_and_the_catalogues_and_known_to_the_cli():
    assert set(SWEEP_CATALOGUE) == set(soakplan.SWEEP_KINDS)
    assert not set(SWEEP_CATALOGUE) & set(CATALOGUE)
    assert set(soak.KINDS) == set(CATALOGUE) | set(SWEEP_CATALOGUE)


def test_the_long_profile_has_sweep_jobs_the_short_none():
    plans = soak.plan_jobs("long", 1)
    sweeps = [p for p in plans if p.sweep]
    assert Counter(p.slots[0].kind for p in sweeps) == {k: 4 for k in soakplan.SWEEP_KINDS}
    assert not any(p.sweep for p in soak.plan_jobs("short", 4))
    for plan in sweeps:
        assert len(plan.slots) == 1 and plan.lease and plan.capacity >= 2
        assert all(steps % plan.ckpt_every == 0 for steps in plan.sweep)  # the last step saves
        assert len(plan.experiments) == len(plan.sweep)
        if plan.slots[0].kind == "sweep_last_two_finish_together":
            assert plan.sweep[-1] == plan.sweep[-2]
        if plan.slots[0].kind == "sweep_simultaneous_claims":
            assert plan.capacity == len(plan.sweep)
    # The instance sent away between two experiments: by a notice, then killed, after its
    # next claim and then before it, in turn.
    assert [p.variant for p in sweeps if p.slots[0].kind == "sweep_interrupted_between_jobs"] \
        == ["notice", "kill", "notice-before-claim", "kill-before-claim"]
    # Replayable: a job's plan does not depend on how many follow it.
    assert soak.plan_jobs("long", 1, jobs=16)[15].describe() == plans[15].describe()


def test_a_sweep_job_line_and_the_summary_count_it_like_the_others():
    result = {"index": 3, "job": "soak-1-3", "completed": True, "sweep": [{}, {}, {}],
              "interruptions": [], "kinds": {"sweep_simultaneous_claims": 1},
              "extra_faults": {"sweep_simultaneous_claims:raced": 1}, "missed": [], "lost": {},
              "violations": ["sweep fleet cancelled exactly once: 2 instances cancelled it"]}
    line = soakcheck.job_line(result)
    assert line.startswith("FAIL job   3") and "sweep of 3 [sweep_simultaneous_claims]" in line
    summary = soakcheck.summarize([result], profile="long", seed=1, seconds=1.0)
    assert summary["violations"] == 1 and summary["kinds"] == {"sweep_simultaneous_claims": 1}


# -- the kinds on the local cloud -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.loopdev
def test_each_sweep_kind_lands_and_breaks_no_invariant(shared_tmp):
    plans = soak.plan_jobs("short", SWEEP_SEED, jobs=3, kinds=list(soakplan.SWEEP_KINDS))
    assert sorted(p.slots[0].kind for p in plans) == sorted(soakplan.SWEEP_KINDS)
    lines = []
    summary = soak.run_soak("short", SWEEP_SEED, shared_tmp / "soak", jobs=3,
                            kinds=list(soakplan.SWEEP_KINDS), echo=lines.append)
    table = soakcheck.format_summary(summary)
    assert summary["violations"] == 0, table + "\n" + "\n".join(lines)
    assert summary["jobs"] == summary["completed"] == 3, table
    # Every moment landed: the claims overlapped, the instance went between two experiments,
    # the last two were held in their last save and let go together.
    assert summary["kinds"] == {kind: 1 for kind in soakplan.SWEEP_KINDS}, table
    assert summary["extra_faults"].get("sweep_simultaneous_claims:raced") == 1, table
    assert summary["interruptions"] == 1, table
    jobs = json.loads((shared_tmp / "soak" / "results.json").read_text())["jobs"]
    between = next(j for j in jobs if j["interruptions"])
    [cut] = between["interruptions"]
    # The experiment it had just claimed was trained by another instance, to its exact sum.
    row = next(r for r in between["sweep"] if r["job"] == cut["claimed"])
    assert cut["instance_id"] in row["holders"] and len(row["holders"]) >= 2, between["sweep"]
    assert all(r["sum"] == r["steps"] * (r["steps"] + 1) // 2 for j in jobs for r in j["sweep"])

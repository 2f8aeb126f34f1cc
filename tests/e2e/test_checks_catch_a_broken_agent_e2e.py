"""Each invariant check is shown to fail (issue 17): the real agent, on the local spot cloud,
broken from the outside to violate exactly one invariant, is named by that check; the same
scenario unbroken is not. The checkers are fed what the soak feeds them — the cloud's own call
ledger and the final volume's image (spotrun.harness.soakcheck.witness_violations, soakledger.check) —
never the agent's logs.

The break is made without touching the agent's code: one boot's agent process gets
tests/e2e/broken_agent on its PYTHONPATH and SPOTRUN_TEST_BREAK=<name>; that directory's
sitecustomize.py monkeypatches the agent's code (spotrun_breaks.py says where, and why) in that
process only, and says so in the agent's log, which the test awaits. The trainer the agent
starts gets its own minimal environment. Each broken run must be named by its check, and only
by it (every sentence of the checker starts with that invariant); each unbroken run, the same
scenario, must give no sentence at all.

- inv5 only success cancels: a trainer stopped from outside (exit 75) is taken as finished,
  the fleet cancelled with no completion record on the image;
- inv2 copy before delete: in a cross-AZ migration the old volume is deleted as soon as its
  copy exists, before the copy is attached and verified; or the copy is emptied and called
  verified, which only the copy's image, read when the delete arrives, shows;
- inv6 only the job's own resources: the agent also tags a volume of another job;
- inv1, a second instance next to the live holder: it takes the job's lease from the holder
  (named by the lease check), or skips the lease and copies and attaches the holder's volume
  in its own AZ (named by the attachment check, and by the race check).

inv5 asks for the trainer's own completion record on the image too: an agent that takes a
stopped trainer as finished and writes its own record the normal way is named as well.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from spotrun.harness import soakcheck, soakledger
from spotrun.harness.soakdeletes import DeleteWitness
from spotrun import tags as T
from spotrun.localcloud.ledger import performed
from tests.helpers.rehearsals import CloudWithEnv, PerBootEnvRehearsal
from tests.helpers.testkit import wait_until

pytestmark = [pytest.mark.loopdev]
BROKEN_AGENT = Path(__file__).resolve().parent / "broken_agent"
STEPS = 200
NOTICE_S = 90.0  # far off: the test terminates the instance once its agent has released
DECOY_JOB = "someone-elses-job"


def break_env(name: str, **extra: str) -> dict[str, str]:
    """The environment that makes an agent process install break ``name``."""
    path = os.pathsep.join(p for p in (str(BROKEN_AGENT), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "SPOTRUN_TEST_BREAK": name, **extra}


class BrokenRehearsal(PerBootEnvRehearsal):
    """Boot number ``n`` (0 = the first) runs an agent with break ``breaks[n]``. With
    ``decoy``, a volume of another job is made in the first boot's AZ before any agent starts
    (the unbroken run has it too), and a broken agent is told its id."""

    def __init__(self, plan, breaks: dict[int, str], decoy: bool = False):
        super().__init__(plan)
        self.breaks = dict(breaks)
        self.decoy: str | None = None
        self._want_decoy = decoy

    def env_for(self, index, cloud, inst):
        if self._want_decoy and self.decoy is None:
            self.decoy = cloud.client("ec2", faults=False).create_volume(
                AvailabilityZone=inst.az, Size=1, TagSpecifications=[{
                    "ResourceType": "volume",
                    "Tags": T.as_list({T.NAME: "decoy", T.JOB: DECOY_JOB})}])["VolumeId"]
        name = self.breaks.pop(index, None)
        if name is None:
            return None
        return break_env(name, **({"SPOTRUN_TEST_DECOY": self.decoy} if self.decoy else {}))


@pytest.fixture
def rehearsal(start_counting):
    def make(breaks=None, *, decoy=False, steps=STEPS, **plan):
        return start_counting({"STEPS": str(steps)},
                              make=lambda p: BrokenRehearsal(p, breaks or {}, decoy), **plan)
    return make


def _boot(r, n: int) -> dict:
    return wait_until(lambda: r.boots[n] if len(r.boots) > n else None,
        60, f"boot {n}", interval=0.05)


def _installed(boot: dict, name: str) -> None:
    """The break is in that agent (else a "caught" would prove nothing about the checker)."""
    line = f"spotrun test break installed: {name}"
    wait_until(lambda: line in Path(boot["log"]).read_text(errors="replace"),
        30, f"break {name} in {boot['instance_id']}", interval=0.05)


def _await_step(r, iid: str, step: int) -> None:
    inst = r.cloud.instance(iid)
    wait_until(lambda: (r.progress_of(inst).get("global_step") or 0) >= step,
        90.0, f"step {step}", interval=0.05)


def _job_volumes(r) -> list[dict]:
    volumes = r.cloud.moto_client("ec2").describe_volumes(Filters=T.job_filters(r.plan.job_id))
    return [v for v in volumes["Volumes"] if v["State"] not in ("deleting", "deleted")]


def _settled_volumes(r) -> list[dict]:
    """The job's volumes once none is attached (the last instance terminated by the cancel):
    an ext4 image is whole on disk only after the unmount."""
    ec2 = r.cloud.moto_client("ec2")

    def settled():
        volumes = [v for v in ec2.describe_volumes(Filters=T.job_filters(r.plan.job_id))["Volumes"]
                   if v["State"] not in ("deleting", "deleted")]
        return volumes if volumes and all(v["State"] == "available" for v in volumes) else None

    return wait_until(settled, 60, "the job's volumes detached", interval=0.05)


def _witness(r, deletes: DeleteWitness | None = None) -> tuple[list[str], dict | None, str | None]:
    """Invariants 2, 5 and 6 as the soak judges a job: its ledger and its final image (and,
    with ``deletes``, the images as they were when each DeleteVolume arrived)."""
    wait_until(r._fleet_cancelled, 120, "the fleet cancel", interval=0.05)
    job = SimpleNamespace(cloud=r.cloud, boots=r.boots, fleet=r.fleet, plan=r.plan,
                          ledger_records=r.cloud.ledger, cancelled_by_soak=False,
                          delete_witness=deletes)
    return soakcheck.witness_violations(job, _settled_volumes(r))


def _named(found: list[str], prefix: str) -> None:
    assert found, "the checker named nothing"
    assert all(v.startswith(prefix) for v in found), found


BROKEN = [pytest.param(True, id="broken"), pytest.param(False, id="unbroken")]


# -- inv5 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("broken", BROKEN)
def test_inv5_a_cancel_for_a_stopped_trainer_is_named(rehearsal, broken):
    name = "inv5-stopped-is-finished"
    r = rehearsal({0: name} if broken else {})
    boot = _boot(r, 0)
    iid = boot["instance_id"]
    if broken:
        _installed(boot, name)
    _await_step(r, iid, 20)
    # An operator's kill: the counting trainer checkpoints and exits 75 (stopped, not done).
    os.kill(r.await_agent_event(iid, "trainer_started")["pid"], signal.SIGTERM)

    found, completion, image_error = _witness(r)
    assert image_error is None
    if broken:
        assert completion is None  # what the agent did not write, read from the image
        _named(found, "inv5 only success cancels")
        assert "holds no completion record" in found[0] and iid in found[0], found
    else:
        assert completion is not None and found == []


def test_inv5_a_cancel_with_the_agents_record_for_a_stopped_trainer_is_named(rehearsal):
    name = "inv5-stopped-is-finished-with-record"
    r = rehearsal({0: name})
    boot = _boot(r, 0)
    iid = boot["instance_id"]
    _installed(boot, name)
    _await_step(r, iid, 20)
    os.kill(r.await_agent_event(iid, "trainer_started")["pid"], signal.SIGTERM)

    found, completion, _ = _witness(r)
    # The job did stop early: the image holds the agent's record but not the trainer's.
    assert completion is not None and "trainer" not in completion, completion
    _named(found, "inv5")


def _migrated(r, break_name: str | None) -> tuple[dict, str]:
    """The first instance trains, is noticed and released, then terminated; the second boots in
    another AZ (with ``break_name`` installed, if any) and migrates. Returns (second boot, the
    source volume)."""
    first = _boot(r, 0)
    iid = first["instance_id"]
    _await_step(r, iid, 20)
    [source] = [v["VolumeId"] for v in _job_volumes(r)]
    r.cloud.interrupt(iid, "terminate", in_seconds=NOTICE_S)
    r.await_agent_event(iid, "phase_changed", phase="released")
    r.cloud.terminate(iid)  # as the spot service would at the notice's time
    second = _boot(r, 1)
    assert second["az"] != first["az"], (first["az"], second["az"])
    if break_name:
        _installed(second, break_name)
    return second, source


# -- inv2 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("broken", BROKEN)
def test_inv2_deleting_the_old_volume_before_its_copy_is_verified_is_named(rehearsal, broken):
    name = "inv2-delete-source-early"
    r = rehearsal({1: name} if broken else {}, az_policy="round-robin")
    second, source = _migrated(r, name if broken else None)

    found, completion, _ = _witness(r)
    # A migration happened (else the unbroken run would pass for nothing): the replacement
    # made a volume from a snapshot of the source, and the source is gone.
    records = r.cloud.ledger()
    assert any(rec.get("action") == "DeleteVolume" and source in rec.get("resources", [])
               and rec.get("instance") == second["instance_id"] for rec in records)
    assert any(rec.get("action") == "CreateVolume" and rec.get("instance") == second["instance_id"]
               and any(i.startswith("snap-") for i in rec.get("resources", [])) for rec in records)
    assert completion is not None  # the job still finished, from the copy
    if broken:
        _named(found, "inv2 copy before delete")
        assert source in found[0] and "not attached" in found[0], found
    else:
        assert found == []


@pytest.mark.parametrize("broken", BROKEN)
def test_inv2_deleting_the_old_volume_while_no_copy_holds_its_checkpoint_is_named(rehearsal,
                                                                                  broken):
    # The ledger alone sees a correct migration here (copy attached, tagged verified, then the
    # delete): only the copy's image, read by the cloud when the delete arrives, tells.
    name = "inv2-verify-an-empty-copy"
    r = rehearsal({1: name} if broken else {}, az_policy="round-robin")
    deletes = DeleteWitness(r.cloud).install()
    _, source = _migrated(r, name if broken else None)

    found, completion, _ = _witness(r, deletes)
    # The delete was witnessed with the source's checkpoint on its image (else nothing shown).
    assert deletes.seen.get(source, {}).get(source) is not None, deletes.seen
    assert completion is not None
    if broken:
        _named(found, "inv2 copy before delete")
        assert source in found[0] and "no copy's image held" in found[0], found
    else:
        assert found == []


# -- inv6 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("broken", BROKEN)
def test_inv6_touching_another_jobs_volume_is_named(rehearsal, broken):
    name = "inv6-tag-decoy"
    r = rehearsal({0: name} if broken else {}, decoy=True)
    boot = _boot(r, 0)
    if broken:
        _installed(boot, name)

    found, completion, _ = _witness(r)
    assert completion is not None  # the job itself finished as usual
    decoy = r.cloud.moto_client("ec2").describe_volumes(VolumeIds=[r.decoy])["Volumes"][0]
    if broken:
        assert T.as_dict(decoy.get("Tags")).get("spotrun:instance") == boot["instance_id"]
        _named(found, "inv6 only the job's own resources")
        assert r.decoy in found[0] and boot["instance_id"] in found[0], found
    else:
        assert T.as_dict(decoy.get("Tags")) == {T.NAME: "decoy", T.JOB: DECOY_JOB}
        assert found == []


# -- inv1 ---------------------------------------------------------------------------------

# break: (the racer boots in the holder's AZ, what the checker must name, the racer's call
# in the ledger that shows the break acted)
INV1 = {
    # Same AZ: the volume is the holder's; the broken racer's one write is the lease itself.
    "inv1-take-over-lease": (True, "inv1 lease taken over from a live holder", "PutItem"),
    # Another AZ: the broken racer copies the holder's volume and attaches the copy.
    "inv1-skip-lease": (False, "inv1 never two volumes attached", "AttachVolume"),
}


@pytest.mark.parametrize("broken", BROKEN)
@pytest.mark.parametrize("name", list(INV1))
def test_inv1_a_second_agent_next_to_the_live_holder_is_named(rehearsal, name, broken):
    """A second instance of the job boots next to the live holder (as a fleet replacement that
    came too early would): unbroken, it waits for the lease and touches nothing."""
    same_az, sentence, action = INV1[name]
    r = rehearsal(steps=5000)  # the holder trains on through the race
    holder = _boot(r, 0)["instance_id"]
    _await_step(r, holder, 20)
    job, table = r.plan.job_id, r.plan.lease_table
    since = max((rec.get("seq", 0) for rec in r.cloud.ledger()), default=0)
    fleet = r.fleet
    az = r.cloud.instance(holder).az
    racer = r.cloud.launch_instance(
        az=az if same_az else next(a for a in r.cloud.azs if a != az),
        instance_type=fleet.launch.instance_type,
        tags={**fleet.launch.tags, T.SPOT_FLEET_REQUEST: fleet.request_id},
        user_data=fleet.launch.user_data)
    r.boot(CloudWithEnv(r.cloud, break_env(name)) if broken else r.cloud, racer)
    loser = racer.instance_id
    if broken:
        _installed(r.boots[-1], name)
        wait_until(lambda: [
            rec for rec in r.cloud.ledger() if rec.get("instance") == loser
            and rec.get("action") == action and performed(rec)],
                60, f"the racer's {action}", interval=0.05)
    else:
        wait_until(lambda: soakledger.contended(
            r.cloud.ledger(), job, table, holder, loser, since),
                60, "the racer to ask for the holder's lease", interval=0.05)
    r.cloud.terminate(loser)  # the fleet's excess instance

    race = {"kind": "second_instance", "winner": holder, "loser": loser, "since_seq": since}
    found = soakledger.check(r.cloud.ledger(), job, table, races=[race])
    assert r.cloud.instance(holder).state == "running"
    if broken:
        _named(found, "inv1")
        assert any(v.startswith(sentence) and loser in v for v in found), found
    else:
        assert found == []
        assert race["touched"] == []  # race_violations: no mutating call by the racer

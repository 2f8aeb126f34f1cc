"""A notice before training stops the phase it lands in (issue 15, item 10), on the local spot
cloud with real agents and the counting trainer.

Each case freezes one boot's agent at a pause point inside a phase (identify, the acquire of a
new volume, a cross-AZ migration, the checkout), posts the spot notice, lets the agent go on,
and judges from the cloud and the instance: no trainer ever started there, nothing of the job
is attached to it while it still runs, a migration is left as journaled (the source kept, a
copy unproven and detached), and the next instance continues and completes the job exactly.

Before the change the paused agent went on to start the trainer first (the monitor began
with training), so ``no trainer started`` fails for every case.
"""
import json
import os
import signal
from pathlib import Path

import pytest

from spotrun import migration as M
from spotrun import tags as T
from spotrun.localcloud.faultagent import PAUSE_ENV
from tests.helpers.rehearsals import PerBootEnvRehearsal
from tests.helpers.testkit import wait_until

pytestmark = [pytest.mark.loopdev]
STEPS = 200
NOTICE_S = 90.0  # far off: the instance is terminated as soon as its agent has released
PRE_TRAINING = ("identifying", "acquiring-volume", "checking-out")


class PausedRehearsal(PerBootEnvRehearsal):
    """Boot number ``n`` (0 = the first) is started with SPOTRUN_PAUSE_AT = ``pauses[n]``,
    which the test launcher its agent runs under (spotrun.localcloud.faultagent) obeys."""

    def __init__(self, plan, pauses: dict[int, str]):
        super().__init__(plan)
        self.pauses = dict(pauses)

    def env_for(self, index, cloud, inst):
        point = self.pauses.pop(index, None)
        return {PAUSE_ENV: point} if point else None


@pytest.fixture
def rehearsal(start_counting):
    def make(pauses, az_policy):
        return start_counting({"STEPS": str(STEPS)}, az_policy=az_policy,
                              make=lambda plan: PausedRehearsal(plan, pauses))
    return make


def _boot(r, n: int) -> dict:
    return wait_until(lambda: r.boots[n] if len(r.boots) > n else None,
        90.0, f"boot {n}", interval=0.05)


def _paused_pid(boot: dict) -> int:
    proc = boot["process"]

    def stopped():
        assert proc.poll() is None, f"the agent exited ({proc.returncode}) instead of pausing"
        stat = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return proc.pid if stat == "T" else None

    return wait_until(stopped, 60, "the agent to pause", interval=0.05)


def _state(inst) -> dict:
    try:
        return json.loads((inst.state_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def _trainer_starts(inst) -> list[dict]:
    try:
        lines = (inst.state_dir / "trainer.log").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and item.get("event") == "trainer_start":
            out.append(item)
    return out


def _job_volumes(r) -> list[dict]:
    volumes = r.cloud.moto_client("ec2").describe_volumes(Filters=T.job_filters(r.plan.job_id))["Volumes"]
    return [v for v in volumes if v["State"] not in ("deleting", "deleted")]


def _attached_to(r, iid: str) -> list[str]:
    return [v["VolumeId"] for v in _job_volumes(r)
            for a in v.get("Attachments", []) if a["InstanceId"] == iid and a["State"] != "detached"]


def _released_while_running(r, iid: str, ends=("released", "training")) -> dict:
    """The agent ended its boot RELEASED, before the notice's time (the instance still runs);
    ``ends``: the phases that end the wait (training: it went on instead)."""
    inst = r.cloud.instance(iid)
    state = wait_until(lambda: (s := _state(inst)).get("phase") in ends and s,
        60, f"{iid} released", interval=0.05)
    assert inst.state == "running", inst.state
    assert state["phase"] == "released", f"{iid} went on to {state['phase']}"
    return state


def _train_then_notice(r, boot: dict) -> None:
    """Boot ``boot`` trains to step 20, gets an ordinary notice, drains; terminated at once."""
    iid = boot["instance_id"]
    inst = r.cloud.instance(iid)
    wait_until(lambda: (r.progress_of(inst).get("global_step") or 0) >= 20,
        90.0, "step 20", interval=0.05)
    r.cloud.interrupt(iid, "terminate", in_seconds=NOTICE_S)
    _released_while_running(r, iid, ends=("released",))
    r.cloud.terminate(iid)


def _assert_completed(r) -> None:
    wait_until(r._fleet_cancelled, 150, "the fleet cancel", interval=0.05)
    [volume] = _job_volumes(r)  # one copy survives (invariant 1)
    tags = T.as_dict(volume.get("Tags"))
    assert tags[T.COMPLETED] and tags[T.PHASE] == "done", tags
    result = json.loads(tags[T.RESULT])
    assert result["sum"] == STEPS * (STEPS + 1) // 2 and result["steps"] == STEPS, result


# phase: (the boot that gets the notice, its pause point, the fleet's AZ policy)
CASES = {
    "identify": (0, "identify.started", "round-robin"),
    "acquire": (0, "acquire.started", "fixed:us-east-1a"),
    "migration": (1, "migration.started", "round-robin"),
    "checkout": (0, "checkout.started", "round-robin"),
}


@pytest.mark.parametrize("phase", list(CASES))
def test_a_notice_stops_the_phase_it_lands_in_and_the_next_instance_completes(rehearsal, phase):
    target, point, az_policy = CASES[phase]
    r = rehearsal({target: point}, az_policy)
    if target == 1:
        _train_then_notice(r, _boot(r, 0))
    source = {v["VolumeId"]: v for v in _job_volumes(r)}
    boot = _boot(r, target)
    iid = boot["instance_id"]
    inst = r.cloud.instance(iid)
    pid = _paused_pid(boot)
    r.cloud.interrupt(iid, "terminate", in_seconds=NOTICE_S)
    os.kill(pid, signal.SIGCONT)

    _released_while_running(r, iid)
    # Judged from the instance and the cloud: no trainer ever ran here, nothing is held.
    assert _trainer_starts(inst) == [], "a trainer was started after the notice"
    assert _attached_to(r, iid) == []
    assert not os.path.ismount(inst.mount_point)
    reported = r.await_agent_event(iid, "reported", timeout=10)
    assert reported["interrupted_phase"] in PRE_TRAINING, reported
    if phase == "checkout":
        assert reported["interrupted_phase"] == "checking-out", reported
    if phase == "migration":
        # Nothing deleted half-way: the source is there, untouched; a copy is unproven.
        volumes = {v["VolumeId"]: v for v in _job_volumes(r)}
        assert set(source) <= set(volumes), (source, volumes)
        for vid, volume in volumes.items():
            if vid not in source:
                assert M.tags_of(volume).get(M.SOURCE_VOLUME) in source, volume
                assert M.tags_of(volume).get(M.STEP) not in M.PROVEN_STEPS, volume
        assert reported["interrupted_phase"] == "acquiring-volume", reported
    r.cloud.terminate(iid)  # as the spot service would at the notice's time

    _assert_completed(r)

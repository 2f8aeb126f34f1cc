"""Only finished training cancels the fleet (invariant 5), on the local spot cloud with the
real agent and the protocol-aware counting trainer: a SIGTERM the agent did not send (an
operator's kill, `systemctl kill`, the shutdown race) never completes the job, and a final
state is on the volume's tags and in the state file before the fleet cancel, which
terminates the instance and the agent with it.

Judged from evidence the agent cannot write: the local cloud's ledger of calls (who cancelled
the fleet, and when), the files on the job volume's image once it is detached (the completion
record, the trainer's final sum), the trainer's own output, and what the cloud held at the
moment the cancel call reached it. The volume's tags are checked too, as what an operator sees.
"""
import json
import os
import signal
import time

import pytest

from spotrun.harness import soakwitness
from spotrun import tags as T
from spotrun.harness.rehearsal_volume import VolumeImage
from tests.helpers.testkit import trainer_log_events

pytestmark = [pytest.mark.loopdev]
CANCEL = "CancelSpotFleetRequests"  # the rehearsal's fleets are Spot Fleets


@pytest.fixture
def rehearsal(start_counting, monkeypatch):
    """Factory: the counting trainer's rehearsal (``env``: its settings over these), started,
    with what the cloud held at the fleet cancel in ``at_cancel``."""
    def make(env=None, **plan):
        r = start_counting({"STEPS": "300", **(env or {})}, **plan)
        r.at_cancel = _watch_cancel(r, monkeypatch)
        return r

    return make


def _volume_tags(r) -> dict:
    volumes = r.cloud.moto_client("ec2").describe_volumes(Filters=T.job_filters(r.plan.job_id))["Volumes"]
    assert len(volumes) == 1, volumes
    return T.as_dict(volumes[0].get("Tags"))


def _cancels(r) -> list[dict]:
    """The agents' fleet cancels, tried or performed, from the cloud's ledger."""
    return soakwitness.cancels(r.cloud.ledger(), {b["instance_id"] for b in r.boots},
                               {r.fleet.request_id})


def _final_image_files(r) -> dict:
    """The completion record and the trainer's final metrics, read from the job volume's image
    once the cancel's termination has detached it (not through the agent)."""
    ec2 = r.cloud.moto_client("ec2")

    def detached():
        volumes = ec2.describe_volumes(Filters=T.job_filters(r.plan.job_id))["Volumes"]
        return volumes if len(volumes) == 1 and volumes[0]["State"] == "available" else None

    [volume] = r._await("the job volume detached", detached, time.monotonic() + 60)
    image = VolumeImage(r.cloud.dataplane.volume_path(volume["VolumeId"]))
    found = image.read([soakwitness.COMPLETION_RECORD, "checkpoints/final_metrics.json"])
    return {rel: json.loads(data) for rel, data in found.items()}


def _state_files(r) -> dict:
    out = {}
    for boot in list(r.boots):
        path = r.cloud.instance(boot["instance_id"]).state_dir / "state.json"
        try:
            out[boot["instance_id"]] = json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    return out


def _watch_cancel(r, monkeypatch) -> list:
    """What the cloud held when the agent's fleet cancel reached it, before it acted on it.

    The cloud's EC2 overlay sees every call the agent makes; the cancel is let through
    unchanged once the volume's tags and the instances' state files are read."""
    seen: list = []
    overlay = r.cloud._overlay
    handle = overlay.handle

    def spy(action, params, forward):
        if action == CANCEL:
            try:
                seen.append({"tags": _volume_tags(r), "state": _state_files(r)})
            except Exception as exc:  # noqa: BLE001 - reported by the test, never to the agent
                seen.append({"error": repr(exc)})
        return handle(action, params, forward)

    monkeypatch.setattr(overlay, "handle", spy)
    return seen


def _first_instance(r):
    r._await("the first instance", lambda: r.boots, time.monotonic() + 60)
    return r.boots[0]["instance_id"]


def _await_second_trainer(r, inst) -> list[dict]:
    """The trainer_start lines once a second trainer started; fails at once if the fleet is
    cancelled first (the job taken as complete)."""
    def second():
        if r._fleet_cancelled():
            raise AssertionError(f"the fleet was cancelled before a trainer was restarted; "
                                 f"volume tags {_volume_tags(r)}")
        starts = [e for e in trainer_log_events(inst) if e["event"] == "trainer_start"]
        return starts if len(starts) >= 2 else None

    return r._await("a second trainer", second, time.monotonic() + 60)


def _await_step(r, inst, step):
    r._await(f"step {step}", lambda: (r.progress_of(inst).get("global_step") or 0) >= step,
             time.monotonic() + 90)


def _assert_completed_exactly(r, runs: int) -> None:
    r._await("the fleet cancel", r._fleet_cancelled, time.monotonic() + 120)
    files = _final_image_files(r)
    # Every step of the surviving lineage ran once: the trainer's sum, on the image.
    assert files.get("checkpoints/final_metrics.json") == {"sum": 300 * 301 // 2, "steps": 300,
                                                           "runs": runs}, files
    completion = files.get(soakwitness.COMPLETION_RECORD)
    assert completion is not None, files
    # One cancel, by an agent, not before the completion record on the image was written.
    assert len(_cancels(r)) == 1
    assert soakwitness.cancel_violations(r.cloud.ledger(), {b["instance_id"] for b in r.boots},
                                         {r.fleet.request_id}, completion) == []
    tags = _volume_tags(r)
    assert tags[T.COMPLETED] and tags[T.PHASE] == "done"
    assert json.loads(tags[T.RESULT]) == {"sum": 300 * 301 // 2, "steps": 300, "runs": runs}
    [at_cancel] = r.at_cancel
    assert at_cancel["tags"][T.PHASE] == "done" and at_cancel["tags"][T.COMPLETED], at_cancel
    assert [s["phase"] for s in at_cancel["state"].values()][-1] == "done", at_cancel


@pytest.mark.parametrize("target", ["pid", "group"])
def test_an_outside_sigterm_to_the_trainer_resumes_and_never_completes_early(rehearsal, target):
    r = rehearsal()
    iid = _first_instance(r)
    inst = r.cloud.instance(iid)
    _await_step(r, inst, 35)  # three checkpoints (every 10 steps) behind it
    pid = r.await_agent_event(iid, "trainer_started")["pid"]
    (os.kill if target == "pid" else os.killpg)(pid, signal.SIGTERM)

    _await_second_trainer(r, inst)
    # The stop completed nothing: no agent asked for a cancel, the volume is not marked done,
    # and the volume holds no completion record.
    assert _cancels(r) == [] and not r._fleet_cancelled()
    tags = _volume_tags(r)
    assert T.COMPLETED not in tags and tags[T.PHASE] == "training", tags
    assert not (inst.mount_point / ".spotrun-completed.json").exists()
    lines = trainer_log_events(inst)
    [stopped] = [e for e in lines if e["event"] == "trainer_preempted"]
    starts = [e for e in lines if e["event"] == "trainer_start"]
    assert stopped["step"] >= 35
    # Resumed from the checkpoint the stop wrote, not from an older one and not from zero.
    assert starts[1]["resume_step"] == stopped["step"] and starts[1]["runs"] == 2
    _assert_completed_exactly(r, runs=2)
    assert len(r.boots) == 1  # the same instance trained on: nothing was interrupted


def test_the_shutdown_race_drains_and_the_next_boot_resumes(rehearsal):
    """`systemctl kill` / a shutdown that signals the whole unit: SIGTERM to the agent and the
    trainer at the same moment. A drain, no completion; the next boot finishes the job."""
    r = rehearsal()
    iid = _first_instance(r)
    inst = r.cloud.instance(iid)
    _await_step(r, inst, 35)
    pid = r.await_agent_event(iid, "trainer_started")["pid"]
    agent = r.boots[0]["process"]
    agent.send_signal(signal.SIGTERM)
    os.killpg(pid, signal.SIGTERM)
    assert agent.wait(60) == 0
    r.await_agent_event(iid, "phase_changed", phase="released")
    assert _cancels(r) == [] and not r._fleet_cancelled() and r.at_cancel == []
    tags = _volume_tags(r)
    assert T.COMPLETED not in tags and tags[T.PHASE] == "released", tags
    [stopped] = [e for e in trainer_log_events(inst) if e["event"] == "trainer_preempted"]

    r.boot(r.cloud, inst)  # the unit is enabled: the next boot starts the agent again
    starts = _await_second_trainer(r, inst)
    assert starts[1]["resume_step"] == stopped["step"] >= 35
    _assert_completed_exactly(r, runs=2)


def test_a_crash_loop_is_on_the_volume_as_failed_before_the_fleet_is_cancelled(rehearsal):
    r = rehearsal(env={"MODE": "crash-at:30"},
                  agent_config={"trainer": {"restart_backoff_s": 0.1, "max_restarts": 2}})
    iid = _first_instance(r)
    r._await("the fleet cancel", r._fleet_cancelled, time.monotonic() + 120)
    [at_cancel] = r.at_cancel
    assert "error" not in at_cancel, at_cancel
    assert at_cancel["tags"][T.PHASE] == "failed", at_cancel["tags"]
    assert "crashed 3 times in a row" in at_cancel["tags"][T.FAILURE]
    assert at_cancel["state"][iid]["phase"] == "failed"
    assert "crashed 3 times in a row" in at_cancel["state"][iid]["failure"]
    tags = _volume_tags(r)
    assert tags[T.PHASE] == "failed" and T.COMPLETED not in tags
    # A failure is not a finish: the image holds no completion record, and the ledger's one
    # cancel is by the agent that gave up.
    files = _final_image_files(r)
    assert soakwitness.COMPLETION_RECORD not in files and "checkpoints/final_metrics.json" not in files
    assert [c["instance"] for c in _cancels(r)] == [iid]

"""The whole spot lifecycle with the real agent on the local spot cloud (real loop devices,
moto's server, metadata over HTTP, git, processes and signals)."""
import sys

import pytest

from spotrun.harness.rehearsal import Rehearsal, RehearsalPlan

PYTHON = sys.executable

pytestmark = [pytest.mark.loopdev]


def _plan(directory, repo, **kw):
    env = {"STEPS": "300", "STEP_S": "0.02", "CKPT_EVERY": "1000"}
    env.update(kw.pop("env", {}))
    return RehearsalPlan(out=directory / "run", repository=repo, command=[PYTHON, "train.py"],
                         trainer_env=env, notice_s=kw.pop("notice_s", 8.0), timeout_s=240, **kw)


def test_interrupted_job_migrates_resumes_exactly_and_cancels_only_at_the_end(shared_tmp, counting_repo,
                                                                             expected_sum):
    report = Rehearsal(_plan(shared_tmp, counting_repo, interrupt_at_steps=[60, 170])).run()
    assert report["fleet_state"] == "cancelled"
    assert report["completed"]
    # Exactly one volume of the job survives the two migrations (invariant 1).
    assert len(report["volumes_left"]) == 1
    instances = report["instances"]
    assert len(instances) == 3
    # The last instance is terminated by its own fleet cancel: cancelling is its last act.
    # (it may or may not log "done" before it goes).
    assert [i["ended"] for i in instances[:2]] == ["released", "released"]
    assert instances[2]["ended"] in ("finishing", "done")
    assert len({i["az"] for i in instances}) == 3  # round-robin: every replacement in a new AZ
    assert [i["migrated"] for i in instances] == [False, True, True]
    for record in report["interruptions"]:
        # The checkpoint taken on the notice is the step the trainer reached: nothing redone.
        assert record["steps_redone"] == 0, record
        assert record["resumed_from_step"] == record["checkpoint_step"] >= record["notice_at_step"]
    # Exact resume: the running sum equals an uninterrupted run's.
    assert report["final_metrics"]["sum"] == expected_sum(300)
    assert report["final_metrics"]["runs"] == 3
    assert report["interruptions_on_volume"] == "2"

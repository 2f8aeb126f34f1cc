"""`spotrun status` on the local spot cloud while the real agent trains: progress from the volume.

The agent (`spotrun agent run`, a real process per emulated instance) checks out a git
repository whose trainer follows the trainer protocol (it rewrites SPOTRUN_PROGRESS_FILE);
the agent records phase and progress as tags on the job's volume; status reads them through
the cloud's EC2 endpoint, with the fleet and instance found from the volume's attachment.
"""
from __future__ import annotations

import json
import time

import pytest

TRAIN_PY = '''
import json, os, signal, sys, time
path = os.environ["SPOTRUN_PROGRESS_FILE"]
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
start = time.time()
for step in range(1, 1000000):
    with open(path + ".tmp", "w") as f:
        json.dump({"epoch": 1, "epochs": 5, "step": step, "steps_per_epoch": 1000, "global_step": step,
                   "time": time.time(), "last_checkpoint_time": start}, f)
    os.replace(path + ".tmp", path)
    time.sleep(0.5)  # the "training step"
'''


@pytest.fixture
def training_job(tmp_path, aws_env):
    from spotrun.localcloud import LocalCloud, TimingModel
    from spotrun.harness.rehearsal import Rehearsal, RehearsalPlan, commit_repository

    repo = tmp_path / "repo"
    commit_repository(repo, {"train.py": TRAIN_PY}, "progress-writing trainer")
    cloud = LocalCloud(tmp_path / "cloud", TimingModel.fast()).start()
    try:
        # root: pytest's tmp_path is private to root, so "nobody" could not read the checkout.
        # Progress on the tags every 2 s instead of every minute: the test waits for the first.
        plan = RehearsalPlan(out=tmp_path / "out", job_id="op-status", interrupt_at_steps=[],
                             repository=f"file://{repo}", trainer_user="root",
                             agent_config={"agent": {"progress_tag_interval_s": 2.0}})
        Rehearsal(plan, cloud=cloud).start()
        yield cloud, plan.job_id
    finally:
        cloud.stop()


@pytest.mark.loopdev
def test_status_shows_progress_while_the_agent_trains(training_job, spotrun):
    cloud, job_id = training_job
    argv = ("status", "--json", "--job", job_id, "--region", cloud.region, "--endpoint-url", cloud.ec2_endpoint)
    deadline = time.monotonic() + 240
    view = {}
    # Poll the real condition (the agent's next progress tag) with a deadline.
    while time.monotonic() < deadline:
        code, out, err = spotrun(*argv)
        assert code == 0, err
        view = json.loads(out)
        if view["agent"]["progress"].get("step"):
            break
        time.sleep(2)
    agent = view["agent"]
    assert agent["phase"] == "training", view
    assert agent["progress"]["epoch"] == 1 and agent["progress"]["step"] > 0
    assert agent["checkpoint_age_s"] is not None and agent["failure"] is None
    [volume] = view["volumes"]
    assert volume["state"] == "in-use" and volume["attached_to"]
    assert [i["id"] for i in view["instances"] if i["state"] == "running"] == volume["attached_to"]
    assert [c["kind"] for c in view["capacity"]] == ["spot-fleet"]
    code, text, _ = spotrun(*[a for a in argv if a != "--json"])
    assert code == 0 and "phase          training" in text and "epoch 1/5" in text

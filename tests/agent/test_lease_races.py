"""Issue 21's races on the local spot cloud, each agent a real process on its own instance
(tests/agent/helpers/race_agent.py: c2_agent with a pause point and a transient NotFound),
judged from what EC2 and DynamoDB hold afterwards, the AWS calls each process made, and the
files on the surviving volume:

- a transient NotFound for a live holder does not make a second winner (defect 1), and the
  loser gets out of the way within its bound, having changed nothing;
- a holder whose lease was taken deletes nothing (the fencing generation);
- without a table, a replacement that waited for the old instance to finish verifying its
  copy does not delete that copy from its stale plan (defect 2).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import c2_cloud  # noqa: E402
from c2_cloud import JOB, wait_until, world  # noqa: E402,F401

from spotrun import lease  # noqa: E402
from spotrun import migration as M  # noqa: E402
from spotrun import tags as T  # noqa: E402
from spotrun.localcloud.faultagent import RECORD_CALLS_ENV  # noqa: E402
from spotrun_trainer.store import CheckpointStore  # noqa: E402

pytestmark = pytest.mark.loopdev

RACE_AGENT = Path(__file__).parent / "helpers" / "race_agent.py"
TABLE = "leases"
READ_ONLY = {"dynamodb:GetItem", "ec2:DescribeInstances", "ec2:DescribeVolumes",
             "ec2:DescribeSnapshots", "ec2:DescribeTags"}


@pytest.fixture
def racing(world, monkeypatch):
    monkeypatch.setattr(c2_cloud, "AGENT", RACE_AGENT)
    return world


def seed(world, config_extra=None):
    """The job's volume in us-east-1a with a data set and checkpoint 7, released."""
    inst = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    run = world.run(inst, "--write", "datasets/data.txt=precious", "--checkpoint", "7",
                    "--release", "--snapshot", "no",
                    config=world.config(inst, **(config_extra or {})))
    assert run.rc == 0, run.stderr[-3000:]
    return run.result["volume_id"]


def paused(world, inst, go: Path, point: str, *args, config_extra=None):
    proc = world.start(inst, *args, config=world.config(inst, **(config_extra or {})),
                       env={"RACE_PAUSE_AT": point, "RACE_GO_FILE": str(go)})
    wait_until(lambda: Path(f"{go}.paused").exists() or proc.poll() is not None, timeout=120,
               what=f"the agent to reach {point}")
    assert proc.poll() is None, world.log_text(proc)[-3000:]
    return proc


def calls_in(path: Path) -> set[str]:
    return {json.loads(line)["action"] for line in path.read_text().splitlines() if line} \
        if path.exists() else set()


def lease_item(world) -> dict:
    db = world.cloud.client("dynamodb", faults=False)
    item = db.get_item(TableName=TABLE, Key={"job": {"S": JOB}}, ConsistentRead=True)["Item"]
    return {k: v.get("S", v.get("N")) for k, v in item.items()}


def attached_to(volume: dict) -> str | None:
    att = [a for a in volume.get("Attachments", []) if a["State"] != "detached"]
    return att[0]["InstanceId"] if att else None


def test_a_transient_not_found_makes_no_second_winner_and_the_loser_leaves(racing, tmp_path):
    """Defect 1. Before: B's one NotFound for A made B take the lease over and migrate too;
    both copies ended attached and tagged done. Now B waits (A is seen running), gives up
    after its bound with a clear message, and made no mutating call."""
    world = racing
    world.cloud.client("dynamodb", faults=False).create_table(**lease.table_definition(TABLE))
    with_lease = {"aws": {"lease_table": TABLE}}
    source_id = seed(world, with_lease)
    inst_a = world.cloud.launch_instance(az="us-east-1b", tags={T.JOB: JOB})
    go = tmp_path / "go"
    holder = paused(world, inst_a, go, "migration.volume_created", config_extra=with_lease)
    held = lease_item(world)
    assert held["holder"] == inst_a.instance_id

    inst_b = world.cloud.launch_instance(az="us-east-1c", tags={T.JOB: JOB})
    b_calls = tmp_path / "b-calls.jsonl"
    start = time.monotonic()
    racer = world.run(inst_b, "--holder-wait", "60",
                      config=world.config(inst_b, **with_lease, lease={"loser_wait_s": 3.0}),
                      env={"RACE_NOT_FOUND": inst_a.instance_id, RECORD_CALLS_ENV: str(b_calls)})
    took = time.monotonic() - start
    assert racer.rc == 1, f"the racer did not lose: {racer.stderr[-3000:]}"
    assert f"held by instance {inst_a.instance_id} (running" in racer.stderr
    assert "terminate this instance or lower the fleet's target capacity" in racer.stderr
    assert took < 45, f"the loser took {took:.0f} s to get out of the way"
    assert calls_in(b_calls) and calls_in(b_calls) <= READ_ONLY, sorted(calls_in(b_calls))
    assert lease_item(world) == held, "the loser changed the lease"
    assert not [v for v in world.job_volumes() if v["AvailabilityZone"] == "us-east-1c"]

    go.touch()
    won = world.finish(holder)
    assert won.rc == 0, won.stderr[-3000:]
    volumes = world.job_volumes()
    assert [(v["AvailabilityZone"], attached_to(v)) for v in volumes] == \
        [("us-east-1b", inst_a.instance_id)], "not exactly one job volume, on the winner"
    assert volumes[0]["VolumeId"] != source_id
    assert (inst_a.mount_point / "datasets" / "data.txt").read_text() == "precious"
    assert CheckpointStore(inst_a.mount_point / "checkpoints").latest_valid().step == 7
    world.assert_calls_listed()


def test_a_holder_whose_lease_was_taken_deletes_nothing(racing, tmp_path):
    """The fencing generation. Before: the holder never re-checked its lease, and deleted the
    source volume after another acquisition had taken the job."""
    world = racing
    db = world.cloud.client("dynamodb", faults=False)
    db.create_table(**lease.table_definition(TABLE))
    with_lease = {"aws": {"lease_table": TABLE}}
    source_id = seed(world, with_lease)
    inst_a = world.cloud.launch_instance(az="us-east-1b", tags={T.JOB: JOB})
    go = tmp_path / "go"
    holder = paused(world, inst_a, go, "migration.before_delete", config_extra=with_lease)
    held = lease_item(world)
    # Another agent acquires the job (a takeover, as after the window): the next generation.
    thief = world.cloud.launch_instance(az="us-east-1c", tags={T.JOB: JOB})
    db.put_item(TableName=TABLE, Item={
        "job": {"S": JOB}, "holder": {"S": thief.instance_id}, "az": {"S": "us-east-1c"},
        "since": {"S": "now"}, "generation": {"N": str(int(held.get("generation", 1)) + 1)}},
        ConditionExpression="holder = :a", ExpressionAttributeValues={":a": {"S": inst_a.instance_id}})
    [copy] = [v for v in world.job_volumes() if v["VolumeId"] != source_id]
    assert M.tags_of(copy)[M.STEP] == M.STEP_VERIFIED

    go.touch()
    stopped = world.finish(holder)
    assert stopped.rc == 1, stopped.stderr[-3000:]
    assert "stopping without touching" in stopped.stderr
    volumes = {v["VolumeId"]: v for v in world.job_volumes()}
    assert source_id in volumes, "the source was deleted by a holder that had lost the job"
    assert M.tags_of(volumes[copy["VolumeId"]])[M.STEP] == M.STEP_VERIFIED, "journal written"
    assert lease_item(world)["holder"] == thief.instance_id


def test_no_table_replacement_during_verify_keeps_the_proven_copy(racing, tmp_path):
    """Defect 2. A migrates S (us-east-1a) to N (us-east-1b) and is verifying N when B boots in
    us-east-1c. B plans "N is an unproven copy of an abandoned migration" and waits for A to
    let go; meanwhile A proves N, deletes S, trains on N and releases it. Before: B then
    deleted N from its stale plan (the job's only volume) and failed on the vanished S."""
    world = racing
    seed(world)
    inst_a = world.cloud.launch_instance(az="us-east-1b", tags={T.JOB: JOB})
    go = tmp_path / "go"
    old = paused(world, inst_a, go, "migration.mounted", "--write",
                 "datasets/after.txt=trained on the copy", "--checkpoint", "9",
                 "--release", "--snapshot", "no")
    inst_b = world.cloud.launch_instance(az="us-east-1c", tags={T.JOB: JOB})
    new = world.start(inst_b, "--holder-wait", "120",
                      config=world.config(inst_b, lease={"loser_wait_s": 100.0}))
    # Synchronisation only (the verdict below is the cloud's state and the volume's files).
    wait_until(lambda: "volume_held_wait" in world.log_text(new) or new.poll() is not None,
               timeout=120, what="the replacement to wait for the old instance")

    go.touch()
    old_run, new_run = world.finish(old), world.finish(new)
    assert old_run.rc == 0, old_run.stderr[-3000:]
    assert new_run.rc == 0, new_run.stderr[-3000:]
    volumes = world.job_volumes()
    assert [(v["AvailabilityZone"], attached_to(v)) for v in volumes] == \
        [("us-east-1c", inst_b.instance_id)], "not exactly one job volume, on the replacement"
    assert (inst_b.mount_point / "datasets" / "after.txt").read_text() == "trained on the copy"
    assert (inst_b.mount_point / "datasets" / "data.txt").read_text() == "precious"
    assert CheckpointStore(inst_b.mount_point / "checkpoints").latest_valid().step == 9
    world.assert_calls_listed()

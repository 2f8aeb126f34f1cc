"""The agent against EC2 as AWS documents it (issue 15, items 1-5), on the local cloud's EC2
layer: new resources not found for a while, mutations performed and then answered 5xx,
AttachVolume refusing with IncorrectState. Judged from the cloud's own state (its checker
view and its record of what it created), not from the agent's logs."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from c2_cloud import JOB, world  # noqa: E402,F401

from spotrun import migration as M  # noqa: E402
from spotrun import tags as T  # noqa: E402
from spotrun_trainer.store import CheckpointStore  # noqa: E402

pytestmark = pytest.mark.loopdev


def created(world, what: str) -> list[dict]:
    return [e for e in world.cloud.events if e.get("event") == what]


def first_boot(world, *args, az="us-east-1a", **config):
    inst = world.cloud.launch_instance(az=az, tags={T.JOB: JOB})
    run = world.run(inst, "--write", "datasets/data.txt=from " + az, "--checkpoint", "7", *args,
                    config=world.config(inst, **config))
    return inst, run


def cross_az_boot(world, **config):
    inst = world.cloud.launch_instance(az="us-east-1b", tags={T.JOB: JOB})
    return inst, world.run(inst, config=world.config(inst, **config))


def assert_data(inst, az="us-east-1a"):
    assert (inst.mount_point / "datasets" / "data.txt").read_text() == "from " + az
    latest = CheckpointStore(inst.mount_point / "checkpoints").latest_valid()
    assert latest is not None and latest.step == 7


def attached_to(world, volume_id: str) -> list[str]:
    volume = world.checker.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
    return [a["InstanceId"] for a in volume["Attachments"] if a["State"] != "detached"]


# -- 1. eventual consistency ------------------------------------------------------------------

def test_new_volumes_and_snapshots_not_found_for_a_while_are_waited_for(world):
    # Every new volume and snapshot is "not found" for 2 s: the first volume, the migration
    # snapshot and the migrated copy. Before: "no longer exists" at once, exit 1.
    world.cloud.ec2_faults(not_found_after_create_s=2.0)
    window = {"aws": {"retry_mode": "standard", "max_attempts": 10, "consistency_window_s": 30.0}}
    _, seed = first_boot(world, "--release", "--snapshot", "no", **window)
    assert seed.rc == 0, seed.stderr[-3000:]
    inst_b, moved = cross_az_boot(world, **window)
    assert moved.rc == 0, moved.stderr[-3000:]
    assert_data(inst_b)
    volumes = world.job_volumes()
    assert [(v["VolumeId"], v["AvailabilityZone"]) for v in volumes] == \
        [(moved.result["volume_id"], "us-east-1b")]
    assert attached_to(world, moved.result["volume_id"]) == [inst_b.instance_id]
    assert len(created(world, "volume_created")) == 2  # the first volume and its one copy
    assert len(created(world, "snapshot_created")) == 1


def test_a_volume_never_seen_is_called_gone_after_the_window_saying_how_long(world):
    world.cloud.ec2_faults(not_found_after_create_s=60.0)
    _, run = first_boot(world, aws={"consistency_window_s": 1.5})
    assert run.rc == 1
    message = [line for line in run.stderr.splitlines() if line.startswith("spotrun:")]
    assert message, run.stderr[-3000:]
    waited = re.search(r"no longer exists: EC2 did not find it for (\d+) s", message[0])
    assert waited and 1.5 <= int(waited.group(1)) <= 10, message[0]
    assert "consistency_window_s = 1.5 s" in message[0], message[0]
    assert "Traceback" not in run.stderr


# -- 2. a retried mutation that finds its own effect done -------------------------------------

def test_detach_performed_then_5xx_is_a_completed_drain(world):
    # Every DetachVolume is performed and answered 500; a retry after the detach completed
    # meets IncorrectState ('available'). Before: the drain failed (exit 1).
    world.cloud.ec2_faults(performed_then_5xx={"DetachVolume": 1.0})
    _, run = first_boot(world, "--release", "--snapshot", "no")
    assert run.rc == 0, run.stderr[-3000:]
    volume_id = run.result["volume_id"]
    assert attached_to(world, volume_id) == []
    assert world.checker.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["State"] == "available"
    assert any(e.get("event") == "ec2_fault_injected" and e.get("action") == "DetachVolume"
               for e in world.cloud.events)


def test_every_mutation_performed_then_5xx_still_drains_and_migrates_once(world):
    # Each retry meets its own effect: attach (VolumeInUse), detach (IncorrectState), tags
    # already set, deletes of what is gone, creates found by their token; new resources are
    # not listed for a second. botocore retries only once, so the agent's own rules decide.
    every = ("CreateVolume", "AttachVolume", "DetachVolume", "CreateSnapshot", "CreateTags",
             "DeleteVolume", "DeleteSnapshot")
    world.cloud.ec2_faults(performed_then_5xx={action: 1.0 for action in every},
                           not_found_after_create_s=1.0)
    config = {"aws": {"retry_mode": "standard", "max_attempts": 2, "consistency_window_s": 20.0}}
    _, seed = first_boot(world, "--release", "--snapshot", "yes", **config)
    assert seed.rc == 0, seed.stderr[-3000:]
    assert attached_to(world, seed.result["volume_id"]) == []
    inst_b, moved = cross_az_boot(world, **config)
    assert moved.rc == 0, moved.stderr[-3000:]
    assert_data(inst_b)
    assert [v["VolumeId"] for v in world.job_volumes()] == [moved.result["volume_id"]]
    assert attached_to(world, moved.result["volume_id"]) == [inst_b.instance_id]
    assert len(created(world, "volume_created")) == 2
    assert len(created(world, "snapshot_created")) == 1
    assert world.job_snapshots() == []  # the migration snapshot, deleted (retention 0)
    world.assert_calls_listed()


# -- 3. exactly one snapshot ------------------------------------------------------------------

def test_drain_snapshot_performed_then_5xx_and_not_listed_yet_is_made_once(world):
    _, seed = first_boot(world, "--release", "--snapshot", "no")
    assert seed.rc == 0, seed.stderr[-3000:]
    # Every CreateSnapshot is performed, answered 500, and the snapshot not listed for 1.5 s.
    # Before: each lookup missed it and the drain made another (several for one drain).
    world.cloud.ec2_faults(performed_then_5xx={"CreateSnapshot": 1.0}, not_found_after_create_s=1.5)
    window = {"aws": {"retry_mode": "standard", "max_attempts": 10, "consistency_window_s": 20.0}}
    inst = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    drain = world.run(inst, "--release", "--snapshot", "yes", config=world.config(inst, **window))
    assert len(created(world, "snapshot_created")) == 1
    assert drain.rc == 0, drain.stderr[-3000:]
    inst_b, moved = cross_az_boot(world, **window)  # reuses the drain's snapshot
    assert moved.rc == 0, moved.stderr[-3000:]
    assert_data(inst_b)
    assert len(created(world, "snapshot_created")) == 1


def test_migration_snapshot_performed_then_5xx_and_not_listed_yet_is_made_once(world):
    _, seed = first_boot(world, "--release", "--snapshot", "no")
    assert seed.rc == 0, seed.stderr[-3000:]
    world.cloud.ec2_faults(performed_then_5xx={"CreateSnapshot": 1.0}, not_found_after_create_s=1.5)
    window = {"aws": {"retry_mode": "standard", "max_attempts": 10, "consistency_window_s": 20.0}}
    inst_b, moved = cross_az_boot(world, **window)
    assert len(created(world, "snapshot_created")) == 1
    assert moved.rc == 0, moved.stderr[-3000:]
    assert_data(inst_b)


def test_duplicates_of_a_snapshot_keep_the_oldest_and_only_this_tokens_go(world):
    _, seed = first_boot(world, "--release", "--snapshot", "no")
    assert seed.rc == 0, seed.stderr[-3000:]
    source = world.job_volumes()[0]
    tags = M.snapshot_tags(JOB, source, M.ROLE_DRAIN_SNAPSHOT)
    # Another token (an older mount count): not a copy of this snapshot, whatever it holds.
    other = {**tags, M.CREATE_TOKEN: "spotrun-someone-elses", M.MOUNTS: "0"}

    def snapshot(with_tags):
        return world.checker.create_snapshot(VolumeId=source["VolumeId"], TagSpecifications=[
            {"ResourceType": "snapshot", "Tags": T.as_list(with_tags)}])["SnapshotId"]

    made = [snapshot(tags), snapshot(tags), snapshot(other)]
    listed = {s["SnapshotId"]: s for s in world.job_snapshots()}
    # The agent's rule: oldest first, the id deciding within EC2's one-second StartTime.
    oldest = min(made[:2], key=lambda i: (listed[i]["StartTime"], i))
    # A long retention: whatever goes, went as a duplicate, not as an expired snapshot.
    inst_b, moved = cross_az_boot(world, volume={"snapshot_retention_days": 30.0})
    assert moved.rc == 0, moved.stderr[-3000:]
    assert_data(inst_b)
    copy = world.checker.describe_volumes(VolumeIds=[moved.result["volume_id"]])["Volumes"][0]
    assert copy["SnapshotId"] == oldest
    left = sorted(s["SnapshotId"] for s in world.job_snapshots())
    assert left == sorted([oldest, made[2]])
    assert len(created(world, "snapshot_created")) == 3  # the agent made none itself


# -- 4. IncorrectState on attach ---------------------------------------------------------------

def test_attach_refused_with_incorrect_state_is_tried_again(world):
    world.cloud.ec2_faults(attach_incorrect_state=0.7, seed=1)  # the first attach is refused
    inst, run = first_boot(world)
    assert run.rc == 0, run.stderr[-3000:]
    assert attached_to(world, run.result["volume_id"]) == [inst.instance_id]
    assert any(e.get("event") == "ec2_fault_injected" and e.get("kind") == "incorrect_state"
               for e in world.cloud.events)


# -- 5. API economy ------------------------------------------------------------------------------

def test_a_same_az_first_boot_describes_the_instance_once_to_attach(world):
    inst, run = first_boot(world)
    assert run.rc == 0, run.stderr[-3000:]
    calls = [json.loads(line)["action"] for line in world.calls.read_text().splitlines() if line]
    # identify looks the instance up once, the attach once (not once per candidate name).
    assert calls.count("ec2:DescribeInstances") <= 2, calls
    assert len(calls) <= 25, calls

"""Issue 19, "data once, volumes per job": a sweep's dataset is prepared once on a volume and
snapshotted (`spotrun init`); each experiment's first volume is made from that snapshot
(``volume.source_snapshot``) by the instance that first claims it, in its own zone.

On the local spot cloud (moto + EBS images on real loop devices), the agent a real process
per instance (tests/agent/helpers/c2_agent.py). Judged from EC2's state, the cloud's call
ledger and the volume images' own bytes, never from the agent's logs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from c2_cloud import JOB, wait_until, world  # noqa: E402,F401

from spotrun import ec2 as ec2mod  # noqa: E402
from spotrun import migration as M  # noqa: E402
from spotrun import tags as T  # noqa: E402
from spotrun.localcloud.ledger import calls, performed  # noqa: E402
from spotrun.harness.rehearsal_volume import VolumeImage  # noqa: E402
# The dataset volume prepared the seed's way, shared with `make demo-sweep`.
from spotrun.harness.soaksweep import prepare_dataset_volume  # noqa: E402

pytestmark = pytest.mark.loopdev

SWEEP = JOB.rsplit("-", 1)[0]  # the experiment JOB is "<sweep>-accept"
DATASET = os.urandom(96 * 1024)  # what the dataset volume holds: random, so no accident matches


def dataset_snapshot(world, tmp_path: Path, *, files: dict[str, bytes] | None = None,
                     formatted: bool = True) -> str:
    """The user's volume prepared the seed's way (an ext4 filesystem with datasets/), and the
    sweep's snapshot of it as `spotrun init` makes it (tagged with the sweep's id)."""
    ec2 = world.checker
    volume_id = prepare_dataset_volume(
        ec2, world.cloud.dataplane.volume_path, "us-east-1a",
        (files or {"datasets/train.bin": DATASET}) if formatted else None)
    snapshot_id = ec2.create_snapshot(VolumeId=volume_id, TagSpecifications=[{
        "ResourceType": "snapshot", "Tags": T.as_list({
            T.JOB: SWEEP, T.ROLE: T.DATASET_SNAPSHOT_ROLE})}])["SnapshotId"]
    ec2mod.wait_for_snapshot(ec2, snapshot_id, 60, poll_s=0.5)
    return snapshot_id


def experiment_config(world, inst, snapshot_id: str) -> dict:
    return world.config(inst, volume={"source_snapshot": snapshot_id})


def image_of(world, volume_id: str) -> VolumeImage:
    return VolumeImage(world.cloud.dataplane.volume_path(volume_id))


def dataset_snapshot_kept(world, snapshot_id: str) -> bool:
    found = ec2mod.describe_snapshot(world.checker, snapshot_id)
    return found is not None and found["State"] == "completed"


def test_the_first_volume_is_made_from_the_dataset_snapshot_and_holds_its_bytes(world, tmp_path):
    snapshot_id = dataset_snapshot(world, tmp_path)
    inst = world.cloud.launch_instance(az="us-east-1b", tags={T.JOB: JOB})
    run = world.run(inst, "--release", "--snapshot", "no",
                    config=experiment_config(world, inst, snapshot_id))
    assert run.rc == 0, run.stderr[-3000:]
    assert run.result["created"] is True and run.result["migrated"] is False

    [volume] = world.job_volumes()
    assert volume["VolumeId"] == run.result["volume_id"]
    assert (volume["AvailabilityZone"], volume.get("SnapshotId")) == ("us-east-1b", snapshot_id)
    assert M.tags_of(volume)[M.ORIGIN] == M.FROM_DATASET[M.ORIGIN]
    # The bytes on the experiment's own volume image: the dataset, as prepared; and the
    # agent's marker for this experiment next to it (verify_volume accepted the first mount).
    image = image_of(world, volume["VolumeId"])
    assert image.read(["datasets/train.bin"]) == {"datasets/train.bin": DATASET}
    marker = image.read([".spotrun-volume.json"])[".spotrun-volume.json"]
    assert f'"job": "{JOB}"'.encode() in marker
    # One CreateVolume by the instance, from the snapshot; no filesystem made over it.
    ledger = world.cloud.ledger()
    creates = [r for r in calls(ledger, "CreateVolume", caller_instance=inst.instance_id)
               if performed(r)]
    assert len(creates) == 1 and snapshot_id in creates[0]["resources"]
    assert dataset_snapshot_kept(world, snapshot_id)
    world.assert_calls_listed()


def test_a_never_mounted_dataset_volume_elsewhere_is_made_again_here_not_migrated(world, tmp_path):
    """The experiment's first boot made its volume from the dataset snapshot and died before
    mounting it; the next claim is in another zone. Nothing on that volume is the job's: it is
    made again there from the dataset snapshot (no migration snapshot), the unused one deleted,
    and the sweep's dataset snapshot kept."""
    snapshot_id = dataset_snapshot(world, tmp_path)
    world.cloud.ec2_faults(server_error=1.0, actions=("AttachVolume",))
    inst_a = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    first = world.start(inst_a, config=experiment_config(world, inst_a, snapshot_id))
    wait_until(lambda: "volume_created" in world.log_text(first), timeout=120,
               what="the first boot to create the experiment's volume")
    first.kill()
    world.finish(first)
    world.cloud.terminate(inst_a.instance_id)
    world.cloud.ec2_faults()
    [unused] = world.job_volumes()
    assert unused["AvailabilityZone"] == "us-east-1a" and unused.get("SnapshotId") == snapshot_id
    assert M.mounts(unused) == 0

    inst_b = world.cloud.launch_instance(az="us-east-1b", tags={T.JOB: JOB})
    run = world.run(inst_b, "--release", "--snapshot", "no",
                    config=experiment_config(world, inst_b, snapshot_id))
    assert run.rc == 0, run.stderr[-3000:]
    [volume] = world.job_volumes()
    assert volume["VolumeId"] != unused["VolumeId"]
    assert (volume["AvailabilityZone"], volume.get("SnapshotId")) == ("us-east-1b", snapshot_id)
    assert M.generation(volume) == 1 and M.SOURCE_VOLUME not in M.tags_of(volume)
    ledger = world.cloud.ledger()
    by_b = [r for r in calls(ledger, caller_instance=inst_b.instance_id) if performed(r)]
    assert [r for r in by_b if r["action"] == "CreateSnapshot"] == []  # nothing migrated
    assert any(r["action"] == "DeleteVolume" and unused["VolumeId"] in r["resources"] for r in by_b)
    assert [r for r in calls(ledger, "DeleteSnapshot") if snapshot_id in r["resources"]] == []
    assert dataset_snapshot_kept(world, snapshot_id)
    assert image_of(world, volume["VolumeId"]).read(["datasets/train.bin"]) == \
        {"datasets/train.bin": DATASET}
    world.assert_calls_listed()


@pytest.mark.parametrize("case", ["no-filesystem", "a-checkpoint"])
def test_a_dataset_snapshot_that_is_not_a_dataset_is_refused_and_nothing_is_written(
        world, tmp_path, case):
    """A dataset volume never formatted, or one holding checkpoints (every experiment would
    resume another job's training): the first mount stops with an error naming the snapshot,
    and the volume's bytes are left as restored."""
    if case == "no-filesystem":
        snapshot_id = dataset_snapshot(world, tmp_path, formatted=False)
    else:
        snapshot_id = dataset_snapshot(world, tmp_path, files={
            "datasets/train.bin": DATASET, "checkpoints/ckpt-00000007/manifest.json": b"{}"})
    inst = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    run = world.run(inst, config=experiment_config(world, inst, snapshot_id))
    assert run.rc == 1, run.stdout + run.stderr[-3000:]
    assert snapshot_id in run.stderr
    [volume] = world.job_volumes()
    assert volume.get("SnapshotId") == snapshot_id
    image = world.cloud.dataplane.volume_path(volume["VolumeId"])
    if case == "no-filesystem":
        assert "no filesystem" in run.stderr and "dataset" in run.stderr
        probe = subprocess.run(["blkid", "-p", str(image)], capture_output=True, text=True)
        assert probe.returncode == 2, probe.stdout  # still nothing: no mkfs over restored data
    else:
        assert "more than a dataset" in run.stderr
        assert VolumeImage(image).read([".spotrun-volume.json"]) == {}  # no marker written


def test_only_a_volume_made_from_the_dataset_and_never_mounted_counts_as_never_used():
    tags = {T.JOB: JOB, M.MOUNTS: "0", **M.FROM_DATASET}
    volume = {"VolumeId": "vol-0123456789abcdef0", "SnapshotId": "snap-0123456789abcdef0",
              "Tags": T.as_list(tags)}
    assert M.never_used(volume)
    assert not M.never_used({**volume, "Tags": T.as_list({**tags, M.MOUNTS: "1"})})
    assert not M.never_used({**volume, "SnapshotId": ""})
    assert not M.never_used({**volume, "Tags": T.as_list({T.JOB: JOB, M.MOUNTS: "0"})})

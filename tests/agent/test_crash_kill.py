"""Kill at every step of the migration: for each crash point in spotrun.crashpoints.CRASHPOINTS
(enumerated from the code, so a new step without a kill test fails here), SIGKILL the agent
migrating a volume from AZ a to AZ b exactly there; then a fresh agent on the same instance,
or on a new instance in a third AZ (the killed one terminated), completes the migration:
the data is intact, exactly one job volume survives, no orphaned volume or snapshot."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from c2_cloud import JOB, world  # noqa: E402,F401

from spotrun import crashpoints  # noqa: E402
from spotrun.localcloud.faultagent import CRASH_ENV  # noqa: E402
from spotrun import migration as M  # noqa: E402
from spotrun import tags as T  # noqa: E402
from spotrun_trainer.store import CheckpointStore  # noqa: E402

pytestmark = pytest.mark.loopdev


@pytest.mark.parametrize("resume", ["same-instance", "third-az"])
@pytest.mark.parametrize("point", crashpoints.CRASHPOINTS)
def test_kill_at_every_step_then_resume(world, point, resume):
    seed_inst = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    seeded = world.run(seed_inst, "--write", "datasets/data.txt=precious", "--checkpoint", "7",
                       "--release", "--snapshot", "no")
    assert seeded.rc == 0, seeded.stderr[-3000:]
    source_id = seeded.result["volume_id"]

    inst_b = world.cloud.launch_instance(az="us-east-1b", tags={T.JOB: JOB})
    killed = world.run(inst_b, env={CRASH_ENV: point})
    assert killed.rc == -signal.SIGKILL, f"not killed at {point}: {killed.stderr[-3000:]}"
    # Until the copy is verified, the source volume must still be there (invariant 2).
    survivors = {v["VolumeId"] for v in world.job_volumes()}
    if crashpoints.CRASHPOINTS.index(point) < crashpoints.CRASHPOINTS.index("migration.after_delete"):
        assert source_id in survivors

    if resume == "same-instance":
        final_inst = inst_b
    else:
        world.cloud.terminate(inst_b.instance_id)
        final_inst = world.cloud.launch_instance(az="us-east-1c", tags={T.JOB: JOB})
    resumed = world.run(final_inst)
    assert resumed.rc == 0, resumed.stderr[-3000:]

    assert (final_inst.mount_point / "datasets" / "data.txt").read_text() == "precious"
    latest = CheckpointStore(final_inst.mount_point / "checkpoints").latest_valid()
    assert latest is not None and latest.step == 7
    volumes = world.job_volumes()
    assert [(v["VolumeId"], v["AvailabilityZone"]) for v in volumes] == \
        [(resumed.result["volume_id"], final_inst.az)], "not exactly one job volume"
    assert M.tags_of(volumes[0])[M.STEP] == M.STEP_DONE
    assert "filesystem_made" not in resumed.events(), "mkfs on restored data"
    # Every volume ever made for the job is either the survivor or deleted: no orphan.
    everything = world.checker.describe_volumes()["Volumes"]
    orphans = [v["VolumeId"] for v in everything
               if v["State"] not in ("deleting", "deleted") and M.CREATE_TOKEN in M.tags_of(v)
               and v["VolumeId"] != volumes[0]["VolumeId"]]
    assert orphans == []
    assert world.job_snapshots() == [], "snapshots kept past a retention of 0"
    world.assert_calls_listed()

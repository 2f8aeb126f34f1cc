"""release() and record() in-process on the local cloud, and fsck after an unclean end."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from c2_cloud import JOB, world  # noqa: E402,F401

from spotrun import blockdev  # noqa: E402
from spotrun import config as configmod  # noqa: E402
from spotrun import lease  # noqa: E402
from spotrun import migration as M  # noqa: E402
from spotrun import tags as T  # noqa: E402
from spotrun.identity import Identity  # noqa: E402
from spotrun.localcloud.instance import DUMMY_CREDENTIALS  # noqa: E402
from spotrun.volumes import VolumeManager  # noqa: E402

pytestmark = pytest.mark.loopdev


def manager(world, inst, monkeypatch, **sections) -> VolumeManager:
    for key, value in DUMMY_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    config = configmod.from_mapping(world.config(inst, **sections), "test")
    identity = Identity(inst.instance_id, inst.region, inst.az, inst.az_id, inst.instance_type,
                        inst.account_id)
    return VolumeManager(config, identity, holder_wait_s=10, lease_poll_s=0.1)


def test_release_unmounts_snapshots_detaches_and_frees_the_lease(world, monkeypatch):
    world.cloud.client("dynamodb", faults=False).create_table(**lease.table_definition("leases"))
    inst = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    volumes = manager(world, inst, monkeypatch, aws={"lease_table": "leases"})
    acquired = volumes.acquire()
    assert volumes.acquire() is acquired, "a second acquire is not a no-op"
    volumes.record(phase="training", **{T.PROGRESS: '{"epoch":1}'})
    tags = M.tags_of(world.job_volumes()[0])
    assert tags[T.PHASE] == "training" and tags[T.PROGRESS] == '{"epoch":1}'
    assert tags[T.INSTANCE] == inst.instance_id and tags[M.MOUNT_STATE] == f"mounted:{inst.instance_id}"

    volumes.release()
    assert not blockdev.is_mounted(inst.mount_point)
    volume = world.job_volumes()[0]
    assert volume["State"] == "available" and not volume.get("Attachments")
    assert M.tags_of(volume)[M.MOUNT_STATE] == M.CLEAN
    snapshots = world.job_snapshots()
    assert [M.tags_of(s)[T.ROLE] for s in snapshots] == [M.ROLE_DRAIN_SNAPSHOT]
    assert M.tags_of(snapshots[0])[M.SOURCE_VOLUME] == acquired.volume_id
    table = world.cloud.client("dynamodb", faults=False)
    # Released: nobody holds it, and the item keeps counting generations for the next holder.
    item = table.get_item(TableName="leases", Key={"job": {"S": JOB}}, ConsistentRead=True)["Item"]
    assert "holder" not in item and item["generation"] == {"N": "1"}

    volumes.release()  # idempotent: nothing attached, nothing held
    assert len(world.job_snapshots()) == 1
    # Progress can still be recorded on the released volume (completion is recorded last).
    volumes.record(phase="done")
    assert M.tags_of(world.job_volumes()[0])[T.PHASE] == "done"


def test_unclean_end_gets_fsck_before_the_next_mount(world):
    inst = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    first = world.run(inst, "--write", "datasets/data.txt=kept")
    assert first.rc == 0, first.stderr[-3000:]
    world.cloud.terminate(inst.instance_id)  # no unmount by the agent: the filesystem is dirty
    inst2 = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    second = world.run(inst2)
    assert second.rc == 0, second.stderr[-3000:]
    events = second.events()
    assert "fsck_needed" in events and events.index("fsck_done") < events.index("mounted")
    assert (inst2.mount_point / "datasets" / "data.txt").read_text() == "kept"
    assert second.result["volume_id"] == first.result["volume_id"]

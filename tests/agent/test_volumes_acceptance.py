"""Acceptance on the local spot cloud (moto + fault proxy + EBS on real loop devices): the
agent's volume handling run as a real process per instance (tests/agent/helpers/c2_agent.py).
Every AWS call those processes make is recorded and must be in iam.AGENT_CALLS."""
from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from c2_cloud import JOB, USER, wait_until, world  # noqa: E402,F401

from spotrun import lease  # noqa: E402
from spotrun import migration as M  # noqa: E402
from spotrun import tags as T  # noqa: E402
from spotrun_trainer.store import CheckpointStore  # noqa: E402

pytestmark = pytest.mark.loopdev


def seed(world, az="us-east-1a", *, config_extra=None, release=True, snapshot="no"):
    """A first boot in ``az``: create the volume, write data and a checkpoint, release it."""
    inst = world.cloud.launch_instance(az=az, tags={T.JOB: JOB})
    args = ["--write", "datasets/data.txt=from " + az, "--checkpoint", "7"]
    if release:
        args += ["--release", "--snapshot", snapshot]
    run = world.run(inst, *args, config=world.config(inst, **(config_extra or {})))
    assert run.rc == 0, run.stderr[-3000:]
    assert run.result["created"] is True
    return inst, run


def assert_data(inst, az="us-east-1a"):
    assert (inst.mount_point / "datasets" / "data.txt").read_text() == "from " + az
    latest = CheckpointStore(inst.mount_point / "checkpoints").latest_valid()
    assert latest is not None and latest.step == 7


def test_same_az_boot_then_second_boot_is_a_no_op(world):
    inst, first = seed(world, release=False)
    volume_id = first.result["volume_id"]
    assert Path(first.result["mount_point"]) == inst.mount_point
    nobody = pwd.getpwnam(USER)
    for sub in ("datasets", "checkpoints"):
        stat = os.stat(inst.mount_point / sub)
        assert (stat.st_uid, stat.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    marker = (inst.mount_point / ".spotrun-volume.json").read_text()
    assert f'"job": "{JOB}"' in marker
    tags_before = M.tags_of(world.job_volumes()[0])

    again = world.run(inst)
    assert again.rc == 0, again.stderr[-3000:]
    assert again.result == {**first.result, "created": False}
    assert "volume_already_mounted" in again.events() and "filesystem_made" not in again.events()
    assert M.tags_of(world.job_volumes()[0])[M.MOUNTS] == tags_before[M.MOUNTS] == "1"
    assert [v["VolumeId"] for v in world.job_volumes()] == [volume_id]
    assert_data(inst)
    world.assert_calls_listed()


def test_cross_az_boot_moves_the_data_and_keeps_one_volume(world):
    _, first = seed(world)
    inst_b = world.cloud.launch_instance(az="us-east-1b", tags={T.JOB: JOB})
    run = world.run(inst_b)
    assert run.rc == 0, run.stderr[-3000:]
    assert run.result["migrated"] is True and run.result["generation"] == 2
    assert_data(inst_b)
    volumes = world.job_volumes()
    assert [(v["VolumeId"], v["AvailabilityZone"]) for v in volumes] == \
        [(run.result["volume_id"], "us-east-1b")]
    assert run.result["volume_id"] != first.result["volume_id"]
    events = run.events()
    # The old volume goes only after the new one is mounted and verified (invariant 2).
    assert events.index("mounted") < events.index("checkpoint_verified") \
        < events.index("volume_verified") < events.index("volume_deleted")
    assert "filesystem_made" not in events
    assert world.job_snapshots() == [], "migration snapshot kept past a retention of 0"
    world.assert_calls_listed()


def test_api_faults_still_boot_and_create_nothing_twice(world):
    seed(world)
    world.cloud.ec2_faults(throttle=0.3, performed_then_5xx={"AttachVolume": 0.1, "CreateVolume": 0.1},
                           seed=3)
    inst_b = world.cloud.launch_instance(az="us-east-1b", tags={T.JOB: JOB})
    run = world.run(inst_b)
    assert run.rc == 0, run.stderr[-3000:]
    assert_data(inst_b)
    assert len(world.job_volumes()) == 1


def test_every_create_and_attach_answered_5xx_after_doing_it(world):
    world.cloud.ec2_faults(performed_then_5xx={"AttachVolume": 1.0, "CreateVolume": 1.0,
                                               "CreateSnapshot": 1.0})
    seed(world)
    inst_b = world.cloud.launch_instance(az="us-east-1b", tags={T.JOB: JOB})
    run = world.run(inst_b)
    assert run.rc == 0, run.stderr[-3000:]
    assert "create_found_after_failure" in run.events()
    assert "call_performed_despite_error" in run.events()
    assert_data(inst_b)
    assert len(world.job_volumes()) == 1
    world.assert_calls_listed()


def test_replacement_waits_for_the_drain_and_gets_the_final_checkpoint(world, tmp_path):
    inst_a = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    go = tmp_path / "go"
    old = world.start(inst_a, "--write", "datasets/data.txt=from us-east-1a", "--checkpoint", "7",
                      "--hold-until", str(go), "--release")
    wait_until(lambda: '"holding"' in Path(old.c2_files[0].name).read_text(), timeout=120,
               what="the old instance to hold the volume")
    inst_b = world.cloud.launch_instance(az="us-east-1b", tags={T.JOB: JOB})
    new = world.start(inst_b)
    wait_until(lambda: "volume_held_wait" in world.log_text(new), timeout=120,
               what="the new instance to wait for the holder")
    # The old instance writes its final checkpoint while the new one waits.
    (inst_a.mount_point / "checkpoints" / "final.txt").write_text("final")
    go.touch()
    old_run, new_run = world.finish(old), world.finish(new)
    assert old_run.rc == 0, old_run.stderr[-3000:]
    assert new_run.rc == 0, new_run.stderr[-3000:]
    assert (inst_b.mount_point / "checkpoints" / "final.txt").read_text() == "final"
    assert_data(inst_b)
    # The drain snapshot made ahead of need was the one the migration used.
    assert "snapshot_reused" in new_run.events() and "snapshot_started" not in new_run.events()
    assert len(world.job_volumes()) == 1
    world.assert_calls_listed()


def test_race_two_agents_in_two_azs_one_wins(world):
    world.cloud.client("dynamodb", faults=False).create_table(**lease.table_definition("leases"))
    with_lease = {"aws": {"lease_table": "leases"}}
    seed(world, config_extra=with_lease)
    instances = [world.cloud.launch_instance(az=az, tags={T.JOB: JOB})
                 for az in ("us-east-1b", "us-east-1c")]
    procs = [world.start(i, "--holder-wait", "5", config=world.config(i, **with_lease))
             for i in instances]
    runs = [world.finish(p) for p in procs]
    assert sorted(r.rc for r in runs) == [0, 1], [r.stderr[-2000:] for r in runs]
    winner, loser = (runs[0], runs[1]) if runs[0].rc == 0 else (runs[1], runs[0])
    winner_inst = instances[runs.index(winner)]
    assert "is held by instance " + winner_inst.instance_id in loser.stderr
    assert_data(winner_inst)
    volumes = world.job_volumes()
    assert [v["AvailabilityZone"] for v in volumes] == [winner_inst.az]
    world.assert_calls_listed()


# -- bad input: a clear error naming what is wrong, non-zero exit, nothing deleted -----------

def test_no_volume_and_creation_disabled(world):
    table = world.cloud.client("dynamodb", faults=False)
    table.create_table(**lease.table_definition("leases"))
    inst = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    run = world.run(inst, config=world.config(inst, volume={"create_if_missing": False},
                                              aws={"lease_table": "leases"}))
    assert run.rc == 1
    assert "volume.create_if_missing is false" in run.stderr and "DL-datasets-checkpoints" in run.stderr
    assert world.job_volumes() == []
    # A failed acquire with nothing attached does not keep the job locked.
    item = table.get_item(TableName="leases", Key={"job": {"S": JOB}}, ConsistentRead=True)["Item"]
    assert "holder" not in item


def test_two_unrelated_volumes_are_left_alone(world):
    ec2 = world.checker
    ids = []
    for az in ("us-east-1a", "us-east-1b"):
        ids.append(ec2.create_volume(AvailabilityZone=az, Size=1, TagSpecifications=[{
            "ResourceType": "volume", "Tags": T.as_list({T.NAME: "DL-datasets-checkpoints",
                                                         T.JOB: JOB})}])["VolumeId"])
    inst = world.cloud.launch_instance(az="us-east-1c", tags={T.JOB: JOB})
    run = world.run(inst)
    assert run.rc == 1 and "no migration journal links them" in run.stderr
    assert all(i in run.stderr for i in ids)
    assert sorted(v["VolumeId"] for v in world.job_volumes()) == sorted(ids)
    assert world.job_snapshots() == []


def test_device_that_never_appears(world, tmp_path):
    _, first = seed(world)
    inst_b = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    elsewhere = tmp_path / "no-devices-here"
    elsewhere.mkdir()
    run = world.run(inst_b, config=world.config(
        inst_b, volume={"device_dir": str(elsewhere), "device_timeout_s": 1.0}))
    assert run.rc == 1
    assert f"volume {first.result['volume_id']}: no device appeared within 1 s" in run.stderr
    assert [v["VolumeId"] for v in world.job_volumes()] == [first.result["volume_id"]]


def test_metadata_service_down(world):
    inst = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    world.cloud.imds_fault(inst.instance_id, "refused", duration_s=120)
    run = world.run(inst, config=world.config(inst, metadata={"deadline_s": 2.0}))
    assert run.rc == 1
    assert "metadata" in run.stderr.lower() and inst.imds_endpoint.split("//")[1] in run.stderr
    assert world.job_volumes() == []


def test_volume_in_error_is_named_and_kept(world):
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.elastic_block_store import Volume

    class VolumeInError(Volume):
        @property
        def status(self) -> str:
            return "error"

    created = world.cloud.moto_client("ec2").create_volume(
        AvailabilityZone="us-east-1a", Size=1, TagSpecifications=[{"ResourceType": "volume", "Tags": T.as_list(
            {T.NAME: "DL-datasets-checkpoints", T.JOB: JOB})}])
    # moto cannot fail a volume; EC2 can (a failed restore): make this one report 'error'.
    ec2_backends[world.cloud.account_id][world.cloud.region].volumes[created["VolumeId"]].__class__ = VolumeInError
    assert world.job_volumes()[0]["State"] == "error"
    inst = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    run = world.run(inst)
    assert run.rc == 1 and f"job volume {created['VolumeId']} is in state 'error'" in run.stderr
    assert [v["VolumeId"] for v in world.job_volumes()] == [created["VolumeId"]]


def test_a_first_volume_never_mounted_is_not_migrated_but_the_job_starts_over_here(world):
    """Found by the soak (long profile, seed 1, job 8): the job's first boot created its volume
    and died before formatting it (a notice during acquire; AttachVolume answered 5xx). The
    replacement in another AZ migrated the blank volume, found no filesystem on the restored
    copy, refused to make one over restored data, and crash-looped with two volumes of the job."""
    world.cloud.ec2_faults(server_error=1.0, actions=("AttachVolume",))
    inst_a = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    first = world.start(inst_a)
    wait_until(lambda: "volume_created" in world.log_text(first), timeout=120,
               what="the first boot to create the job's volume")
    first.kill()
    world.finish(first)
    world.cloud.terminate(inst_a.instance_id)
    world.cloud.ec2_faults()
    [blank] = world.job_volumes()
    assert M.mounts(blank) == 0
    # What an agent before this fix left on its way: a migration snapshot of the blank volume.
    world.checker.create_snapshot(VolumeId=blank["VolumeId"], TagSpecifications=[{
        "ResourceType": "snapshot", "Tags": T.as_list(
            M.snapshot_tags(JOB, blank, M.ROLE_MIGRATION_SNAPSHOT))}])

    inst_b = world.cloud.launch_instance(az="us-east-1b", tags={T.JOB: JOB})
    run = world.run(inst_b, "--write", "datasets/data.txt=from us-east-1b")
    assert run.rc == 0, run.stderr[-3000:]
    assert run.result["created"] is True and run.result["migrated"] is False
    assert "migration_start" not in run.events()
    [volume] = world.job_volumes()
    assert volume["AvailabilityZone"] == "us-east-1b" and volume["VolumeId"] != blank["VolumeId"]
    assert world.job_snapshots() == []
    assert (inst_b.mount_point / "datasets" / "data.txt").read_text() == "from us-east-1b"
    world.assert_calls_listed()


def test_only_a_volume_the_agent_created_empty_counts_as_never_used(world):
    """`spotrun init` creates the volume and the user may fill it by hand before the first
    boot: only a volume the agent itself created empty may be started over."""
    ec2 = world.checker
    volume_id = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1, VolumeType="gp3",
                                  TagSpecifications=[{"ResourceType": "volume", "Tags": T.as_list(
                                      {T.NAME: "DL-datasets-checkpoints", T.JOB: JOB,
                                       T.ROLE: "volume", T.GENERATION: "0"})}])["VolumeId"]
    wait_until(lambda: world.job_volumes()[0]["State"] == "available", timeout=60,
               what="the operator's volume")
    [volume] = world.job_volumes()
    assert not M.never_used(volume)
    assert M.never_used({**volume, "Tags": T.as_list({**M.tags_of(volume), **M.CREATED_EMPTY})})
    assert not M.never_used({**volume, "SnapshotId": "snap-1",
                             "Tags": T.as_list({**M.tags_of(volume), **M.CREATED_EMPTY})})
    assert volume_id == volume["VolumeId"]


def _operator_volume(world, az="us-east-1a", *, filled_with: Path | None = None) -> str:
    """A volume as `spotrun init` makes it (tags, generation 0, no filesystem); ``filled_with``
    stands for an operator who formatted it and copied a data set on by hand before the first
    boot, as the blog's steps do."""
    volume_id = world.checker.create_volume(
        AvailabilityZone=az, Size=1, VolumeType="gp3", TagSpecifications=[{
            "ResourceType": "volume", "Tags": T.as_list({
                T.NAME: "DL-datasets-checkpoints", T.JOB: JOB, T.ROLE: "volume",
                T.GENERATION: "0"})}])["VolumeId"]
    wait_until(lambda: world.job_volumes()[0]["State"] == "available", timeout=60,
               what="the operator's volume")
    if filled_with is not None:
        image = world.cloud.dataplane.volume_path(volume_id)
        subprocess.run(["mkfs.ext4", "-F", "-q", "-d", str(filled_with), str(image)], check=True)
    return volume_id


def test_an_operator_volume_never_formatted_is_formatted_after_it_moves(world):
    """Found in review: `spotrun init` leaves the volume unformatted (the agent formats it on
    first attach). A first boot in another AZ migrated it, found no filesystem on the restored
    copy, refused to make one over "restored data" and crash-looped. A copy of a volume spotrun
    never mounted holds what its source held: nothing, here; the copy is formatted as the
    source would have been, and the source, proven copied, is deleted."""
    source_id = _operator_volume(world)
    inst_b = world.cloud.launch_instance(az="us-east-1b", tags={T.JOB: JOB})
    run = world.run(inst_b, "--write", "datasets/data.txt=from us-east-1b", "--checkpoint", "3")
    assert run.rc == 0, run.stderr[-3000:]
    assert run.result["migrated"] is True and run.result["created"] is False
    assert "filesystem_made" in run.events()
    [volume] = world.job_volumes()
    assert volume["AvailabilityZone"] == "us-east-1b" and volume["VolumeId"] != source_id
    assert M.tags_of(volume)[M.SOURCE_VOLUME] == source_id
    assert f'"job": "{JOB}"' in (inst_b.mount_point / ".spotrun-volume.json").read_text()
    again = world.run(inst_b)
    assert again.rc == 0, again.stderr[-3000:]
    assert (inst_b.mount_point / "datasets" / "data.txt").read_text() == "from us-east-1b"
    assert CheckpointStore(inst_b.mount_point / "checkpoints").latest_valid().step == 3
    world.assert_calls_listed()


def test_an_operator_volume_filled_by_hand_moves_with_its_data(world, tmp_path):
    """The same first boot in another AZ, for a volume the operator formatted and filled by hand
    (no marker on it yet): its data set arrives and the copy is taken as the job's."""
    hand = tmp_path / "by-hand"
    (hand / "datasets").mkdir(parents=True)
    (hand / "datasets" / "data.txt").write_text("from the operator")
    source_id = _operator_volume(world, filled_with=hand)
    inst_b = world.cloud.launch_instance(az="us-east-1b", tags={T.JOB: JOB})
    run = world.run(inst_b)
    assert run.rc == 0, run.stderr[-3000:]
    assert run.result["migrated"] is True and "filesystem_made" not in run.events()
    [volume] = world.job_volumes()
    assert volume["AvailabilityZone"] == "us-east-1b" and volume["VolumeId"] != source_id
    assert (inst_b.mount_point / "datasets" / "data.txt").read_text() == "from the operator"
    assert f'"job": "{JOB}"' in (inst_b.mount_point / ".spotrun-volume.json").read_text()


def test_a_copy_without_a_filesystem_of_a_volume_spotrun_mounted_is_refused(world):
    """The refusal stays where it protects data: a restored copy with no filesystem, of a
    source spotrun had mounted, is not formatted and the source is kept."""
    _, first = seed(world)
    source_id = first.result["volume_id"]
    assert M.mounts(world.job_volumes()[0]) == 1
    subprocess.run(["wipefs", "-a", "-q", str(world.cloud.dataplane.volume_path(source_id))],
                   check=True)
    inst_b = world.cloud.launch_instance(az="us-east-1b", tags={T.JOB: JOB})
    run = world.run(inst_b)
    assert run.rc != 0
    assert "no filesystem; refusing to make one over restored data" in run.stderr
    assert source_id in {v["VolumeId"] for v in world.job_volumes()}


def test_pruning_a_snapshot_whose_delete_answered_5xx_after_doing_it(world):
    """DeleteSnapshot performed and then answered 500: the retry is told the snapshot does not
    exist, which is the deletion done, not a failed boot."""
    _, first = seed(world, snapshot="yes")
    [snapshot] = world.job_snapshots()
    wait_until(lambda: world.job_snapshots()[0]["State"] == "completed", timeout=60,
               what="the drain snapshot")
    world.cloud.ec2_faults(performed_then_5xx={"DeleteSnapshot": 1.0})
    ec2 = world.cloud.client("ec2")
    assert M.prune_snapshots(ec2, JOB, set(), 0.0) == [snapshot["SnapshotId"]]
    assert world.job_snapshots() == []
    assert [v["VolumeId"] for v in world.job_volumes()] == [first.result["volume_id"]]

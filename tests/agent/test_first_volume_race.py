"""The job's first volume, created by a boot that dies moments later while EC2 still leaves the
new volume out of DescribeVolumes (eventual consistency): the replacement, which takes the
lease at once from the terminated holder, must wait for that volume, not make a second.

The long soak's job 115 (seed 1, no lease table): a first boot was cut short right after its
CreateVolume, the replacement 7 s later listed no volume and made another, and every later
boot stopped on two unlinked generation-1 volumes ("several volumes carry this job's tags").
With and without a lease table (spotrun.firstvolume: the statement in the lease item, or on
the instance). Judged from the local cloud's ledger of calls and from what EC2 holds
afterwards; each agent a real process."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from c2_cloud import JOB, wait_until, world  # noqa: E402,F401

from spotrun import firstvolume  # noqa: E402
from spotrun import lease  # noqa: E402
from spotrun import tags as T  # noqa: E402
from spotrun_trainer.store import CheckpointStore  # noqa: E402

pytestmark = pytest.mark.loopdev

TABLE = "leases"
HIDDEN_S = 8.0  # how long EC2 leaves a new volume unlisted here


def creates(world) -> list[dict]:
    return [r for r in world.cloud.ledger()
            if not r["checker"] and r["action"] == "CreateVolume" and r["status"] == 200]


def lease_item(world) -> dict:
    db = world.cloud.client("dynamodb", faults=False)
    item = db.get_item(TableName=TABLE, Key={"job": {"S": JOB}}, ConsistentRead=True)["Item"]
    return {k: v.get("S", v.get("N")) for k, v in item.items()}


def with_table(world, table: bool) -> dict:
    if not table:
        return {}
    world.cloud.client("dynamodb", faults=False).create_table(**lease.table_definition(TABLE))
    return {"lease_table": TABLE}


def instance_tag(world, instance_id: str) -> str | None:
    [reservation] = world.checker.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return T.as_dict(reservation["Instances"][0].get("Tags", [])).get(T.FIRST_VOLUME)


@pytest.mark.parametrize("table", [True, False], ids=["lease-table", "no-table"])
@pytest.mark.parametrize("replacement_az", ["us-east-1a", "us-east-1b"])
def test_a_first_volume_not_listed_yet_is_awaited_by_the_replacement(world, replacement_az, table):
    aws = with_table(world, table)
    world.cloud.ec2_faults(not_found_after_create_s=HIDDEN_S)
    config = {"aws": {**aws, "retry_mode": "standard", "max_attempts": 10,
                      "consistency_window_s": 30.0}}

    first = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    dying = world.start(first, "--write", "datasets/data.txt=never", config=world.config(first, **config))
    # Its CreateVolume is answered; the volume stays unlisted (and unattachable) for 8 s, so
    # the agent is still waiting for it when the instance goes.
    wait_until(lambda: creates(world) or dying.poll() is not None, timeout=120,
               what="the first boot's CreateVolume")
    assert dying.poll() is None, world.log_text(dying)[-3000:]
    world.cloud.terminate(first.instance_id)
    dying.kill()
    world.finish(dying)
    [made] = creates(world)
    assert made["instance"] == first.instance_id
    stated = lease_item(world)["first_volume"] if table else instance_tag(world, first.instance_id)
    assert firstvolume.parse(stated)[0] == made["tags"]["spotrun:create-token"], stated

    replacement = world.cloud.launch_instance(az=replacement_az, tags={T.JOB: JOB})
    run = world.run(replacement, "--write", "datasets/data.txt=replacement", "--checkpoint", "3",
                    config=world.config(replacement, **config))
    assert run.rc == 0, run.stderr[-3000:]

    ledger = [r for r in world.cloud.ledger() if not r["checker"]]
    looked = next(r for r in ledger if r["instance"] == replacement.instance_id
                  and r["action"] == "DescribeVolumes")
    # It first looked while the first volume was still unlisted (else this proves nothing).
    assert looked["t"] - made["t"] < HIDDEN_S
    volumes = world.job_volumes()
    assert len(volumes) == 1, [(v["VolumeId"], v["AvailabilityZone"]) for v in volumes]
    [volume] = volumes
    assert volume["AvailabilityZone"] == replacement_az
    assert [a["InstanceId"] for a in volume["Attachments"]] == [replacement.instance_id]
    if replacement_az == "us-east-1a":
        # The first boot's volume is the job's: nothing else was made.
        assert [r["instance"] for r in creates(world)] == [first.instance_id]
        assert volume["VolumeId"] == made["created"][0]
    else:
        # Never used, in another zone: started over here (the blank deleted, one new volume).
        deleted = [r for r in ledger if r["action"] == "DeleteVolume" and r["status"] == 200]
        assert [r["resources"] for r in deleted] == [made["created"]]
    assert (replacement.mount_point / "datasets" / "data.txt").read_text() == "replacement"
    assert CheckpointStore(replacement.mount_point / "checkpoints").latest_valid().step == 3
    world.assert_calls_listed()


@pytest.mark.parametrize("table", [True, False], ids=["lease-table", "no-table"])
def test_a_stated_first_volume_that_never_came_is_waited_for_only_until_the_window(world, table):
    """A boot killed between its statement and its CreateVolume: the replacement waits out
    what is left of the window since the statement, then makes the volume itself."""
    aws = with_table(world, table)
    gone = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    stated = firstvolume.statement("spotrun-never-made", now=lambda: time.time() - 2)
    if table:
        world.cloud.client("dynamodb", faults=False).put_item(TableName=TABLE, Item={
            "job": {"S": JOB}, "holder": {"S": gone.instance_id}, "az": {"S": "us-east-1a"},
            "since": {"S": "then"}, "generation": {"N": "1"}, "first_volume": {"S": stated}})
    else:
        world.checker.create_tags(Resources=[gone.instance_id],
                                  Tags=[{"Key": T.FIRST_VOLUME, "Value": stated}])
    world.cloud.terminate(gone.instance_id)
    config = {"aws": {**aws, "consistency_window_s": 6.0}}
    replacement = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    run = world.run(replacement, config=world.config(replacement, **config))
    assert run.rc == 0, run.stderr[-3000:]
    assert "first_volume_awaited" in run.events() and "first_volume_never_listed" in run.events()
    assert [r["instance"] for r in creates(world)] == [replacement.instance_id]
    if table:
        assert lease_item(world)["generation"] == "2"


@pytest.mark.parametrize("value, expected", [
    ("spotrun-abc 1000", ("spotrun-abc", 1000.0)),
    ("spotrun-abc soon", None),
    ("spotrun-abc", None),
    (" 1000", None),
    ("", None),
    (None, None),
])
def test_a_statement_is_read_or_ignored(value, expected):
    assert firstvolume.parse(value) == expected

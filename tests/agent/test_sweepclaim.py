"""A sweep's claims on moto's real DynamoDB and EC2 (issue 19): each experiment taken by one
instance at most, never a finished one, the policy's order, and races decided by the table.
Judged from the table's items, not from what claim() returns."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from c2_world import aws, clients, launch  # noqa: E402,F401

from spotrun import lease as L  # noqa: E402
from spotrun import sweepclaim  # noqa: E402
from spotrun.claimpolicy import IN_ZONE, MIGRATE, NEVER_STARTED  # noqa: E402

TABLE = "spotrun-leases"
EXPERIMENTS = ["sweep-a", "sweep-b", "sweep-c"]


@pytest.fixture
def world(aws):
    ec2, db = clients(aws)
    db.create_table(**L.table_definition(TABLE))
    return ec2, db


def handles(world, inst, experiments=EXPERIMENTS):
    ec2, db = world
    return [L.Lease(db, TABLE, job, inst.instance_id, inst.availability_zone, ec2, poll_s=0.05)
            for job in experiments]


def holders(world, experiments=EXPERIMENTS) -> dict[str, str | None]:
    """job id -> holder, as the table has it (the evidence)."""
    ec2, db = world
    out = {}
    for job in experiments:
        item = db.get_item(TableName=TABLE, Key={"job": {"S": job}}, ConsistentRead=True).get("Item")
        out[job] = (item or {}).get("holder", {}).get("S")
    return out


def test_instances_take_the_never_started_experiments_in_order_then_none_is_left(world):
    ec2, _ = world
    insts = [launch(ec2, "us-east-1a") for _ in range(4)]
    got = [sweepclaim.claim(handles(world, inst), "us-east-1a") for inst in insts]
    assert [g[1].job_id for g in got[:3]] == EXPERIMENTS
    assert {g[1].reason for g in got[:3]} == {NEVER_STARTED}
    assert got[3] is None
    assert holders(world) == {job: inst.instance_id for job, inst in zip(EXPERIMENTS, insts)}


def test_a_finished_experiment_is_never_claimed_again(world):
    ec2, _ = world
    first, second = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1a")
    lease, choice = sweepclaim.claim(handles(world, first, EXPERIMENTS[:1]), "us-east-1a")
    lease.release(finished=True)
    assert sweepclaim.claim(handles(world, second, EXPERIMENTS[:1]), "us-east-1a") is None
    assert L.Lease(world[1], TABLE, EXPERIMENTS[0], second.instance_id, "us-east-1a",
                   ec2).try_acquire() is False
    assert holders(world, EXPERIMENTS[:1]) == {EXPERIMENTS[0]: None}


def test_a_released_experiment_in_my_zone_comes_before_a_new_one(world):
    ec2, _ = world
    first, second = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1a")
    lease, _ = sweepclaim.claim(handles(world, first), "us-east-1a")
    lease.release()  # interrupted: not finished, its volume in us-east-1a
    _, choice = sweepclaim.claim(handles(world, second), "us-east-1a")
    assert (choice.job_id, choice.reason) == (EXPERIMENTS[0], IN_ZONE)


def test_an_instance_elsewhere_starts_a_new_one_before_migrating(world):
    ec2, _ = world
    first, other = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1b")
    lease, _ = sweepclaim.claim(handles(world, first, EXPERIMENTS[:2]), "us-east-1a")
    lease.release()
    _, choice = sweepclaim.claim(handles(world, other, EXPERIMENTS[:2]), "us-east-1b")
    assert (choice.job_id, choice.reason) == (EXPERIMENTS[1], NEVER_STARTED)
    late = launch(ec2, "us-east-1b")
    _, choice = sweepclaim.claim(handles(world, late, EXPERIMENTS[:2]), "us-east-1b")
    assert (choice.job_id, choice.reason) == (EXPERIMENTS[0], MIGRATE)


def test_a_terminated_holders_experiment_is_taken_over_a_live_ones_is_not(world):
    ec2, _ = world
    dead, alive, newcomer = (launch(ec2, "us-east-1a") for _ in range(3))
    sweepclaim.claim(handles(world, dead, EXPERIMENTS[:2]), "us-east-1a")
    sweepclaim.claim(handles(world, alive, EXPERIMENTS[:2]), "us-east-1a")
    assert sweepclaim.claim(handles(world, newcomer, EXPERIMENTS[:2]), "us-east-1a") is None
    ec2.terminate_instances(InstanceIds=[dead.instance_id])
    _, choice = sweepclaim.claim(handles(world, newcomer, EXPERIMENTS[:2]), "us-east-1a")
    assert choice.job_id == EXPERIMENTS[0]
    assert holders(world, EXPERIMENTS[:2]) == {EXPERIMENTS[0]: newcomer.instance_id,
                                               EXPERIMENTS[1]: alive.instance_id}


def test_a_stale_view_loses_the_race_and_chooses_again(world):
    ec2, _ = world
    winner, loser = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1a")
    sweepclaim.claim(handles(world, winner), "us-east-1a")
    everything_free = [sweepclaim.ExperimentState(job, order) for order, job in
                       enumerate(EXPERIMENTS)]
    got = sweepclaim.claim(handles(world, loser), "us-east-1a",
                           read=lambda _leases: list(everything_free))
    assert got is not None and got[1].job_id == EXPERIMENTS[1]
    assert holders(world) == {EXPERIMENTS[0]: winner.instance_id,
                              EXPERIMENTS[1]: loser.instance_id, EXPERIMENTS[2]: None}


def test_simultaneous_boots_never_share_an_experiment(world):
    ec2, _ = world
    insts = [launch(ec2, "us-east-1a") for _ in range(6)]
    start = threading.Barrier(len(insts))
    won: dict[str, str] = {}
    errors = []

    def boot(inst):
        try:
            start.wait()
            got = sweepclaim.claim(handles(world, inst), "us-east-1a")
            if got is not None:
                won[inst.instance_id] = got[1].job_id
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=boot, args=(inst,)) for inst in insts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(won.values()) == EXPERIMENTS  # every experiment once, no one twice
    table = holders(world)
    assert {job: holder for job, holder in table.items()} == {job: inst for inst, job in won.items()}


def test_the_fleet_cancel_is_taken_by_exactly_one_instance(world):
    ec2, db = world
    insts = [launch(ec2, "us-east-1a") for _ in range(5)]
    start = threading.Barrier(len(insts))
    took: list[str] = []

    def finish_last(inst):
        start.wait()
        if sweepclaim.take_fleet_cancel(db, TABLE, "sweep", inst.instance_id):
            took.append(inst.instance_id)

    threads = [threading.Thread(target=finish_last, args=(inst,)) for inst in insts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(took) == 1, took
    item = db.get_item(TableName=TABLE, Key={"job": {"S": "sweep#sweep"}}, ConsistentRead=True)["Item"]
    assert item["fleet_cancel_by"]["S"] == took[0]
    # Its own retry (an answer lost) is still its own; another sweep is another item.
    assert sweepclaim.take_fleet_cancel(db, TABLE, "sweep", took[0]) is True
    assert sweepclaim.take_fleet_cancel(db, TABLE, "another", insts[0].instance_id) is True


def test_all_finished_reads_every_experiments_item(world):
    ec2, _ = world
    inst = launch(ec2, "us-east-1a")
    mine = handles(world, inst, EXPERIMENTS[:2])
    assert not sweepclaim.all_finished(mine)  # never held
    for _ in range(2):
        lease, _ = sweepclaim.claim(mine, "us-east-1a")
        assert not sweepclaim.all_finished(mine)
        lease.release(finished=True)
    assert sweepclaim.all_finished(mine)


# -- the volume's zone is EC2's word, not the last holder's (review of issue 19) --------------

def experiment_volume(ec2, job: str, az: str, generation: int = 1, **extra: str) -> str:
    from spotrun import tags as T

    values = {T.JOB: job, T.ROLE: "volume", T.GENERATION: str(generation), **extra}
    return ec2.create_volume(AvailabilityZone=az, Size=1, TagSpecifications=[{
        "ResourceType": "volume", "Tags": T.as_list(values)}])["VolumeId"]


def test_the_policy_sees_the_volumes_zone_not_the_stale_one_in_the_item(world):
    """The last holder took the lease in us-east-1a (the item's az) and moved the volume to
    us-east-1b before it was killed: the volume, not the item, says where the data is."""
    ec2, _ = world
    holder = launch(ec2, "us-east-1a")
    lease, _ = sweepclaim.claim(handles(world, holder, EXPERIMENTS[:2]), "us-east-1a")
    experiment_volume(ec2, EXPERIMENTS[0], "us-east-1b")
    ec2.terminate_instances(InstanceIds=[holder.instance_id])
    assert lease.item().az == "us-east-1a"  # stale
    seen = sweepclaim.states(handles(world, launch(ec2, "us-east-1b"), EXPERIMENTS[:2]))
    assert [(s.job_id, s.volume_zone, s.held) for s in seen] == [
        (EXPERIMENTS[0], "us-east-1b", False), (EXPERIMENTS[1], "", False)]
    # An instance in us-east-1a starts the new one rather than "resuming" across zones ...
    _, choice = sweepclaim.claim(handles(world, launch(ec2, "us-east-1a"), EXPERIMENTS[:2]),
                                 "us-east-1a")
    assert (choice.job_id, choice.reason) == (EXPERIMENTS[1], NEVER_STARTED)
    # ... and one in us-east-1b takes the moved one up where its volume is.
    _, choice = sweepclaim.claim(handles(world, launch(ec2, "us-east-1b"), EXPERIMENTS[:2]),
                                 "us-east-1b")
    assert (choice.job_id, choice.reason) == (EXPERIMENTS[0], IN_ZONE)


def test_mid_migration_the_zone_is_where_migration_resolve_puts_the_data(world):
    """Two volumes for one job: the source (us-east-1a) and its copy (us-east-1b). Until the
    copy is verified the data is on the source; once verified, on the copy. Volumes resolve
    will not decide between (no journal links them): the highest generation."""
    from spotrun import migration as M

    ec2, _ = world
    inst = launch(ec2, "us-east-1c")
    source = experiment_volume(ec2, EXPERIMENTS[0], "us-east-1a", 1)
    copy = experiment_volume(ec2, EXPERIMENTS[0], "us-east-1b", 2,
                             **{M.SOURCE_VOLUME: source, M.STEP: M.STEP_ATTACHED})
    experiment_volume(ec2, EXPERIMENTS[1], "us-east-1a", 1)
    experiment_volume(ec2, EXPERIMENTS[1], "us-east-1b", 2)  # not linked to the first
    zones = [s.volume_zone for s in sweepclaim.states(handles(world, inst, EXPERIMENTS[:2]))]
    assert zones == ["us-east-1a", "us-east-1b"]
    ec2.create_tags(Resources=[copy], Tags=[{"Key": M.STEP, "Value": M.STEP_VERIFIED}])
    zones = [s.volume_zone for s in sweepclaim.states(handles(world, inst, EXPERIMENTS[:2]))]
    assert zones == ["us-east-1b", "us-east-1b"]


def test_one_describe_volumes_for_the_whole_sweep(world):
    ec2, _ = world
    inst = launch(ec2, "us-east-1a")
    for job in EXPERIMENTS:
        experiment_volume(ec2, job, "us-east-1b")
    calls: list[str] = []
    ec2.meta.events.register("before-call.ec2.DescribeVolumes",
                             lambda model, **_: calls.append(model.name))
    seen = sweepclaim.states(handles(world, inst))
    assert {s.volume_zone for s in seen} == {"us-east-1b"} and calls == ["DescribeVolumes"]


def test_without_ec2s_answer_the_items_zone_is_used(world):
    """DescribeVolumes refused (or a volume not listed yet): the claim still chooses, from the
    lease items as before."""
    from botocore.exceptions import ClientError

    ec2, _ = world
    first, other = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1a")
    lease, _ = sweepclaim.claim(handles(world, first, EXPERIMENTS[:2]), "us-east-1a")
    lease.release()

    def refuse(**_):
        raise ClientError({"Error": {"Code": "UnauthorizedOperation", "Message": "no"}},
                          "DescribeVolumes")
    ec2.meta.events.register("before-call.ec2.DescribeVolumes", refuse)
    _, choice = sweepclaim.claim(handles(world, other, EXPERIMENTS[:2]), "us-east-1a")
    assert (choice.job_id, choice.reason) == (EXPERIMENTS[0], IN_ZONE)

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

"""The job lease on moto's real DynamoDB and EC2: atomic take, wait, take over from a dead
holder, release; and the no-table guard on a volume attached to another instance."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from c2_world import JOB, aws, clients, job_volume, launch  # noqa: E402,F401

from spotrun import lease as L  # noqa: E402
from spotrun.errors import SpotrunError  # noqa: E402

TABLE = "spotrun-leases"


@pytest.fixture
def world(aws):
    ec2, db = clients(aws)
    db.create_table(**L.table_definition(TABLE))
    return ec2, db


def lease_for(world, ident, **kw):
    ec2, db = world
    return L.Lease(db, TABLE, JOB, ident.instance_id, ident.availability_zone, ec2, poll_s=0.05, **kw)


def test_table_definition_is_create_table_kwargs():
    d = L.table_definition("t")
    assert d["TableName"] == "t" and d["KeySchema"] == [{"AttributeName": "job", "KeyType": "HASH"}]


def test_acquire_is_exclusive_and_reentrant(world):
    ec2, _ = world
    a, b = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1b")
    lease_for(world, a).acquire(1)
    lease_for(world, a).acquire(1)  # a second acquire by the holder is a no-op
    with pytest.raises(L.LeaseHeld, match=f"held by instance {a.instance_id} \\(running"):
        lease_for(world, b).acquire(0.3)
    assert lease_for(world, b).holder()["holder"] == a.instance_id


def test_waiter_gets_the_lease_when_released(world):
    ec2, _ = world
    a, b = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1b")
    lease_for(world, a).acquire(1)
    got = threading.Event()
    errors = []

    def wait_for_it():
        try:
            lease_for(world, b).acquire(20)
            got.set()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    t = threading.Thread(target=wait_for_it)
    t.start()
    assert not got.wait(0.3), "b took the lease while a held it"
    lease_for(world, a).release()
    t.join(20)
    assert got.is_set() and not errors
    assert lease_for(world, a).holder()["holder"] == b.instance_id


def test_take_over_from_a_terminated_holder(world):
    ec2, _ = world
    a, b = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1b")
    lease_for(world, a).acquire(1)
    ec2.terminate_instances(InstanceIds=[a.instance_id])
    lease_for(world, b).acquire(1)
    assert lease_for(world, b).holder()["holder"] == b.instance_id
    # The old holder's late release does not drop the new holder's lease.
    lease_for(world, a).release()
    assert lease_for(world, b).holder()["holder"] == b.instance_id


def test_race_has_exactly_one_winner(world):
    ec2, _ = world
    instances = [launch(ec2, az) for az in ("us-east-1a", "us-east-1b", "us-east-1c")]
    barrier = threading.Barrier(len(instances))
    results = {}

    def contend(ident):
        barrier.wait()
        try:
            lease_for(world, ident).acquire(0.5)
            results[ident.instance_id] = "won"
        except L.LeaseHeld:
            results[ident.instance_id] = "held"

    threads = [threading.Thread(target=contend, args=(i,)) for i in instances]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert sorted(results.values()) == ["held", "held", "won"]


def test_missing_table_is_a_clear_error(aws):
    ec2, db = clients(aws)
    a = launch(ec2, "us-east-1a")
    with pytest.raises(SpotrunError, match="aws.lease_table: DynamoDB table 'spotrun-leases' does not exist"):
        L.Lease(db, TABLE, JOB, a.instance_id, "us-east-1a", ec2).acquire(1)


def test_no_table_guard_waits_for_the_holder_to_detach(aws):
    ec2, _ = clients(aws)
    a, b = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1a")
    volume = job_volume(ec2, "us-east-1a")
    ec2.attach_volume(VolumeId=volume["VolumeId"], InstanceId=a.instance_id, Device="/dev/sdf")
    with pytest.raises(L.LeaseHeld, match=f"attached to instance {a.instance_id} \\(running\\)"):
        L.wait_until_unheld(ec2, volume["VolumeId"], b.instance_id, 0.3, poll_s=0.05)
    # Attached to me is fine.
    assert L.wait_until_unheld(ec2, volume["VolumeId"], a.instance_id, 0.3)["VolumeId"] == volume["VolumeId"]
    ec2.detach_volume(VolumeId=volume["VolumeId"], InstanceId=a.instance_id)
    assert L.wait_until_unheld(ec2, volume["VolumeId"], b.instance_id, 5, poll_s=0.05)["State"] == "available"


def test_instance_state_of_unknown_instance_is_absent(aws):
    ec2, _ = clients(aws)
    assert L.instance_state(ec2, "i-0123456789abcdef0") == "absent"


def test_a_stopped_holder_still_holds(world):
    ec2, _ = world
    a, b = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1b")
    lease_for(world, a).acquire(1)
    ec2.stop_instances(InstanceIds=[a.instance_id])
    with pytest.raises(L.LeaseHeld, match="stopped"):
        lease_for(world, b).acquire(0.3)


def test_the_first_volume_statement_outlives_drain_release_and_takeover(world):
    ec2, db = world
    a, b = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1b")
    holder = lease_for(world, a)
    holder.acquire(1)
    assert holder.first_volume_stated() is None
    holder.note_first_volume("spotrun-abc")
    token, stated_at = holder.first_volume_stated()
    assert token == "spotrun-abc" and abs(stated_at - time.time()) < 5
    holder.mark_draining()
    holder.release()
    assert lease_for(world, b).first_volume_stated() == (token, stated_at)
    lease_for(world, b).acquire(1)  # the next holder's take keeps it for the one after
    assert lease_for(world, a).first_volume_stated() == (token, stated_at)
    ec2.terminate_instances(InstanceIds=[b.instance_id])
    c = launch(ec2, "us-east-1c")
    assert lease_for(world, c).try_acquire()
    assert lease_for(world, c).first_volume_stated() == (token, stated_at)


def test_a_holder_that_lost_the_lease_states_nothing(world):
    ec2, db = world
    a, b = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1b")
    stale = lease_for(world, a)
    stale.acquire(1)
    ec2.terminate_instances(InstanceIds=[a.instance_id])
    lease_for(world, b).acquire(1)
    with pytest.raises(L.LeaseLost, match=f"instance {b.instance_id} holds it"):
        stale.note_first_volume("spotrun-late")
    assert lease_for(world, b).first_volume_stated() is None


def test_an_unreadable_statement_is_not_awaited(world):
    ec2, db = world
    a = launch(ec2, "us-east-1a")
    db.put_item(TableName=TABLE, Item={"job": {"S": JOB}, "generation": {"N": "1"},
                                       "first_volume": {"S": "spotrun-abc soon"}})
    assert lease_for(world, a).first_volume_stated() is None

"""Issue 21 on moto's real DynamoDB and EC2: a transient NotFound does not hand the lease to a
second winner; a holder EC2 never knows again is taken over only after the takeover window;
every acquisition gets the next generation and a holder whose generation is gone is stopped by
``validate``; a loser gets out of the way within its bound; a draining holder is waited for.
The lease item read back from DynamoDB is the evidence, not the agent's logs."""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from c2_world import JOB, aws, clients, job_volume, launch  # noqa: E402,F401
from flaky_ec2 import NotFoundFor  # noqa: E402

from spotrun import lease as L  # noqa: E402

TABLE = "spotrun-leases"


@pytest.fixture
def world(aws):
    ec2, db = clients(aws)
    db.create_table(**L.table_definition(TABLE))
    return ec2, db


def lease_for(world, ident, ec2=None, **kw):
    default_ec2, db = world
    return L.Lease(db, TABLE, JOB, ident.instance_id, ident.availability_zone, ec2 or default_ec2,
                   poll_s=0.05, **kw)


def stored(world) -> dict:
    """The lease item as DynamoDB has it."""
    _, db = world
    item = db.get_item(TableName=TABLE, Key={"job": {"S": JOB}}, ConsistentRead=True).get("Item", {})
    return {k: v.get("S", v.get("N")) for k, v in item.items()}


def test_one_not_found_for_a_running_holder_does_not_hand_over_the_lease(world, aws):
    """Defect 1: one InvalidInstanceID.NotFound on the racer's lookup of a live, running holder
    made it take the lease over (before: acquire returned, the item named the racer)."""
    ec2, _ = world
    a, b = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1b")
    lease_for(world, a).acquire(1)
    before = stored(world)
    flaky, _ = clients(aws)
    not_found = NotFoundFor([a.instance_id], times=1).install(flaky)
    with pytest.raises(L.LeaseHeld, match=f"held by instance {a.instance_id} \\(running"):
        lease_for(world, b, ec2=flaky).acquire(0.5)
    assert not_found.injected == 1 and not_found.lookups >= 2, "the NotFound was not answered"
    assert stored(world) == before, "the racer changed the lease item"


def test_a_holder_ec2_never_finds_is_taken_over_only_after_the_window(world, aws):
    ec2, _ = world
    a, b = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1b")
    lease_for(world, a).acquire(1)
    generation = int(stored(world)["generation"])
    flaky, _ = clients(aws)
    not_found = NotFoundFor([a.instance_id], times=None).install(flaky)
    racer = lease_for(world, b, ec2=flaky, absent_window_s=0.6, absent_lookups=4)
    start = time.monotonic()
    racer.acquire(0.1)  # the drain deadline does not cut the proof short
    assert time.monotonic() - start >= 0.6
    assert not_found.lookups >= 4
    item = stored(world)
    assert item["holder"] == b.instance_id and int(item["generation"]) == generation + 1
    assert racer.generation == generation + 1


def test_not_found_then_seen_running_starts_the_proof_again(world, aws):
    ec2, _ = world
    a, b = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1b")
    lease_for(world, a).acquire(1)
    flaky, _ = clients(aws)
    NotFoundFor([a.instance_id], times=3).install(flaky)
    # Three NotFound answers, then "running": never three in a row over the whole window.
    with pytest.raises(L.LeaseHeld):
        lease_for(world, b, ec2=flaky, absent_window_s=0.3, absent_lookups=4,
                  loser_wait_s=1.0).acquire(5)
    assert stored(world)["holder"] == a.instance_id


def test_every_acquisition_takes_the_next_generation(world):
    ec2, _ = world
    a, b = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1b")
    first = lease_for(world, a)
    first.acquire(1)
    assert first.generation == 1 and stored(world)["generation"] == "1"
    first.acquire(1)  # the same holder object again: no new acquisition
    assert stored(world)["generation"] == "1"
    first.release()
    assert "holder" not in stored(world) and stored(world)["generation"] == "1", \
        "a release must keep the count"
    second = lease_for(world, b)
    second.acquire(1)
    assert (second.generation, stored(world)["holder"]) == (2, b.instance_id)
    again = lease_for(world, b)  # this instance's agent restarted: a new acquisition
    again.acquire(1)
    assert again.generation == 3
    with pytest.raises(L.LeaseLost, match="generation 2"):
        second.validate()
    again.validate()


def test_a_holder_whose_lease_was_taken_is_stopped_and_releases_nothing(world):
    ec2, _ = world
    a, b = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1b")
    old = lease_for(world, a)
    old.acquire(1)
    old.validate()
    ec2.terminate_instances(InstanceIds=[a.instance_id])
    lease_for(world, b).acquire(1)
    with pytest.raises(L.LeaseLost, match=f"instance {b.instance_id} holds it with generation 2"):
        old.validate()
    old.mark_draining()
    old.release()
    assert stored(world)["holder"] == b.instance_id and "draining" not in stored(world)


def test_an_item_from_before_generations_is_taken_over_by_compare_and_swap(world):
    ec2, db = world
    a, b = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1b")
    db.put_item(TableName=TABLE, Item={"job": {"S": JOB}, "holder": {"S": a.instance_id},
                                       "az": {"S": "us-east-1a"}, "since": {"S": "then"}})
    ec2.terminate_instances(InstanceIds=[a.instance_id])
    lease_for(world, b).acquire(1)
    assert (stored(world)["holder"], stored(world)["generation"]) == (b.instance_id, "1")


def test_a_loser_gets_out_of_the_way_within_its_bound(world, monkeypatch):
    """Before: a loser waited the whole drain deadline (volume.create_timeout_s, 900 s) on every
    start while the holder simply trained."""
    ec2, _ = world
    a, b = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1b")
    lease_for(world, a).acquire(1)
    before = stored(world)
    monkeypatch.setattr(L, "LOSER_WAIT_S", 0.5, raising=False)
    start = time.monotonic()
    with pytest.raises(L.LeaseHeld) as caught:
        lease_for(world, b).acquire(20)
    assert time.monotonic() - start < 5
    assert "terminate this instance or lower the fleet's target capacity" in str(caught.value)
    assert stored(world) == before


def test_a_draining_holder_is_waited_for_past_the_loser_bound(world):
    ec2, _ = world
    a, b = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1b")
    holder = lease_for(world, a)
    holder.acquire(1)
    holder.mark_draining()
    assert stored(world)["draining"]
    got, errors = threading.Event(), []

    def wait_for_it():
        try:
            lease_for(world, b, loser_wait_s=0.2).acquire(20)
            got.set()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    t = threading.Thread(target=wait_for_it)
    t.start()
    assert not got.wait(1.0) and not errors, "the waiter gave up on (or took) a draining holder"
    holder.release()
    t.join(20)
    assert got.is_set() and not errors
    assert (stored(world)["holder"], stored(world)["generation"]) == (b.instance_id, "2")


def test_no_table_a_volume_a_live_instance_keeps_is_given_up_within_the_bound(aws, monkeypatch):
    ec2, _ = clients(aws)
    a, b = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1a")
    volume = job_volume(ec2, "us-east-1a")
    ec2.attach_volume(VolumeId=volume["VolumeId"], InstanceId=a.instance_id, Device="/dev/sdf")
    monkeypatch.setattr(L, "LOSER_WAIT_S", 0.3, raising=False)
    start = time.monotonic()
    with pytest.raises(L.LeaseHeld, match=f"attached to instance {a.instance_id} \\(running\\)"):
        L.wait_until_unheld(ec2, volume["VolumeId"], b.instance_id, 20, poll_s=0.05)
    assert time.monotonic() - start < 5
    # A detached volume is free at once, and says nobody was waited for.
    ec2.detach_volume(VolumeId=volume["VolumeId"], InstanceId=a.instance_id)
    fresh, waited_for = L.wait_until_free(ec2, volume["VolumeId"], b.instance_id, 5, poll_s=0.05)
    assert fresh["State"] == "available" and waited_for is None

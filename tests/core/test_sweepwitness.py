"""The sweep witness (spotrun.harness.sweepwitness) on ledgers written by hand: it passes the
protocol followed and names each way of breaking it, so the e2e check built on it can fail."""
from spotrun.harness.sweepwitness import violations


def put(t, job, holder=None, finished=False, by="i-a"):
    item = {"job": job, **({"holder": holder} if holder else {}),
            **({"finished": "2026-12-02T00:00:00"} if finished else {})}
    return {"t": t, "service": "dynamodb", "action": "PutItem", "status": 200, "item": item,
            "instance": by, "resources": ["spotrun-leases"], "checker": False}


def ec2(t, action, volume, by):
    return {"t": t, "service": "ec2", "action": action, "status": 200, "resources": [volume],
            "instance": by, "checker": False}


VOLUMES = {"vol-x": "sweep-x"}
FOLLOWED = [put(1, "sweep-x", "i-a"), ec2(2, "AttachVolume", "vol-x", "i-a"),
            ec2(3, "DetachVolume", "vol-x", "i-a"), put(4, "sweep-x", finished=True)]


def test_the_protocol_followed_is_no_violation():
    assert violations(FOLLOWED, VOLUMES) == []


def test_a_volume_changed_by_an_instance_without_the_lease_is_named():
    found = violations([*FOLLOWED[:2], ec2(2.5, "CreateTags", "vol-x", "i-b"), *FOLLOWED[2:]],
                       VOLUMES)
    assert len(found) == 1 and "CreateTags on vol-x (sweep-x) by i-b" in found[0]


def test_a_change_after_the_release_is_named():
    found = violations([*FOLLOWED, ec2(5, "AttachVolume", "vol-x", "i-a")], VOLUMES)
    assert len(found) == 1 and "AttachVolume" in found[0]


def test_a_finished_experiment_taken_again_is_named():
    found = violations([*FOLLOWED, put(6, "sweep-x", "i-c", by="i-c")], VOLUMES)
    assert found == ["sweep-x taken by i-c after it finished"]


def test_a_takeover_ends_the_previous_holders_time():
    ledger = [put(1, "sweep-x", "i-a"), put(2, "sweep-x", "i-b", by="i-b"),
              ec2(3, "AttachVolume", "vol-x", "i-b"), ec2(4, "DetachVolume", "vol-x", "i-a")]
    found = violations(ledger, VOLUMES)
    assert len(found) == 1 and "by i-a" in found[0]

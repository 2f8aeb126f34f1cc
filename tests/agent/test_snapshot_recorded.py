"""The drain's snapshot is found by the replacement even while EC2 still leaves it out of
every filtered DescribeSnapshots (eventual consistency): its id is recorded on the volume,
so the migration reuses it instead of making a second one (issue 15, item 3; seen in the
soak's ec2_consistency kind: one drain + one migration → 2 snapshots created)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from c2_cloud import JOB, world  # noqa: E402,F401

from spotrun import snapshots  # noqa: E402
from spotrun import tags as T  # noqa: E402
from spotrun_trainer.store import CheckpointStore  # noqa: E402

pytestmark = pytest.mark.loopdev
WINDOW_S = 8.0


def test_a_drain_snapshot_not_listed_yet_is_reused_by_the_migration(world):
    first = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    seed = world.run(first, "--write", "datasets/data.txt=from a", "--checkpoint", "7",
                     "--release", "--snapshot", "no", config=world.config(first))
    assert seed.rc == 0, seed.stderr[-3000:]
    world.cloud.ec2_faults(not_found_after_create_s=WINDOW_S)
    window = {"aws": {"retry_mode": "standard", "max_attempts": 10, "consistency_window_s": 30.0}}
    drainer = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    drain = world.run(drainer, "--release", "--snapshot", "yes", config=world.config(drainer, **window))
    assert drain.rc == 0, drain.stderr[-3000:]
    replacement = world.cloud.launch_instance(az="us-east-1b", tags={T.JOB: JOB})
    moved = world.run(replacement, config=world.config(replacement, **window))
    assert moved.rc == 0, moved.stderr[-3000:]
    ledger = [r for r in world.cloud.ledger() if not r["checker"]]
    made = [r for r in ledger if r["action"] == "CreateSnapshot"]
    [drained] = [r for r in made if r["instance"] == drainer.instance_id]
    looked = next(r for r in ledger if r["instance"] == replacement.instance_id
                  and r["action"] == "DescribeSnapshots")
    # The replacement looked while the drain's snapshot was still unlisted (else this proves
    # nothing), and made none of its own.
    assert looked["t"] - drained["t"] < WINDOW_S
    assert [r["instance"] for r in made] == [drainer.instance_id]
    latest = CheckpointStore(replacement.mount_point / "checkpoints").latest_valid()
    assert (replacement.mount_point / "datasets" / "data.txt").read_text() == "from a"
    assert latest is not None and latest.step == 7


def test_a_drain_snapshot_begun_and_never_recorded_is_awaited_not_made_again(world):
    # Long soak, job 85: the drain's CreateSnapshot went through, then the drain was cut short
    # before recording the id on the volume; the replacement, a few seconds later, did not see
    # the snapshot in the filtered list and made a second. Here the drain's create is performed
    # and its connection dropped, EC2 leaves the snapshot unlisted for 8 s, and the drain gives
    # up on it after its (3 s) settle time: the same unrecorded snapshot, deterministically.
    first = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    seed = world.run(first, "--write", "datasets/data.txt=from a", "--checkpoint", "7",
                     "--release", "--snapshot", "no", config=world.config(first))
    assert seed.rc == 0, seed.stderr[-3000:]
    world.cloud.ec2_faults(not_found_after_create_s=WINDOW_S,
                           dropped_after={"CreateSnapshot": 1.0})
    drainer = world.cloud.launch_instance(az="us-east-1a", tags={T.JOB: JOB})
    drain = world.run(drainer, "--release", "--snapshot", "yes", config=world.config(
        drainer, aws={"retry_mode": "standard", "max_attempts": 10, "consistency_window_s": 3.0}))
    assert drain.rc == 0, drain.stderr[-3000:]
    world.cloud.ec2_faults(not_found_after_create_s=WINDOW_S)
    replacement = world.cloud.launch_instance(az="us-east-1b", tags={T.JOB: JOB})
    moved = world.run(replacement, config=world.config(replacement, aws={
        "retry_mode": "standard", "max_attempts": 10, "consistency_window_s": 30.0}))
    assert moved.rc == 0, moved.stderr[-3000:]
    ledger = [r for r in world.cloud.ledger() if not r["checker"]]
    made = [r for r in ledger if r["action"] == "CreateSnapshot"]
    recorded = [r for r in ledger if r["instance"] == drainer.instance_id
                and r["action"] == "CreateTags" and r["t"] > made[0]["t"]]
    looked = next(r for r in ledger if r["instance"] == replacement.instance_id
                  and r["action"] == "DescribeSnapshots")
    # The drain made it and did not record it, and the replacement first looked while it was
    # still unlisted (else this proves nothing); then it waited for it and made none.
    assert made[0]["instance"] == drainer.instance_id
    assert not any(snapshots.FRESH_SNAPSHOT in r["tags"] for r in recorded)
    # The intent was stated right before the create, not earlier (job 56: a drain killed
    # between an earlier intent and its create made the replacement wait out the window).
    drainers = [r for r in ledger if r["instance"] == drainer.instance_id]
    at = drainers.index(made[0])
    assert snapshots.SNAPSHOT_INTENT in drainers[at - 1]["tags"], drainers[at - 3:at + 1]
    assert drainers[at - 1]["action"] == "CreateTags"
    assert looked["t"] - made[0]["t"] < WINDOW_S
    assert [r["instance"] for r in made] == [drainer.instance_id]
    assert (replacement.mount_point / "datasets" / "data.txt").read_text() == "from a"
    latest = CheckpointStore(replacement.mount_point / "checkpoints").latest_valid()
    assert latest is not None and latest.step == 7


@pytest.mark.parametrize("tag, left", [
    (None, 0.0),                 # no drain began a snapshot
    ("4/1000", 0.0),             # one began at another mount count: not this data
    ("5/1000", 20.0),            # this mount count, 10 s ago, window 30 s
    ("5/950", 0.0),              # long enough ago for EC2 to list it by now
    ("5/soon", 0.0),             # unreadable: as if none (the lookup by tag still ran)
])
def test_how_long_a_begun_snapshot_may_stay_unlisted(tag, left):
    volume = {"VolumeId": "vol-1", "Tags": [] if tag is None else [
        {"Key": snapshots.SNAPSHOT_INTENT, "Value": tag}]}
    assert snapshots.unlisted_for_s(volume, 5, 30.0, now=lambda: 1010.0) == left
    assert snapshots.intent_tags(5, now=lambda: 1010.7) == {snapshots.SNAPSHOT_INTENT: "5/1010"}

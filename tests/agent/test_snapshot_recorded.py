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

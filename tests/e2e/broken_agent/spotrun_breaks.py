"""The deliberate faults, one per invariant check: each monkeypatches the real agent's code in
its own process (see sitecustomize.py here), so the checker is shown a real agent, on the real
local cloud, that violates exactly one invariant. Each announces itself on stderr (the agent's
log) so a failing negative test can tell "not installed" from "not caught"."""
from __future__ import annotations

import os
import sys


def _stopped_is_finished() -> None:
    """inv5: the agent takes a trainer that stopped (exit 75, say after an outside SIGTERM) for
    one that finished; with no trainer completion record to keep, it writes none of its own,
    marks the job done and cancels the fleet."""
    from spotrun import lifecycle, trainerproc

    judge = trainerproc.TrainerProcess._judge

    def broken_judge(self):
        outcome = judge(self)
        return trainerproc.Outcome.FINISHED if outcome is trainerproc.Outcome.STOPPED else outcome

    finish = lifecycle.Lifecycle.finish

    def broken_finish(self, *, already_complete=False, completion=None):
        return finish(self, already_complete=already_complete or completion is None,
                      completion=completion)

    trainerproc.TrainerProcess._judge = broken_judge
    lifecycle.Lifecycle.finish = broken_finish


def _stopped_is_finished_with_record() -> None:
    """inv5, the agent's word only: as above, but the agent writes its completion record as for
    a real finish (the record is the agent's own file)."""
    from spotrun import trainerproc

    judge = trainerproc.TrainerProcess._judge

    def broken_judge(self):
        outcome = judge(self)
        return trainerproc.Outcome.FINISHED if outcome is trainerproc.Outcome.STOPPED else outcome

    trainerproc.TrainerProcess._judge = broken_judge


def _delete_source_early() -> None:
    """inv2: in a cross-AZ migration the agent deletes the old volume as soon as its copy exists,
    before the copy is attached, mounted and verified."""
    from spotrun import migration

    migrate_here = migration.migrate_here

    def broken_migrate_here(ec2, ec2_once, config, identity, source, **kwargs):
        volume = migrate_here(ec2, ec2_once, config, identity, source, **kwargs)
        ec2.delete_volume(VolumeId=source["VolumeId"])
        return volume

    migration.migrate_here = broken_migrate_here


def _verify_an_empty_copy() -> None:
    """inv2 by the bytes: in a cross-AZ migration the agent empties the copy's checkpoint
    directory and calls the copy verified anyway (no check of its latest checkpoint), so the
    old volume is deleted while no copy holds its data. Every tag and call is as a correct
    agent's: only the copy's image tells."""
    import shutil

    from spotrun import volumes

    verify = volumes.verify_volume

    def broken_verify(config, volume_id, generation, *, migrated, **checks):
        if not migrated:
            return verify(config, volume_id, generation, migrated=migrated, **checks)
        checkpoints = config.mount_point / config.volume.checkpoints_dir
        shutil.rmtree(checkpoints, ignore_errors=True)
        checkpoints.mkdir()
        os.sync()
        return None

    volumes.verify_volume = broken_verify


def _tag_decoy() -> None:
    """inv6: each time the agent records its tags on the job's volume, it also tags the volume
    named by SPOTRUN_TEST_DECOY, which is not the job's."""
    from spotrun import volumes

    decoy = os.environ.pop("SPOTRUN_TEST_DECOY")
    record = volumes.VolumeManager.record

    def broken_record(self, **tags):
        record(self, **tags)
        self.ec2.create_tags(Resources=[decoy], Tags=[{"Key": "spotrun:instance",
                                                       "Value": self.me}])

    volumes.VolumeManager.record = broken_record


def _take_over_lease() -> None:
    """inv1: the agent takes the job's lease from whoever holds it, alive or not (one
    compare-and-swap on what it just read), instead of waiting for a drain or proof of death."""
    from spotrun import lease

    acquire = lease.Lease.acquire

    def broken_acquire(self, drain_wait_s):
        if self._take(self._read()):
            return None
        return acquire(self, drain_wait_s)

    lease.Lease.acquire = broken_acquire


def _skip_lease() -> None:
    """inv1: the agent neither takes the job's lease nor waits for a volume another instance
    holds: it goes ahead as if it were the job's only instance."""
    from spotrun import ec2 as ec2mod
    from spotrun import lease

    def no_acquire(self, drain_wait_s):
        return None

    def no_validate(self):
        return None

    def not_waiting(ec2, volume_id, instance_id, deadline_s, poll_s=2.0, *, loser_wait_s=None):
        return ec2mod.describe_volume(ec2, volume_id), None

    lease.Lease.acquire = no_acquire
    lease.Lease.validate = no_validate
    lease.wait_until_free = not_waiting


BREAKS = {
    "inv5-stopped-is-finished": _stopped_is_finished,
    "inv5-stopped-is-finished-with-record": _stopped_is_finished_with_record,
    "inv2-delete-source-early": _delete_source_early,
    "inv2-verify-an-empty-copy": _verify_an_empty_copy,
    "inv6-tag-decoy": _tag_decoy,
    "inv1-take-over-lease": _take_over_lease,
    "inv1-skip-lease": _skip_lease,
}


def install(name: str) -> None:
    BREAKS[name]()  # an unknown name fails the agent at start: a typo cannot pass as "caught"
    print(f"spotrun test break installed: {name}", file=sys.stderr, flush=True)

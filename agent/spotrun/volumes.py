"""The job's EBS volume on this instance: lease → find/create/migrate → attach → device →
fsck/mkfs → mount → verify → layout, and back (sync, unmount, snapshot ahead of need, detach,
release).

Every step reads what EC2 and the disk say before acting, so ``acquire()`` run again — in
this process, after a crash, or on another instance — continues instead of redoing
(see :mod:`spotrun.migration` for the journal). The old volume of a migration is deleted
only after the new one is attached, mounted and verified (invariant 2); only volumes and
snapshots tagged for this job are touched (invariant 6).

Decisions come from fresh state: a plan is acted on only while what it was made from still
holds. Waiting for another instance to let go of a volume, or finding a planned volume's
journal tags changed, makes the whole plan be made again (``StalePlan``); every mutating call
is preceded by the lease's fencing check (:meth:`spotrun.lease.Lease.validate`), so an agent
whose lease was taken changes nothing.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from spotrun import attach, blockdev
from spotrun import ec2 as ec2mod
from spotrun import firstvolume
from spotrun import lease as leasemod
from spotrun import migration as M
from spotrun import tags as T
from spotrun.config import Config
from spotrun.crashpoints import crashpoint, pausepoint
from spotrun.log import bind, get_logger
from spotrun.volumecheck import VolumeError, verify_volume
from spotrun.waiting import wait_until


log = get_logger("volumes")


FS_LABEL = "spotrun"
# Plans made again in one acquire before giving up: each replan follows a real change made by
# another instance (or a wait for one), so more than a few in a row means a fight.
MAX_PLANS = 5


@dataclass(frozen=True)
class AcquiredVolume:
    volume_id: str
    generation: int
    device: Path
    mount_point: Path
    created: bool
    migrated: bool


class VolumeManager:
    def __init__(self, config: Config, identity, *, ec2_client=None, dynamodb_client=None,
                 holder_wait_s: float | None = None, lease_poll_s: float = 2.0,
                 loser_wait_s: float | None = None, lease_options: dict | None = None,
                 lease: "leasemod.Lease | None" = None):
        """``lease``: the lease this instance already holds for the job (a sweep's claim);
        a second Lease for the same job would take it again under a new generation and
        leave the claim's own handle stale."""
        self.config = config
        self.identity = identity
        self.me = identity.instance_id
        region = config.aws.region or identity.region
        self.ec2 = ec2_client or ec2mod.client("ec2", config.aws, region)
        # Calls that create or attach must not be retried blindly by botocore.
        self.ec2_once = ec2_client or ec2mod.single_attempt(self.ec2, config.aws)
        # How long to wait for another instance to let go of the job (drain + detach), and
        # for one that keeps it without draining (then this one gets out of the way).
        self.holder_wait_s = holder_wait_s if holder_wait_s is not None else config.volume.create_timeout_s
        self.loser_wait_s = config.lease.loser_wait_s if loser_wait_s is None else loser_wait_s
        self.lease = lease
        if lease is not None and lease.job_id != config.job.id:
            raise ValueError(f"lease of job {lease.job_id!r} given for job {config.job.id!r}")
        if lease is None and config.aws.lease_table:
            db = dynamodb_client or ec2mod.client("dynamodb", config.aws, region)
            options = {"absent_window_s": config.lease.takeover_window_s,
                       "absent_lookups": config.lease.takeover_lookups, **(lease_options or {})}
            self.lease = leasemod.Lease(db, config.aws.lease_table, config.job.id, self.me,
                                        identity.availability_zone, self.ec2, poll_s=lease_poll_s,
                                        loser_wait_s=self.loser_wait_s, **options)
        self._acquired: AcquiredVolume | None = None
        # Set by the lifecycle: raises at a safe point once a notice came in (spotrun.boot).
        self.safe_point = lambda where: None

    # -- discovery ------------------------------------------------------------------------

    def job_volumes(self) -> list[dict]:
        """This job's volumes (Name and job tags), oldest first, without deleted ones."""
        found = []
        filters = T.job_filters(self.config.job.id, self.config.volume.name_tag)
        for page in self.ec2.get_paginator("describe_volumes").paginate(Filters=filters):
            found += [v for v in page["Volumes"] if v["State"] not in ("deleting", "deleted")]
        return sorted(found, key=lambda v: v["CreateTime"])

    def _refresh(self, volume_id: str) -> dict:
        volume = ec2mod.describe_volume(self.ec2, volume_id)
        if volume is None:
            raise VolumeError(f"volume {volume_id} disappeared while this agent was using it")
        return volume

    def _guard(self) -> None:
        """Right before every call that changes the job: is the lease still ours?"""
        if self.lease is not None:
            self.lease.validate()

    def _unheld(self, planned: dict) -> dict:
        """``planned`` re-read once no other instance holds it; StalePlan if this had to wait
        for another instance (it may have changed anything meanwhile) or its journal changed."""
        volume_id = planned["VolumeId"]
        fresh, waited_for = leasemod.wait_until_free(self.ec2, volume_id, self.me, self.holder_wait_s,
                                                     loser_wait_s=self.loser_wait_s)
        if waited_for is not None:
            raise M.StalePlan(f"volume {volume_id} was held by {waited_for} while this agent waited")
        changed = M.changes(planned, fresh)
        if changed:
            raise M.StalePlan(f"volume {volume_id} changed since the plan: {', '.join(changed)}")
        return fresh

    # -- acquire --------------------------------------------------------------------------

    def acquire(self) -> AcquiredVolume:
        if self._acquired is not None:
            return self._acquired
        bind(job=self.config.job.id, instance_id=self.me)
        if self.lease is not None:
            self.lease.acquire(self.holder_wait_s)
        try:
            return self._acquire()
        except BaseException:
            self.let_go_of_lease_unless_attached()
            raise

    def let_go_of_lease_unless_attached(self) -> None:
        """After a failed acquire: holding the job with nothing attached would block others.
        (One that never got the lease, or lost it, writes nothing.)"""
        if self.lease is None or self.lease.generation is None:
            return
        try:
            if self._my_volume() is None:
                self.lease.release()
        except Exception as exc:  # noqa: BLE001 - the acquire's own error is the one to report
            log.warning("lease_release_after_failure_failed", error=str(exc)[:200])

    def _acquire(self) -> AcquiredVolume:
        for attempt in range(1, MAX_PLANS + 1):
            try:
                return self._acquire_from_fresh_plan()
            except M.StalePlan as stale:
                log.info("plan_recomputed", reason=str(stale), attempt=attempt)
        raise VolumeError(f"the job's volumes changed under this agent {MAX_PLANS} times while "
                          "it acted on them (another instance is working on the job); stopped")

    def _acquire_from_fresh_plan(self) -> AcquiredVolume:
        self.safe_point("acquire.plan")
        plan = M.resolve(self.job_volumes())
        created = False
        if plan is None:
            plan = self._first_volume_in_the_making()
        if plan is None:
            plan = M.Plan(current=self._create_first())
            created = True
        if plan.source is not None:  # a verified copy exists: its source goes first
            M.finish(self.ec2, self._unheld(plan.source), plan.current["VolumeId"],
                     self.config.volume.create_timeout_s, guard=self._guard)
        az = self.identity.availability_zone
        if plan.current["AvailabilityZone"] != az and M.never_used(plan.current):
            plan = M.Plan(current=self._start_over_here(plan))
            created = True
        current = plan.current
        keep = M.this_attempts_token(current, az) if current["AvailabilityZone"] != az else None
        for copy in plan.unverified:
            if M.tags_of(copy).get(M.CREATE_TOKEN) != keep:
                M.delete_volume(self.ec2, self._unheld(copy),
                                f"unproven copy of {current['VolumeId']} from an abandoned migration",
                                self.config.volume.create_timeout_s, guard=self._guard)
        source = None
        if current["AvailabilityZone"] != az:
            source = self._unheld(current)
            volume = M.migrate_here(self.ec2, self.ec2_once, self.config, self.identity, source,
                                    deadline_create_s=self.config.volume.create_timeout_s,
                                    guard=self._guard, safe_point=self.safe_point)
        else:
            volume = ec2mod.wait_for_volume(self.ec2, current["VolumeId"], ("available", "in-use"),
                                            self.config.volume.create_timeout_s,
                                            missing_ok_s=self.config.aws.consistency_window_s,
                                            safe_point=self.safe_point)
        volume_id = volume["VolumeId"]
        bind(volume_id=volume_id)
        self.safe_point("acquire.before_attach")
        volume = self._attach(volume)
        if source is not None:
            M.set_step(self.ec2, volume_id, M.STEP_ATTACHED, guard=self._guard)
            crashpoint("migration.attached")
        device = blockdev.wait_for_device(volume_id, Path(self.config.volume.device_dir),
                                          self.config.volume.device_timeout_s)
        # A source spotrun never mounted has no marker (and perhaps no filesystem) to carry.
        copy_of_unused = source is not None and M.mounts(source) == 0
        self._mount(volume, device, copy_of_unused=copy_of_unused)
        if source is not None:
            M.set_step(self.ec2, volume_id, M.STEP_MOUNTED, guard=self._guard)
            crashpoint("migration.mounted")
            pausepoint("migration.verifying")
        self.safe_point("acquire.mounted")  # release() unmounts and detaches it again
        generation = M.generation(volume)
        # ``volume`` as it was before this mount: mounts 0 = nobody has used it yet.
        dataset_first_use = (source is None and M.mounts(volume) == 0
                             and M.tags_of(volume).get(M.ORIGIN) == M.FROM_DATASET[M.ORIGIN])
        verify_volume(self.config, volume_id, generation, migrated=source is not None,
                      marker_expected=source is not None and not copy_of_unused,
                      dataset_snapshot=volume.get("SnapshotId", "") if dataset_first_use else "")
        if source is not None:
            M.finish(self.ec2, source, volume_id, self.config.volume.create_timeout_s,
                     guard=self._guard)
        elif M.tags_of(volume).get(M.STEP) == M.STEP_VERIFIED:
            # resumed after the source was deleted
            M.set_step(self.ec2, volume_id, M.STEP_DONE, guard=self._guard)
        blockdev.prepare_layout(self.config.mount_point,
                                [self.config.volume.datasets_dir, self.config.volume.checkpoints_dir],
                                self.config.trainer.user)
        live = {v["VolumeId"] for v in self.job_volumes()} | {volume_id}
        M.prune_snapshots(self.ec2, self.config.job.id, live,
                          self.config.volume.snapshot_retention_days, guard=self._guard)
        self._acquired = AcquiredVolume(volume_id, generation, device, self.config.mount_point,
                                        created, source is not None)
        self.record(instance=self.me)
        log.info("volume_ready", generation=generation, device=str(device),
                 mount_point=str(self.config.mount_point), created=created,
                 migrated=source is not None)
        return self._acquired

    def _first_volume_in_the_making(self) -> M.Plan | None:
        """No volume listed, but a boot before this one stated it was making the job's first
        volume less than ``aws.consistency_window_s`` ago (spotrun.firstvolume): EC2 may not
        list it yet, so wait for it until the window since the statement has passed, rather
        than make a second. The plan from what is listed then; None when nothing was stated,
        or nothing showed in time (that create never happened)."""
        stated = firstvolume.latest(self.lease, self.ec2, self.config.job.id)
        if stated is None:
            return None
        token, stated_at = stated
        left_s = stated_at + self.config.aws.consistency_window_s - time.time()
        if left_s <= 0:
            return None
        log.info("first_volume_awaited", create_token=token, up_to_s=round(left_s, 1))
        try:
            listed = wait_until(self.job_volumes, left_s, interval_s=0.5, backoff=1.5,
                                max_interval_s=5.0, what="the job's first volume to be listed",
                                on_poll=lambda _elapsed: self.safe_point("acquire.plan"))
        except TimeoutError:
            log.info("first_volume_never_listed", create_token=token)
            return None
        log.info("first_volume_found", volume_ids=[v["VolumeId"] for v in listed])
        return M.resolve(listed)

    def _start_over_here(self, plan: M.Plan) -> dict:
        """The job's first boot died before it ever mounted its new volume: a copy would carry
        nothing (and a restored blank looks like lost data), so the job starts here instead.
        Each step is safe to crash after: copies and snapshots of the blank go first, the
        blank itself last, and a boot that finds no volume and no snapshot creates one (from
        the sweep's dataset snapshot again, if it has one: that snapshot is the sweep's and
        never deleted here)."""
        blank = plan.current
        deadline = self.config.volume.create_timeout_s
        why = f"copy of {blank['VolumeId']}, which was never used"
        for copy in plan.unverified:
            M.delete_volume(self.ec2, self._unheld(copy), why, deadline, guard=self._guard)
        blank = self._unheld(blank)  # still never used, and nobody's
        for snapshot in M.job_snapshots(self.ec2, self.config.job.id,
                                        **{M.SOURCE_VOLUME: blank["VolumeId"]}):
            M.delete_snapshot(self.ec2, snapshot["SnapshotId"], guard=self._guard)
            log.info("snapshot_deleted", snapshot_id=snapshot["SnapshotId"], reason=why)
        M.delete_volume(self.ec2, blank, "never used: the job starts over in "
                        f"{self.identity.availability_zone}", deadline, guard=self._guard)
        return self._create_first()

    def _create_first(self) -> dict:
        job, vc = self.config.job.id, self.config.volume
        where = (f"no volume tagged Name={vc.name_tag} and {T.JOB}={job} in "
                 f"{self.config.aws.region or self.identity.region}")
        if not vc.create_if_missing:
            raise VolumeError(f"{where}, and volume.create_if_missing is false: create the volume "
                              f"(spotrun init) or set volume.create_if_missing = true")
        leftovers = [s for s in M.job_snapshots(self.ec2, job) if s["State"] == "completed"]
        if leftovers:
            raise VolumeError(
                f"{where}, but this job has snapshots ({', '.join(s['SnapshotId'] for s in leftovers)}):"
                f" refusing to start over on an empty volume. Restore the newest snapshot to a volume "
                f"with the job's tags, or delete the snapshots to start the job afresh")
        create_token = M.token("create", job, self.me)
        tags = {T.NAME: vc.name_tag, T.JOB: job, T.ROLE: M.ROLE_VOLUME, T.GENERATION: "1",
                M.CREATE_TOKEN: create_token, M.MOUNTS: "0", M.MOUNT_STATE: M.CLEAN,
                **(M.FROM_DATASET if vc.source_snapshot else M.CREATED_EMPTY)}
        size = vc.size_gib
        params = {"AvailabilityZone": self.identity.availability_zone,
                  "VolumeType": vc.type, "Encrypted": vc.encrypted, "ClientToken": create_token,
                  "TagSpecifications": [{"ResourceType": "volume", "Tags": T.as_list(tags)}]}
        if vc.source_snapshot:
            # The sweep's dataset: never smaller than the snapshot (EC2 refuses that).
            size = max(size, self._dataset_snapshot()["VolumeSize"])
            params["SnapshotId"] = vc.source_snapshot
        params["Size"] = size
        if vc.iops and vc.type in ("io1", "io2", "gp3"):
            params["Iops"] = vc.iops
        if vc.throughput and vc.type == "gp3":
            params["Throughput"] = vc.throughput
        if vc.encrypted and vc.kms_key_id:
            params["KmsKeyId"] = vc.kms_key_id

        def find() -> dict | None:
            found = self.ec2.describe_volumes(Filters=T.job_filters(job) + [
                {"Name": f"tag:{M.CREATE_TOKEN}", "Values": [create_token]}])["Volumes"]
            return found[0] if found else None

        def create() -> dict:
            self._guard()
            return self.ec2_once.create_volume(**params)

        # Right before the create: a replacement that does not list it yet waits for it.
        firstvolume.state(self.lease, self.ec2, self.me, create_token)
        volume = ec2mod.create_once("the job's first volume", create, find)
        log.info("volume_created", volume_id=volume["VolumeId"], size_gib=size, type=vc.type,
                 az=self.identity.availability_zone, snapshot_id=vc.source_snapshot or None)
        return ec2mod.wait_for_volume(self.ec2, volume["VolumeId"], ("available",),
                                      vc.create_timeout_s,
                                      missing_ok_s=self.config.aws.consistency_window_s)

    def _dataset_snapshot(self) -> dict:
        """``volume.source_snapshot`` as EC2 has it, completed (a volume is made only from a
        completed snapshot); VolumeError if it is gone or failed."""
        snapshot_id, vc = self.config.volume.source_snapshot, self.config.volume
        snapshot = ec2mod.describe_snapshot(self.ec2, snapshot_id)
        if snapshot is None:
            raise VolumeError(f"volume.source_snapshot {snapshot_id} (the sweep's dataset snapshot) "
                              "does not exist: run `spotrun init` again to make it, then relaunch")
        if snapshot["State"] != "completed":  # 'error' fails at once, naming the snapshot
            snapshot = ec2mod.wait_for_snapshot(self.ec2, snapshot_id, vc.snapshot_timeout_s,
                                                safe_point=self.safe_point)
        return snapshot

    # -- attach ---------------------------------------------------------------------------

    def _attach(self, volume: dict) -> dict:
        volume_id = volume["VolumeId"]
        att = ec2mod.attachment_of(volume)
        if att is None or att["InstanceId"] != self.me:
            if att is not None:
                volume = self._unheld(volume)
            attach.attach_call(self.ec2, self.ec2_once, volume_id, self.me,
                               self.config.volume.attach_timeout_s, self._guard)
        return ec2mod.wait_for_attachment(self.ec2, volume_id, self.me,
                                          self.config.volume.attach_timeout_s)

    # -- filesystem and mount -------------------------------------------------------------

    def _mount(self, volume: dict, device: Path, *, copy_of_unused: bool = False) -> None:
        """Format on first use, fsck after an unclean stop, then mount. ``copy_of_unused``: the
        volume was restored from a source spotrun never mounted, so a missing filesystem means
        the source had none either (`spotrun init` leaves it unformatted), not lost data."""
        mount_point = self.config.mount_point
        if blockdev.mounted_device(mount_point) == Path(os.path.realpath(device)):
            log.info("volume_already_mounted", device=str(device))
            return
        volume_id = volume["VolumeId"]
        fstype = blockdev.filesystem_type(device)
        tags = M.tags_of(volume)
        if fstype is None:
            if volume.get("SnapshotId") and not copy_of_unused:
                dataset = (" (the sweep's dataset snapshot: sweep.dataset_volume must hold an ext4 "
                           "filesystem with the datasets directory)"
                           if tags.get(M.ORIGIN) == M.FROM_DATASET[M.ORIGIN] else "")
                raise VolumeError(
                    f"volume {volume_id} was restored from {volume['SnapshotId']}{dataset} but "
                    f"{device} has no filesystem; refusing to make one over restored data")
            blockdev.make_filesystem(device, FS_LABEL)
        elif tags.get(M.MOUNT_STATE, M.CLEAN) != M.CLEAN:
            log.info("fsck_needed", volume_id=volume_id, mount_state=tags.get(M.MOUNT_STATE))
            blockdev.check_filesystem(device)
        # Recorded before mounting: a snapshot with the old count is no longer fresh.
        self._guard()
        self._tag(volume_id, {M.MOUNTS: str(M.mounts(volume) + 1),
                              M.MOUNT_STATE: f"mounted:{self.me}"})
        blockdev.mount(device, mount_point, self.config.volume.mount_options)

    # -- release --------------------------------------------------------------------------

    def _my_volume(self) -> dict | None:
        if self._acquired is not None:
            # By id: a volume made moments ago may not be in a filtered list yet.
            volume = ec2mod.describe_volume(self.ec2, self._acquired.volume_id)
            att = ec2mod.attachment_of(volume)
            if att is not None and att["InstanceId"] == self.me:
                return volume
        for volume in self.job_volumes():
            att = ec2mod.attachment_of(volume)
            if att is not None and att["InstanceId"] == self.me:
                return volume
        return None

    def unmount_in_place(self) -> None:
        """For a stop/hibernate: sync, unmount and record the clean unmount (the next boot
        needs no fsck). The volume stays attached, as EBS volumes do across a stop, and the
        lease stays held: a stopped holder still holds the job."""
        volume = self._my_volume()
        mount_point = self.config.mount_point
        if blockdev.is_mounted(mount_point):
            blockdev.sync(mount_point)
            blockdev.unmount(mount_point)
        if volume is not None:
            self._tag(volume["VolumeId"], {M.MOUNT_STATE: M.CLEAN})
            log.info("volume_unmounted_in_place", volume_id=volume["VolumeId"])

    def release(self, *, snapshot: bool | None = None,
                final_tags: dict[str, str] | None = None, finished: bool = False) -> None:
        """Sync, unmount, tag ``final_tags``, start the ahead-of-need snapshot, detach, release
        the lease. The final tags (the phase the job is left in) are written while this
        instance still holds the lease: after release, the volume is the next holder's.
        ``finished``: the job is done or failed for good (a sweep never claims it again)."""
        take_snapshot = self.config.volume.snapshot_on_drain if snapshot is None else snapshot
        if self.lease is not None:
            self.lease.mark_draining()  # whoever waits for the job now waits for this drain
        volume = self._my_volume()
        if volume is not None:
            volume_id = volume["VolumeId"]
            mount_point = self.config.mount_point
            unmounted_now = blockdev.is_mounted(mount_point)
            if unmounted_now:
                blockdev.sync(mount_point)
                blockdev.unmount(mount_point)
            final = {(k if ":" in k else T.PREFIX + k): str(v)
                     for k, v in (final_tags or {}).items()}
            if unmounted_now or M.tags_of(volume).get(M.MOUNT_STATE) == M.CLEAN:
                self._tag(volume_id, {M.MOUNT_STATE: M.CLEAN, **final})
                if take_snapshot:
                    M.start_snapshot(self.ec2, self.ec2_once, self.config.job.id,
                                     self._refresh(volume_id), M.ROLE_DRAIN_SNAPSHOT,
                                     window_s=self.config.aws.consistency_window_s, optional=True)
            elif final:
                self._tag(volume_id, final)

            def detach_requested() -> bool:
                # Detaching (or gone) from this instance: an earlier DetachVolume that was
                # answered 5xx did it; a retry then meets IncorrectState ('available').
                att = ec2mod.attachment_of(ec2mod.describe_volume(self.ec2, volume_id))
                return att is None or att["InstanceId"] != self.me or att["State"] == "detaching"

            ec2mod.call_retrying(f"detaching {volume_id}", lambda: self.ec2.detach_volume(
                VolumeId=volume_id, InstanceId=self.me), settled=detach_requested,
                done_codes=("IncorrectState",))
            ec2mod.wait_for_attachment(self.ec2, volume_id, self.me,
                                       self.config.volume.attach_timeout_s, state="detached")
            log.info("volume_released", volume_id=volume_id, snapshot=take_snapshot)
        if self.lease is not None:
            self.lease.release(finished=finished)
        self._acquired = None

    # -- progress tags --------------------------------------------------------------------

    def record(self, **tags: str) -> None:
        """Progress tags on the job's volume: ``record(phase="training")`` or full keys."""
        full = {(k if ":" in k else T.PREFIX + k): str(v) for k, v in tags.items()}
        if self._acquired is not None:
            volume_id = self._acquired.volume_id
        else:
            volume = self._my_volume()
            if volume is None:
                plan = M.resolve(self.job_volumes())
                if plan is None:
                    raise VolumeError(f"no volume of job {self.config.job.id!r} to record on")
                volume = plan.current
            volume_id = volume["VolumeId"]
        self._tag(volume_id, full)

    def _tag(self, volume_id: str, tags: dict[str, str]) -> None:
        ec2mod.call_retrying(f"tagging {volume_id}", lambda: self.ec2.create_tags(
            Resources=[volume_id], Tags=T.as_list(tags)),
            settled=lambda: ec2mod.volume_has_tags(self.ec2, volume_id, tags))

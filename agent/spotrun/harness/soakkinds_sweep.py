"""The soak's sweep kinds (issue 19): a soak job that is a small sweep on its own Spot Fleet,
every instance the real agent claiming experiments through the soak's lease table, each kind
aimed at one moment of the claim protocol:

- ``sweep_simultaneous_claims``: as many instances as experiments boot at once and claim at
  once. Their agents are held (SIGSTOP on the process group) until the fleet has booted them
  all, let go, stopped again each as its metadata server answers its tags (the end of its
  identify: its next call is the claim's first read of the lease table), and let go together
  once all are; whether their claims overlapped is read from the ledger (each instance's
  first lease read before another's first take) -- ``:raced`` / ``:no_race``.
- ``sweep_interrupted_between_jobs``: one instance is booted with the ``identify.started``
  pause point, which every experiment's lifecycle passes right after its claim: the soak lets
  its first experiment go, and at the second stop -- its first experiment released finished
  and the next one claimed, before anything of it is touched (both read from the ledger) --
  posts a spot notice and lets it go on, or terminates it there. The ``-before-claim``
  variants use the ``sweep.claiming`` pause point instead (the first experiment released
  finished, the next not yet claimed): after a notice there the instance must claim nothing
  more (``:claimed_after_notice`` otherwise).
- ``sweep_last_two_finish_together``: the last two experiments (the same length) are each
  frozen inside their final checkpoint save (the counting trainer's ``hold_at``) until both
  are, then let go at once: both agents release their experiment finished, find nothing left
  and meet over the fleet's cancel.

Judged after the job by :func:`check_sweep_job` from the ledger and the volume images
(:mod:`spotrun.harness.soaksweep`), never from the agents' logs: one volume per experiment, each
finished exactly once with its own exact sum, the claim protocol kept, the fleet cancelled
iff every experiment finished, exactly once, by an instance.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from spotrun.harness import soakcheck, soakledger, soaksweep, soakwitness
from spotrun import tags as T
from spotrun.localcloud.ledger import calls, performed
from spotrun.log import get_logger
from spotrun.harness.soakinject import Kind, signal_pid
from spotrun.harness.soakjob import LEASE_TABLE, JobEnded, SoakJob
from spotrun.harness.sweepwitness import SWEEP_ITEM_PREFIX, lease_history, resource_jobs
from spotrun_trainer.store import SAVE_POINTS

log = get_logger("soak")
PAUSE_AFTER_CLAIM = "identify.started"  # spotrun.boot: each experiment's lifecycle, after its claim
PAUSE_BEFORE_CLAIM = "sweep.claiming"    # spotrun.sweeprun: released finished, the next not claimed
TAGS_PATH = "meta-data/tags/instance"   # spotrun.identity: the last of a boot's identify reads
HOLD_POINTS = [p for p in SAVE_POINTS if p != "saved"]


@dataclass
class Moment:
    """What a sweep kind did: whether its moment landed, the faults it injected, and the
    interruption it made (an instance sent away between two experiments), if any."""
    kind: str
    landed: bool
    faults: list[str] = field(default_factory=list)
    interruption: dict | None = None


class SweepSoakJob(SoakJob):
    """A soak job that is a sweep: the plan's experiments on a Spot Fleet of the plan's
    capacity, every instance's agent claiming them through the soak's lease table."""

    def __init__(self, cloud, out: Path, plan, repository: str, timeout_s: float):
        super().__init__(cloud, out, plan, repository, timeout_s)
        self.barrier = 0                  # how many first boots to hold (simultaneous_claims)
        self._held: list = []             # (instance, agent process), held at boot
        self.released_together_at: float | None = None
        self.moment: Moment | None = None

    @property
    def experiments(self) -> dict[str, int]:
        return self.job_plan.experiments

    def _job_overrides(self) -> dict:
        out = super()._job_overrides()
        out["aws"] = {"lease_table": LEASE_TABLE}
        out["sweep"] = {"id": self.plan.job_id, "claim": self.job_plan.claim, "experiments": [
            {"job": job, "env": {"STEPS": str(steps)}} for job, steps in self.experiments.items()]}
        return out

    def start(self) -> None:
        """The rehearsal's start with the sweep's capacity: every first instance is launched
        (and booted) by the fleet's first pass."""
        from spotrun import userdata
        from spotrun.localcloud.fleet import LaunchSpec
        from spotrun.harness.rehearsal_setup import _check_reachable, ensure_lease_table

        self.out.mkdir(parents=True, exist_ok=True)
        _check_reachable(self.plan.trainer_user, [self.out, Path(sys.executable).parent])
        ensure_lease_table(self.cloud, LEASE_TABLE)
        launch = LaunchSpec(instance_type="p3.2xlarge",
                            user_data=userdata.render(self._job_overrides()))
        request_id = self.cloud.request_spot_fleet(self.job_plan.capacity, launch=launch,
                                                   az_policy=self.plan.az_policy, boot=self.boot)
        self.fleet = self.cloud.fleets[request_id]
        log.info("sweep_fleet_requested", fleet=request_id, capacity=self.job_plan.capacity,
                 experiments=list(self.experiments))

    def boot(self, cloud, inst):
        proc = super().boot(cloud, inst)
        if len(self._held) < self.barrier:
            # Held before it gets anywhere, until the fleet has booted every first instance
            # (simultaneous_claims lets them go).
            _signal_group(proc.pid, signal.SIGSTOP)
            self._held.append((inst, proc))
        return proc

    # -- the ledger's view of the claims --------------------------------------------------

    def lease_state(self) -> dict[str, tuple[str | None, bool]]:
        """job -> (its holder now, finished), from the ledger's lease writes."""
        state = {}
        for job, writes in lease_history(self.ledger_records(), self.experiments).items():
            state[job] = (writes[-1]["holder"] if writes else None,
                          any(w["finished"] for w in writes))
        return state

    def takes_by(self, instance_id: str) -> list[tuple[str, float]]:
        """(job, ledger time) of every experiment ``instance_id`` took, in order."""
        out = []
        for job, writes in lease_history(self.ledger_records(), self.experiments).items():
            before = None
            for write in writes:
                if write["holder"] == instance_id and before != instance_id:
                    out.append((job, write["t"]))
                before = write["holder"]
        return sorted(out, key=lambda taken: taken[1])

    def finished_by(self, instance_id: str, job: str) -> bool:
        writes = lease_history(self.ledger_records(), [job])[job]
        return any(w["finished"] and w["by"] == instance_id for w in writes)

    # -- the job --------------------------------------------------------------------------

    def run_slots(self) -> str | None:
        slot = self.job_plan.slots[0]
        kind = SWEEP_CATALOGUE[slot.kind]
        if kind.prepare is not None:
            kind.prepare(self, slot)
        self.start()
        self.slot_started = time.time() - 0.5
        try:
            self.moment = kind.run(self, slot)
        except JobEnded:
            self.moment = Moment(slot.kind, False, [f"{slot.kind}:after_completion"])
        except Exception as exc:  # noqa: BLE001 - one job's trouble is reported, the soak goes on
            log.exception("soak_slot_failed", job=self.plan.job_id, slot=0, kind=slot.kind)
            return f"slot 0 ({slot.kind}): {type(exc).__name__}: {exc}"
        try:
            self.wait("the sweep's fleet to be cancelled", self._fleet_cancelled)
        except TimeoutError as exc:
            return str(exc)
        return None


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the instance's process tree is its own session
    except (ProcessLookupError, PermissionError):
        pass


def _stopped(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state == "T"


# -- sweep_simultaneous_claims ------------------------------------------------------------------

def prepare_simultaneous_claims(job: SweepSoakJob, slot) -> None:
    job.barrier = job.job_plan.capacity


def claim_windows(records: list[dict], experiments, instances) -> dict[str, tuple[float, float]]:
    """Each instance's first claim: (its first read of an experiment's lease, its first take
    of one), ledger times; instances that took nothing are left out."""
    experiments, out = set(experiments), {}
    for instance in instances:
        reads = [r["t"] for r in calls(records, action="GetItem", service="dynamodb",
                                       caller_instance=instance)
                 if (r.get("key") or {}).get("job") in experiments]
        takes = [r["t"] for r in calls(records, action="PutItem", service="dynamodb",
                                       caller_instance=instance)
                 if performed(r) and (r.get("item") or {}).get("job") in experiments
                 and (r.get("item") or {}).get("holder") == instance]
        if reads and takes:
            out[instance] = (min(reads), min(takes))
    return out


def overlapping(windows: dict[str, tuple[float, float]]) -> list[tuple[str, str]]:
    """The pairs of instances whose first claims overlapped: each read before the other took."""
    ids = sorted(windows)
    return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]
            if windows[a][0] < windows[b][1] and windows[b][0] < windows[a][1]]


def _set_affinity(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` and of its children on ``cpus``."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            tids = [t.id for t in proc.threads()]
        except psutil.NoSuchProcess:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass  # gone meanwhile


def _gate(job: SweepSoakJob, held: list) -> list[str]:
    """Let the held first agents go, stop each again as it reads its tags from metadata (the
    end of its identify: what is left before its first claim's read of the lease table is the
    making of its two AWS clients), and let them all go at once, on one CPU: time-shared
    alike, they reach the table together (their own CPUs back once each has claimed, see
    simultaneous_claims). Returns the instances that reached the table before they were
    stopped (none, unless one outran the harness)."""
    for _, proc in held:
        _signal_group(proc.pid, signal.SIGCONT)
    pending = {inst.instance_id: (inst, proc) for inst, proc in held}
    stopped = []
    deadline = time.monotonic() + 60
    try:
        while pending and time.monotonic() < deadline:
            for instance_id, (inst, proc) in list(pending.items()):
                server = inst.metadata
                if proc.poll() is not None or server is None:
                    del pending[instance_id]  # died: nothing to hold (the check sees the rest)
                elif server.gets.get(TAGS_PATH):
                    _signal_group(proc.pid, signal.SIGSTOP)
                    stopped.append(proc)
                    del pending[instance_id]
            time.sleep(0.002)  # another process's progress: a tight poll, for a few seconds
    finally:
        one_cpu = {max(os.sched_getaffinity(0))}
        for proc in stopped:
            _set_affinity(proc.pid, one_cpu)
        for proc in stopped:  # all at once
            _signal_group(proc.pid, signal.SIGCONT)
        job.released_together_at = time.time()
    records = job.ledger_records()
    return sorted({r.get("instance") for r in calls(records, action="GetItem", service="dynamodb")
                   if r.get("t", 0) < job.released_together_at}
                  & {inst.instance_id for inst, _ in held})


def simultaneous_claims(job: SweepSoakJob, slot) -> Moment:
    capacity = job.job_plan.capacity
    job.wait("every first instance booted and held", lambda: len(job._held) >= capacity, 60)
    job.barrier = 0
    slipped = _gate(job, job._held)
    first = [inst.instance_id for inst, _ in job._held]

    def claimed():
        job._check_alive()
        windows = claim_windows(job.ledger_records(), job.experiments, first)
        return windows if len(windows) == len(first) else None
    try:
        windows = job.wait("every first instance's claim", claimed, 120)
    finally:
        every_cpu = os.sched_getaffinity(0)
        for _, proc in job._held:
            _set_affinity(proc.pid, every_cpu)
    pairs = overlapping(windows)
    refused = [r for r in calls(job.ledger_records(), action="PutItem", service="dynamodb")
               if r.get("error") == "ConditionalCheckFailedException"
               and (r.get("item") or {}).get("job") in job.experiments]
    raced = bool(pairs)
    job.race_results.append({"kind": slot.kind, "instances": first, "raced": raced,
                             "overlapping": pairs, "refused_swaps": len(refused),
                             "slipped_past_the_gate": slipped,
                             "windows": {i: [round(a, 3), round(b, 3)] for i, (a, b) in windows.items()}})
    return Moment(slot.kind, raced, [f"{slot.kind}:{'raced' if raced else 'no_race'}"])


# -- sweep_interrupted_between_jobs -------------------------------------------------------------

def _before_claim(job: SweepSoakJob) -> bool:
    return job.job_plan.variant.endswith("-before-claim")


def prepare_interrupted_between_jobs(job: SweepSoakJob, slot) -> None:
    # The fleet's first boot only (SoakJob.boot).
    job.pause_next_boot = PAUSE_BEFORE_CLAIM if _before_claim(job) else PAUSE_AFTER_CLAIM


def interrupted_between_jobs(job: SweepSoakJob, slot) -> Moment:
    armed = job.wait("the armed instance to boot", lambda: next(iter(job.pause_armed), None), 60)
    job.pause_armed.pop(armed, None)
    inst = job.cloud.instance(armed)
    missed = Moment(slot.kind, False, [f"{slot.kind}:missed"])
    before_claim = _before_claim(job)
    if before_claim:
        # Stopped at sweep.claiming: only after a first experiment ran to its end.
        pid = job.await_agent_paused(
            armed, max(job.experiments.values()) * job.job_plan.step_s * 2 + 90, trained_ok=True)
        if pid is None:
            return missed
        takes = job.takes_by(armed)
        first = takes[0][0] if takes else None
        if not first or len(takes) != 1 or not job.finished_by(armed, first):
            return missed
        claimed = None
    else:
        pid = job.await_agent_paused(armed)  # its first experiment claimed, its lifecycle at its start
        if pid is None:
            return missed
        [(first, _)] = job.takes_by(armed)[:1] or [(None, 0.0)]
        signal_pid(pid, signal.SIGCONT)

        def between():
            """The first experiment released finished, the next claimed, the agent stopped."""
            job._check_alive()
            if inst.state != "running":
                return "gone"
            takes = job.takes_by(armed)
            if first and job.finished_by(armed, first) and len(takes) >= 2 and _stopped(pid):
                return takes[1][0]
            return None
        try:
            claimed = job.wait(f"{armed} between two experiments", between,
                               max(job.experiments.values()) * job.job_plan.step_s * 2 + 90)
        except JobEnded:
            return missed
        if claimed == "gone":  # nothing left for it: it left the fleet
            return Moment(slot.kind, False, [f"{slot.kind}:not_reached"])
    how = (job.job_plan.variant or slot.rng.choice(["notice", "kill"])).removesuffix("-before-claim")
    record = {"kind": slot.kind, "instance_id": armed, "released": first, "claimed": claimed,
              "how": how, "at": time.time()}
    if how == "kill":
        job.cloud.terminate(armed)
        drained, cause = False, "killed between experiments"
    else:
        job.cloud.interrupt(armed, "terminate", in_seconds=job.notice_s)
        injected = time.time()
        signal_pid(pid, signal.SIGCONT)

        def stopped():
            if inst.state != "running":
                return "gone"
            if job._matching(armed, "sweep_instance_done", injected - 0.5, {}):
                return "done"
            return None
        ended = job.wait(f"{armed} to stop on the notice", stopped, job.notice_s + 60)
        job.cloud.terminate(armed)  # the notice's time: the spot service ends it
        drained = ended == "done"
        cause = "notice between experiments"
    record.update(drained=drained, cause=cause)
    job.gone.append(armed)
    faults = [f"{slot.kind}:{how}" + ("-before-claim" if before_claim else "")]
    if before_claim and how == "notice" and len(job.takes_by(armed)) > 1:
        faults.append(f"{slot.kind}:claimed_after_notice")  # told to go, it took another
    return Moment(slot.kind, True, faults, interruption=record)


# -- sweep_last_two_finish_together -------------------------------------------------------------

def _last_two(job: SweepSoakJob):
    """The last two experiments, once every other one finished and both are held by live
    instances: [(job, instance)]; "late" once fewer than two are left unfinished."""
    job._check_alive()
    state = job.lease_state()
    unfinished = {j: holder for j, (holder, finished) in state.items() if not finished}
    if len(unfinished) < 2:
        return "late"
    if len(unfinished) > 2:
        return None
    pairs = sorted(unfinished.items())
    holders = [h for _, h in pairs]
    if None in holders or holders[0] == holders[1]:
        return None
    if any(job.cloud.instances.get(h) is None or job.cloud.instances[h].state != "running"
           for h in holders):
        return None
    return pairs


def last_two_finish_together(job: SweepSoakJob, slot) -> Moment:
    missed = Moment(slot.kind, False, [f"{slot.kind}:missed"])
    budget = sum(job.experiments.values()) * job.job_plan.step_s + 120
    pair = job.wait("the last two experiments, both training", lambda: _last_two(job), budget)
    if pair == "late":
        return missed
    every = job.job_plan.ckpt_every
    point = slot.rng.choice(HOLD_POINTS)
    pending = {instance: experiment for experiment, instance in pair}
    requested: dict[str, Path] = {}
    held: dict[str, dict] = {}

    def both_held():
        for instance, experiment in pending.items():
            if instance in held:
                continue
            inst = job.cloud.instance(instance)
            if inst.state != "running":
                return "gone"
            where = inst.mount_point / "checkpoints"
            if instance not in requested:
                progress = job._fresh_progress(inst)
                steps = job.experiments[experiment]
                step = progress.get("global_step")
                if progress.get("steps_per_epoch") != steps or not isinstance(step, int):
                    continue
                if step >= steps:
                    return "late"
                if step > steps - every:  # the next save is the last one
                    (where / ".soak-hold").write_text(point)
                    requested[instance] = where
                continue
            for marker in where.glob(".soak-held-*"):
                try:
                    held[instance] = json.loads(marker.read_text())
                except (OSError, ValueError):
                    continue  # still being written
                marker.unlink()
        return "held" if len(held) == len(pending) else None
    try:
        answer = job.wait("both last trainers frozen in their last save", both_held,
                          max(job.experiments.values()) * job.job_plan.step_s + 60)
    except TimeoutError:
        answer = "late"
    if answer != "held":
        for where in requested.values():
            (where / ".soak-hold").unlink(missing_ok=True)
        for info in held.values():
            signal_pid(info["pid"], signal.SIGCONT)
        return missed
    for info in held.values():  # let go together
        signal_pid(info["pid"], signal.SIGCONT)
    job.race_results.append({"kind": slot.kind, "pair": [list(p) for p in pair],
                             "held_at": point, "steps": [info.get("step") for info in held.values()],
                             "released": time.time()})
    return Moment(slot.kind, True, [f"{slot.kind}:held_at:{point}"])


def cancel_race(records: list[dict], sweep_id: str, instances) -> list[str]:
    """The instances that read or wrote the sweep's cancel item: each saw every experiment
    finished and went for the one cancel."""
    key = f"{SWEEP_ITEM_PREFIX}{sweep_id}"
    return sorted({r.get("instance") for r in records if r.get("service") == "dynamodb"
                   and r.get("instance") in set(instances)
                   and key in ((r.get("key") or {}).get("job"), (r.get("item") or {}).get("job"))})


SWEEP_CATALOGUE: dict[str, Kind] = {k.name: k for k in [
    Kind("sweep_simultaneous_claims", "a sweep's instances, as many as its experiments, boot "
         "at once and claim at once", simultaneous_claims, prepare_simultaneous_claims),
    Kind("sweep_interrupted_between_jobs", "a sweep's instance released one experiment "
         "finished and claimed the next: a notice, or killed, before it touches it",
         interrupted_between_jobs, prepare_interrupted_between_jobs),
    Kind("sweep_last_two_finish_together", "a sweep's last two experiments (the same length) "
         "frozen in their last save and let go together: one cancel of the fleet",
         last_two_finish_together),
]}


# -- the check ------------------------------------------------------------------------------

def check_sweep_job(job: SweepSoakJob, decoy: dict, baseline: set[str], error: str | None) -> dict:
    """The sweep's invariants after the job, as :func:`spotrun.harness.soakcheck.check_job` judges a
    single job's: the result has the same fields, so the summary counts both alike."""
    plan, cloud = job.job_plan, job.cloud
    experiments = job.experiments
    violations: list[str] = [f"could not drive the job: {error}"] if error else []
    ec2 = cloud.client("ec2", faults=False)

    def job_volumes(experiment: str) -> list[dict]:
        return ec2.describe_volumes(Filters=T.job_filters(experiment))["Volumes"]

    def settled():
        found = {e: job_volumes(e) for e in experiments}
        return found if all(v["State"] in ("available", "error")
                            for vols in found.values() for v in vols) else None
    try:
        volumes = soakcheck._await(settled, 30, "sweep volumes settled")
    except TimeoutError:
        volumes = {e: job_volumes(e) for e in experiments}

    records = job.ledger_records()
    rows, finals, finished = [], set(), True
    attached_now = {}
    for experiment, steps in experiments.items():
        vols = volumes[experiment]
        finals.update(v["VolumeId"] for v in vols)
        attached_now.update({v["VolumeId"]: a["InstanceId"] for v in vols
                             for a in v.get("Attachments", [])
                             if a.get("State") in ("attaching", "attached")
                             and getattr(cloud.instances.get(a["InstanceId"]), "state", None) == "running"})
        if len(vols) != 1:
            violations.append(f"sweep one volume per experiment: {experiment} has {len(vols)} "
                              f"({[(v['VolumeId'], v['State']) for v in vols]})")
        agent_record, trainer_record, image_error = soakcheck.final_records(cloud, vols)
        broken = soaksweep.completion_violations(experiment, steps, trainer_record, image_error)
        if agent_record is None and not broken:
            broken = [f"sweep finished once: {experiment}'s volume holds the trainer's record but "
                      "not the agent's completion record"]
        finished = finished and not broken
        if not job.cancelled_by_soak or trainer_record is not None:
            violations.extend(broken)
        rows.append({"job": experiment, "steps": steps, "volumes": [v["VolumeId"] for v in vols],
                     "sum": ((trainer_record or {}).get("metrics") or {}).get("sum"),
                     "runs": ((trainer_record or {}).get("metrics") or {}).get("runs"),
                     "holders": sorted({w["holder"] for w in lease_history(records, [experiment])
                                        [experiment] if w["holder"]})})
        # Per experiment, as for a single job: never two of its volumes attached, no newest
        # copy deleted, no write without its lease or takeover from a live holder (ledger);
        # copy before delete; one snapshot per drain or migration.
        violations.extend(soakledger.check(records, experiment, LEASE_TABLE,
                                           attached_now=attached_now))
        violations.extend(soakwitness.migration_violations(
            records, experiment, getattr(getattr(job, "delete_witness", None), "seen", None)))
        violations.extend(soakledger.duplicate_snapshots(
            [r for r in cloud.ledger() if r.get("t", 0) >= job.started_wall], experiment))

    # The sweep's own: the claim protocol, the one cancel iff all finished, leaves when idle.
    instances = {b["instance_id"] for b in job.boots}
    fleets = {job.fleet.request_id} if job.fleet is not None else set()
    violations.extend(soaksweep.protocol_violations(records, experiments, table=LEASE_TABLE))
    violations.extend(soaksweep.fleet_violations(records, experiments, plan.job_id, fleets=fleets,
                                                 all_finished=finished,
                                                 expect_cancel=not job.cancelled_by_soak))
    # Only the sweep's own resources: its experiments', its fleet and instances, its items.
    own = set(experiments) | {f"{SWEEP_ITEM_PREFIX}{plan.job_id}"}
    violations.extend(soakwitness.foreign_touches(records, own, instances, fleets))
    existing_volumes = {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]
                        if v["State"] not in ("deleting", "deleted")}
    existing_snapshots = {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
    violations.extend(soakwitness.unaccounted(records, set(experiments), instances,
                                              final_volumes=finals, existing_volumes=existing_volumes,
                                              existing_snapshots=existing_snapshots))
    new = [v for v in ec2.describe_volumes()["Volumes"] if v["VolumeId"] not in baseline]
    orphans = [v["VolumeId"] for v in new if T.JOB not in T.as_dict(v.get("Tags"))
               and not any(a.get("Device") == "/dev/sda1" for a in v.get("Attachments", []))]
    if orphans:
        violations.append(f"inv6 orphaned volumes without a job tag: {orphans}")
    failures = [e for i in instances for e in job.events_of(i) if e.get("event") == "failure_policy"]
    if failures:
        violations.append(f"failure policy applied: {failures[0].get('reason')}")
    view = soakcheck.decoy_view(cloud, decoy["volume_id"], decoy["snapshot_id"])
    if view != decoy["view"]:
        violations.append(f"inv6 the decoy job's resources changed: {view}")

    moment = job.moment or Moment(plan.slots[0].kind, False, [f"{plan.slots[0].kind}:not_reached"])
    faults = list(moment.faults)
    if moment.kind == "sweep_last_two_finish_together" and moment.landed:
        racers = cancel_race(records, plan.job_id, instances)
        faults.append(f"{moment.kind}:{'raced' if len(racers) > 1 else 'one_saw_all_finished'}")
    interruptions = []
    if moment.interruption is not None:
        i = moment.interruption
        interruptions.append({"kind": moment.kind, "instance_id": i["instance_id"],
                              "drained": i["drained"], "cause": i["cause"], "reached": None,
                              "resumed": None, "redone": 0, "faults": faults,
                              "released": i["released"], "claimed": i["claimed"]})
    landed = moment.landed and not any(soakcheck.is_off_moment(f) for f in moment.faults)
    kinds = Counter({moment.kind: 1} if landed else {})
    extra = Counter(f for f in faults if not soakcheck.is_off_moment(f))
    missed = [f"{moment.kind}/{f}" for f in faults if soakcheck.is_off_moment(f)]
    snapshots = [s for e in experiments for s in ec2.describe_snapshots(
        Filters=T.job_filters(e), OwnerIds=["self"])["Snapshots"]]
    live = {v["VolumeId"] for vols in volumes.values() for v in vols}
    kept = [{"id": s["SnapshotId"], "role": T.as_dict(s.get("Tags")).get(T.ROLE),
             "state": s["State"],
             "of_live_volume": T.as_dict(s.get("Tags")).get("spotrun:source-volume") in live}
            for s in snapshots]
    ledger_since = [r for r in cloud.ledger() if r.get("t", 0) >= job.started_wall]
    creations = soakledger.snapshot_creations(ledger_since, set(resource_jobs(records, experiments)))
    return {"index": plan.index, "seed": plan.seed, "job": plan.job_id, "completed": finished,
            "sweep": rows, "interruptions": interruptions, "kinds": dict(kinds),
            "extra_faults": dict(extra), "missed": missed, "lost": {}, "violations": violations,
            "snapshots_left": kept, "snapshots_created": creations["created"],
            "duplicate_snapshots": sum(len(made) - 1 for _, made in creations["groups"]),
            "same_instance_interruptions": [], "bad_inputs": [], "races": job.race_results}

"""The soak's checker: after every job, the invariants of DESIGN.md against the cloud's truth.

Reads only the cloud's fault-free view (``cloud.client("ec2", faults=False)``), its call
ledger (invariant 1 and races: :mod:`spotrun.harness.soakledger`; invariants 2, 5 and 6:
:mod:`spotrun.harness.soakwitness`), the job's final volume image, the agents' JSON logs and the
trainers' own logs. Each violation is one sentence naming the invariant.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from spotrun.harness import soakledger, soakwitness
from spotrun import tags as T
from spotrun.harness.rehearsal_volume import VolumeImage, VolumeReadError
from spotrun.waiting import wait_until

DECOY_JOB = "soak-decoy-other-job"
SNAPSHOT_ROLES = ("migration-snapshot", "drain-snapshot")


def _ec2(cloud):
    return cloud.client("ec2", faults=False)


def _await(condition, timeout: float, what: str):
    # The cloud's timed states: polled, as a client of EC2 would.
    return wait_until(condition, timeout, interval_s=0.05, what=what,
                      error=lambda: TimeoutError(what))


def make_decoy(cloud) -> dict:
    """A volume and snapshot of another job, named like spotrun's: nothing may touch them."""
    ec2 = _ec2(cloud)
    tags = [{"ResourceType": "volume", "Tags": T.as_list(
        {T.NAME: "DL-datasets-checkpoints", T.JOB: DECOY_JOB, T.ROLE: "volume"})}]
    volume_id = ec2.create_volume(AvailabilityZone=cloud.azs[0], Size=1, VolumeType="gp3",
                                  TagSpecifications=tags)["VolumeId"]
    _await(lambda: ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["State"] == "available",
           30, "decoy volume available")
    snapshot_id = ec2.create_snapshot(VolumeId=volume_id, TagSpecifications=[{
        "ResourceType": "snapshot", "Tags": T.as_list(
            {T.NAME: "DL-datasets-checkpoints", T.JOB: DECOY_JOB, T.ROLE: "migration-snapshot",
             "spotrun:source-volume": volume_id})}])["SnapshotId"]
    return {"volume_id": volume_id, "snapshot_id": snapshot_id, "view": decoy_view(cloud, volume_id,
                                                                                   snapshot_id)}


def decoy_view(cloud, volume_id: str, snapshot_id: str) -> dict:
    ec2 = _ec2(cloud)
    try:
        v = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
        s = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]
    except Exception as exc:  # noqa: BLE001 - gone is exactly what the check reports
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"volume_tags": T.as_dict(v.get("Tags")), "volume_attachments": v.get("Attachments"),
            "snapshot_tags": T.as_dict(s.get("Tags"))}


def volume_ids(cloud) -> set[str]:
    return {v["VolumeId"] for v in _ec2(cloud).describe_volumes()["Volumes"]}


def _steps_redone(reached, resumed):
    if not isinstance(reached, int) or not isinstance(resumed, int):
        return None
    return max(0, reached - resumed)


def _trainer_starts(job, instance_id: str) -> list[dict]:
    try:
        return job.trainer_starts(instance_id)
    except ValueError:
        return []


def _trainer_said(job, instance_id: str, event: str) -> list[dict]:
    """The trainer's own lines of ``event`` on one instance (its output, which the agent only
    redirects to state/trainer.log): the resume check reads these, not the agent's events."""
    import json
    import re

    path = job.cloud.instance(instance_id).state_dir / "trainer.log"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        # The trainer library's log lines carry a journal priority prefix ("<6>{...}").
        line = re.sub(r"^<\d>", "", line)
        if f'"{event}"' not in line:
            continue
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and item.get("event") == event:
            found.append(item)
    return found


def _next_resume(job, instance_id: str) -> int | None:
    """The step the trainer that ran after ``instance_id``'s went away resumed from."""
    order = []
    for boot in job.boots:
        if boot["instance_id"] not in order:
            order.append(boot["instance_id"])
    for later in order[order.index(instance_id) + 1:] if instance_id in order else []:
        starts = _trainer_starts(job, later)
        if starts:
            return starts[0].get("resume_step")
    return None


def resumed_after(job, note: dict) -> int | None:
    """Where training resumed after an interruption inside one instance: the next trainer on
    it, or, if none started there before the instance went, the next instance's first."""
    after = _trainer_starts(job, note["instance_id"])[note["starts_before"]:]
    if after:
        return after[0].get("resume_step")
    return _next_resume(job, note["instance_id"])


def finished_on(job, instance_id: str) -> bool:
    """The job's completion was recorded on this instance."""
    return any(e.get("event") == "completion_recorded" for e in job.events_of(instance_id))


def is_off_moment(fault: str) -> bool:
    """A fault that did not land where it was aimed (injected as something plainer)."""
    return fault.endswith((":missed", ":late", ":not_reached", ":no_failure", ":no_race",
                           ":after_completion"))


def race_violations(races: list[dict], records: list[dict], job_id: str,
                    table: str | None) -> list[str]:
    """Invariant 1 under a race, from the cloud's call ledger (not the loser's own log): the
    agent that did not win made no mutating call on the job after the winner's acquisition."""
    volumes, snapshots = soakledger.job_resources(records, job_id)
    return soakledger.race_violations(races, records, job_id, table or None, volumes, snapshots)


def ledger_violations(job, volumes: list[dict]) -> list[str]:
    """The ledger's race checks (spotrun.harness.soakledger) for this job's calls, with the cloud's
    own attachment state of the job's volumes at the end."""
    cloud = job.cloud
    records = job.ledger_records()
    attached_now = {v["VolumeId"]: a["InstanceId"] for v in volumes
                    for a in v.get("Attachments", []) if a.get("State") in ("attaching", "attached")
                    and getattr(cloud.instances.get(a["InstanceId"]), "state", None) == "running"}
    return soakledger.check(records, job.plan.job_id, job.plan.lease_table or None,
                            races=job.race_results, attached_now=attached_now)


def final_records(cloud, volumes: list[dict]) -> tuple[dict | None, dict | None, str | None]:
    """The agent's completion record and the trainer's own, on the job's one remaining volume,
    read from its image (not through the agent): (agent's or None, trainer's or None, why the
    image could not be read or None)."""
    import json

    if len(volumes) != 1:
        return None, None, f"{len(volumes)} job volumes at the end, not one"
    volume_id = volumes[0]["VolumeId"]
    wanted = [soakwitness.COMPLETION_RECORD, soakwitness.TRAINER_COMPLETION]
    try:
        found = VolumeImage(cloud.dataplane.volume_path(volume_id)).read(wanted)
    except VolumeReadError as exc:
        return None, None, str(exc)
    records = []
    for name in wanted:
        if found.get(name) is None:
            records.append(None)
            continue
        try:
            record = json.loads(found[name])
        except ValueError as exc:
            return None, None, f"{volume_id}: {name} is not JSON ({exc})"
        records.append(record if isinstance(record, dict) else {"time": None})
    return records[0], records[1], None


def final_completion(cloud, volumes: list[dict]) -> tuple[dict | None, str | None]:
    """The agent's completion record on the job's one remaining volume (:func:`final_records`)."""
    record, _, error = final_records(cloud, volumes)
    return record, error


def witness_violations(job, volumes: list[dict]) -> tuple[list[str], dict | None, str | None]:
    """Invariants 2, 5 and 6 from the ledger and the final image (spotrun.harness.soakwitness)."""
    cloud = job.cloud
    ec2 = _ec2(cloud)
    completion, trainer_completion, image_error = final_records(cloud, volumes)
    instances = {b["instance_id"] for b in job.boots}
    fleets = {job.fleet.request_id} if job.fleet is not None else set()
    existing_volumes = {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]
                        if v["State"] not in ("deleting", "deleted")}
    existing_snapshots = {s["SnapshotId"] for s in ec2.describe_snapshots(
        OwnerIds=["self"])["Snapshots"]}
    found = soakwitness.check(
        job.ledger_records(), job.plan.job_id, instances, fleets, completion=completion,
        image_error=image_error, expect_cancel=not job.cancelled_by_soak,
        final_volumes={v["VolumeId"] for v in volumes}, existing_volumes=existing_volumes,
        existing_snapshots=existing_snapshots, trainer_completion=trainer_completion,
        require_trainer_record=True,  # the soak's trainer speaks the protocol
        image_at_delete=getattr(getattr(job, "delete_witness", None), "seen", None))
    return found, completion, image_error


def unreached_slots(kinds: list[str], completed: bool) -> tuple[list[str], list[str]]:
    """Slots the job finished before (the agent cancelled the fleet before the harness got to
    them): missed moments when the job did complete, a violation when it did not."""
    missed = [f"{kind}/{kind}:after_completion" for kind in kinds]
    violations = [] if completed or not kinds else [
        f"the fleet was cancelled before the soak's slots {kinds} and the job has not completed"]
    return missed, violations


def check_job(job, decoy: dict, baseline: set[str], error: str | None) -> dict:
    plan = job.job_plan
    cloud = job.cloud
    violations: list[str] = []
    if error:
        violations.append(f"could not drive the job: {error}")
    ec2 = _ec2(cloud)
    every = plan.ckpt_every

    # Settle: the last instance's volume detaches after its release.
    def settled():
        vols = ec2.describe_volumes(Filters=T.job_filters(plan.job_id))["Volumes"]
        return vols if all(v["State"] in ("available", "error") for v in vols) else None
    try:
        volumes = _await(settled, 30, "job volumes settled")
    except TimeoutError:
        volumes = ec2.describe_volumes(Filters=T.job_filters(plan.job_id))["Volumes"]

    # Invariant 1: exactly one volume of the job survives.
    if len(volumes) != 1:
        violations.append(f"inv1 one copy: {len(volumes)} volumes of the job "
                          f"({[(v['VolumeId'], v['State']) for v in volumes]})")
    tags = T.as_dict(volumes[0].get("Tags")) if len(volumes) == 1 else {}
    # No orphans: every volume created during the job is the job's (or an instance's root).
    new = [v for v in ec2.describe_volumes()["Volumes"] if v["VolumeId"] not in baseline]
    orphans = [v["VolumeId"] for v in new if T.JOB not in T.as_dict(v.get("Tags"))
               and not any(a.get("Device") == "/dev/sda1" for a in v.get("Attachments", []))]
    if orphans:
        violations.append(f"inv6 orphaned volumes without a job tag: {orphans}")
    snapshots = ec2.describe_snapshots(Filters=T.job_filters(plan.job_id), OwnerIds=["self"])["Snapshots"]
    live = {v["VolumeId"] for v in volumes}
    kept = []
    for s in snapshots:
        st = T.as_dict(s.get("Tags"))
        if st.get(T.ROLE) not in SNAPSHOT_ROLES:
            violations.append(f"snapshot {s['SnapshotId']} of the job has no spotrun role: {st}")
        kept.append({"id": s["SnapshotId"], "role": st.get(T.ROLE), "state": s["State"],
                     "of_live_volume": st.get("spotrun:source-volume") in live})

    # Invariants 2, 5 and 6 from the ledger and the final image: only success cancels the
    # fleet (and success does), copy before delete, only the job's own resources touched.
    witnessed, completion, image_error = witness_violations(job, volumes)
    violations.extend(witnessed)
    completed = completion is not None if image_error is None else bool(tags.get(T.COMPLETED))
    failures = [e for b in {b["instance_id"] for b in job.boots} for e in job.events_of(b)
                if e.get("event") == "failure_policy"]
    if failures:
        violations.append(f"failure policy applied: {failures[0].get('reason')}")

    # Invariant 4: resume is exact — the running sum, and the steps redone per interruption.
    # The sum from the trainer's own completion record on the final image, not from the
    # result tag the agent wrote from it.
    _, trainer_record, _ = final_records(cloud, volumes)
    metrics = (trainer_record or {}).get("metrics") or {}
    expected = plan.steps * (plan.steps + 1) // 2
    if completed and metrics.get("sum") != expected:
        violations.append(f"inv4 exact resume: final sum {metrics.get('sum')} != {expected}")
    interruptions = []
    lost: Counter = Counter()
    for slot, outcome in zip(plan.slots, job.outcomes):
        # What the trainer itself said on this instance (the last stop: an instance stopped
        # and started again stopped once before): the step it saved and stopped at, else its
        # last durable checkpoint; a trainer that never ran a step here (the notice or kill
        # came during acquire or checkout) "reached" what it resumed from.
        stopped = _trainer_said(job, outcome.instance_id, "trainer_preempted")
        saved = _trainer_said(job, outcome.instance_id, "checkpoint_saved")
        starts = _trainer_starts(job, outcome.instance_id)
        stopped_at = stopped[-1].get("step") if stopped else None
        saved_at = saved[-1].get("step") if saved else None
        own_resume = starts[0].get("resume_step") if starts else None
        resumed = _next_resume(job, outcome.instance_id)
        if outcome.drained:
            candidates = (stopped_at, saved_at, own_resume)
            limit = 1
        else:
            candidates = (outcome.observed_step, saved_at, own_resume)
            limit = every
        reached = next((v for v in candidates if isinstance(v, int)), None)
        if reached is None and not _trainer_starts(job, outcome.instance_id):
            reached = resumed  # never reached training at all: nothing to redo
        redone = _steps_redone(reached, resumed)
        if redone is None and finished_on(job, outcome.instance_id):
            # The job finished on this instance before the fault could interrupt it: nothing
            # to resume and nothing lost; the fault's moment was missed.
            redone = 0
            outcome.faults.append(f"{slot.kind}:after_completion")
        if redone is not None:
            lost[outcome.cause] += redone
        record = {"kind": slot.kind, "instance_id": outcome.instance_id, "drained": outcome.drained,
                  "cause": outcome.cause, "reached": reached, "resumed": resumed,
                  "redone": redone, "faults": outcome.faults}
        interruptions.append(record)
        if redone is not None and redone > limit:
            violations.append(f"inv4 {slot.kind} on {outcome.instance_id}: {redone} steps redone "
                              f"(reached {reached}, resumed {resumed}; allowed {limit})")
        if redone is None and completed:
            violations.append(f"inv4 {slot.kind} on {outcome.instance_id}: no resume observed "
                              f"(reached {reached}, resumed {resumed})")
    for note in job.same_instance_interruptions:
        resumed = resumed_after(job, note)
        redone = _steps_redone(note["observed_step"], resumed)
        allowed = note["limit"] if note.get("limit") is not None else every * note["allowance"]
        if redone is not None:
            lost[note["cause"]] += redone
            if redone > allowed:
                violations.append(f"inv4 {note['cause']} on {note['instance_id']}: {redone} steps "
                                  f"redone (allowed {allowed})")
        elif completed:
            violations.append(f"inv4 {note['cause']} on {note['instance_id']}: no resume observed "
                              f"(reached {note['observed_step']}, resumed {resumed})")

    # Invariant 3: a checkpoint is never torn — corrupt ones are skipped only where we made them.
    corrupt_seen = 0
    for instance_id in {b["instance_id"] for b in job.boots}:
        path = Path(cloud.instance(instance_id).state_dir) / "trainer.log"
        try:
            text = path.read_text(errors="replace")  # skipped, or moved aside by a restore
            corrupt_seen += text.count("checkpoint_corrupt") + text.count("checkpoint_quarantined")
        except OSError:
            pass
    if corrupt_seen and not job.corrupted:
        violations.append(f"inv3 {corrupt_seen} corrupt checkpoint(s) met where none was injected")

    # Invariant 7: bad input gets a clear error and changes nothing.
    for bad in job.bad_input_results:
        if bad["returncode"] != 2 or "error" not in bad["stderr"].lower():
            violations.append(f"inv7 malformed {bad['where']}: exit {bad['returncode']}, "
                              f"stderr {bad['stderr'][-200:]!r}")
        if bad["changed"]:
            violations.append(f"inv7 malformed {bad['where']} changed the job's volumes/snapshots")

    # Invariant 1 under races: from the cloud's call ledger, never the agents' logs.
    violations.extend(ledger_violations(job, volumes))
    # Exactly one snapshot per drain/migration, counted at creation from the ledger (issue 15).
    records = [r for r in cloud.ledger() if r.get("t", 0) >= getattr(job, "started_wall", 0.0)]
    creations = soakledger.snapshot_creations(records, plan.job_id)
    violations.extend(soakledger.duplicate_snapshots(records, plan.job_id))
    # What a kind saw go wrong on the way (soakkinds_cloud: a drain for nothing, a restart).
    violations.extend(getattr(job, "kind_violations", []))

    # Invariant 6 is judged on the ledger above (the decoy is one planted target there: a
    # snapshot of it, a tag on it, a volume from its snapshot all name it); the cloud's own
    # view of the decoy is the last word on whether it changed.
    view = decoy_view(cloud, decoy["volume_id"], decoy["snapshot_id"])
    if view != decoy["view"]:
        violations.append(f"inv6 the decoy job's resources changed: {view}")

    kinds = Counter(s.kind for s, o in zip(plan.slots, job.outcomes)
                    if not any(is_off_moment(f) for f in o.faults))
    extra = Counter(f for o in job.outcomes for f in o.faults if not is_off_moment(f))
    missed = [f"{s.kind}/{f}" for s, o in zip(plan.slots, job.outcomes) for f in o.faults
              if is_off_moment(f)]
    unreached_missed, unreached_violations = unreached_slots(getattr(job, "unreached", []),
                                                             completed)
    missed += unreached_missed
    violations.extend(unreached_violations)
    return {"index": plan.index, "seed": plan.seed, "job": plan.job_id, "completed": completed,
            "interruptions": interruptions, "kinds": dict(kinds), "extra_faults": dict(extra),
            "missed": missed, "lost": dict(lost), "violations": violations,
            "snapshots_left": kept, "snapshots_created": creations["created"],
            "duplicate_snapshots": sum(len(made) - 1 for _, made in creations["groups"]),
            "same_instance_interruptions": job.same_instance_interruptions,
            "bad_inputs": job.bad_input_results, "races": job.race_results}


def job_line(result: dict) -> str:
    status = "OK " if not result["violations"] else "FAIL"
    kinds = ",".join(i["kind"] for i in result["interruptions"])
    if result.get("sweep") is not None:  # a sweep job (spotrun.harness.soakkinds_sweep): its kind
        kinds = ",".join([*result["kinds"], *(m.split("/", 1)[0] for m in result["missed"])])
        line = (f"{status} job {result['index']:>3} {result['job']:<18} sweep of "
                f"{len(result['sweep'])} [{kinds}] {result.get('seconds', '?')} s")
    else:
        line = (f"{status} job {result['index']:>3} {result['job']:<18} "
                f"{len(result['interruptions'])} interruptions [{kinds}] "
                f"{result.get('seconds', '?')} s")
    for v in result["violations"]:
        line += f"\n     violation: {v}"
    return line


def summarize(results: list[dict], *, profile: str, seed: int, seconds: float) -> dict:
    kinds: Counter = Counter()
    extra: Counter = Counter()
    lost: defaultdict = defaultdict(int)
    drained = undrained = 0
    for r in results:
        kinds.update(r["kinds"])
        extra.update(r["extra_faults"])
        for cause, steps in r["lost"].items():
            lost[cause] += steps
        for i in r["interruptions"]:
            drained += i["drained"]
            undrained += not i["drained"]
    failing = [r for r in results if r["violations"]]
    return {"profile": profile, "seed": seed, "jobs": len(results),
            "completed": sum(r["completed"] for r in results),
            "interruptions": drained + undrained, "drained": drained, "undrained": undrained,
            "kinds": dict(sorted(kinds.items())), "extra_faults": dict(sorted(extra.items())),
            "missed": dict(Counter(m for r in results for m in r["missed"])),
            "violations": sum(len(r["violations"]) for r in results),
            "lost": dict(sorted(lost.items())),
            "snapshots_left": sum(len(r.get("snapshots_left", [])) for r in results),
            "snapshots_created": sum(r.get("snapshots_created", 0) for r in results),
            "duplicate_snapshots": sum(r.get("duplicate_snapshots", 0) for r in results),
            "failing": [{"index": r["index"], "job": r["job"], "violations": r["violations"]}
                        for r in failing],
            "seconds": round(seconds, 1)}


def format_summary(s: dict) -> str:
    lines = [f"spotrun soak — profile {s['profile']}, seed {s['seed']}, {s['seconds']} s", "",
             f"jobs run             {s['jobs']} ({s['completed']} completed)",
             f"interruptions        {s['interruptions']} ({s['drained']} drained, "
             f"{s['undrained']} undrained kills)",
             f"invariant violations {s['violations']}",
             f"snapshots left       {s.get('snapshots_left', 0)} (all jobs, after completion)",
             f"snapshots created    {s.get('snapshots_created', 0)} (ledger, every try counted)",
             f"duplicates           {s.get('duplicate_snapshots', 0)} (more than one per "
             "drain/migration)",
             "", "faults injected by kind:"]
    for kind, count in s["kinds"].items():
        lines.append(f"  {kind:<32}{count:>5}")
    for kind, count in s["extra_faults"].items():
        lines.append(f"  + {kind:<30}{count:>5}")
    if s["missed"]:
        lines.append("  moments missed (injected as a plain notice instead, not counted above):")
        lines.extend(f"    {what}: {count}" for what, count in sorted(s["missed"].items()))
    lines.append("")
    lines.append("work lost (steps redone) by cause:")
    for cause, steps in s["lost"].items():
        lines.append(f"  {cause:<32}{steps:>5}")
    for f in s["failing"]:
        lines.append(f"FAILED job {f['index']} ({f['job']}): replay with "
                     f"`spotrun soak --profile {s['profile']} --seed {s['seed']} --only-job {f['index']}`")
        lines.extend(f"    {v}" for v in f["violations"])
    return "\n".join(lines)

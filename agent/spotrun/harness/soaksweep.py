"""A sweep's invariants (issue 19), judged from what the agents cannot write: the local cloud's
call ledger and the bytes on the experiments' volume images.

Shared by the soak's sweep kinds (:mod:`spotrun.harness.soakkinds_sweep`), the sweep e2e test,
``make demo-sweep`` and the sweep bench, so each of them fails on the same evidence:

- **one volume per experiment**: the experiment's volumes (by its job tag) at the end;
- **finished, never trained again**: the trainer's own completion record on that volume's
  image, with the counting trainer's exact sum (a step lost or trained twice changes it);
- **no experiment trained by two instances at once; nothing of an experiment touched except
  through the claim protocol**: :func:`spotrun.harness.sweepwitness.violations` (the lease holder's
  time vs every change of the experiment's volumes and snapshots) and
  :func:`spotrun.harness.sweepwitness.lease_write_violations` (who wrote which lease item);
- **the fleet cancelled iff every experiment finished, exactly once, by an instance**:
  :func:`cancel_violations` (CancelSpotFleetRequests / DeleteFleets / the group scaled to zero
  in the ledger, against each experiment's ``finished`` lease write and the sweep's one
  ``fleet_cancel_by`` item);
- **an instance leaves the fleet only with nothing of its own left**: :func:`leave_violations`
  (ModifySpotFleetRequest / ModifyFleet while it held an unfinished experiment);
- **data once** (``sweep.dataset_volume``): :func:`dataset_violations` (exactly one
  CreateSnapshot with the dataset role in the ledger, each experiment's first CreateVolume made
  from it, the prepared bytes on each experiment's volume image); the dataset volume itself
  prepared the seed's way by :func:`prepare_dataset_volume`.

Each violation is one sentence starting with ``sweep``; the checks return lists, the callers
decide whether to raise (the demo), assert (the e2e test) or count (the soak).
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

from spotrun.harness import soakwitness
from spotrun import ec2 as ec2mod
from spotrun import migration as M
from spotrun import tags as T
from spotrun.localcloud.ledger import calls, performed
from spotrun.harness.rehearsal_volume import VolumeImage, VolumeReadError, read_volume_state
from spotrun.harness.sweepwitness import (SWEEP_ITEM_PREFIX, cancel_takes, lease_history,
                                  lease_write_violations, resource_jobs, violations)

# The calls that end a fleet (spotrun.fleet.cancel: the single job's too), and those by which
# an instance leaves it (spotrun.fleet.leave: the capacity lowered by one, then the instance
# terminates itself).
CANCEL_ACTIONS = soakwitness.CANCEL_ACTIONS
LEAVE_ACTIONS = ("ModifySpotFleetRequest", "ModifyFleet", "TerminateInstanceInAutoScalingGroup")


def expected_sum(steps: int) -> int:
    """The counting trainer's final sum: every step 1..steps added exactly once."""
    return steps * (steps + 1) // 2


def experiment_volumes(ec2, job_id: str) -> list[dict]:
    """The experiment's job volumes (its job tag, role volume), not deleted."""
    return [v for v in ec2.describe_volumes(Filters=T.job_filters(job_id))["Volumes"]
            if T.as_dict(v.get("Tags")).get(T.ROLE) == "volume"
            and v.get("State") not in ("deleting", "deleted")]


def trainer_completion(volume_id: str, image: Path, wait_s: float = 0.0) -> tuple[dict | None, str | None]:
    """The trainer's own completion record on the volume's image (None if it holds none),
    and why the image could not be read (None if it could). ``wait_s``: the image is only
    whole once the last holder unmounted it; read again until it shows a record or the time
    is up."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            record, error = read_volume_state(volume_id, image).completion, None
        except VolumeReadError as exc:
            record, error = None, str(exc)
        if record is not None or time.monotonic() >= deadline:
            return record, error
        time.sleep(0.5)  # another process's unmount: nothing to block on


def completion_violations(job_id: str, steps: int, completion: dict | None,
                          image_error: str | None = None) -> list[str]:
    """The experiment finished with exactly its own steps, each once (the trainer's record)."""
    if image_error is not None:
        return [f"sweep finished once: {job_id}'s volume image could not be read ({image_error})"]
    if completion is None:
        return [f"sweep finished once: {job_id}'s volume holds no trainer completion record"]
    metrics = completion.get("metrics") or {}
    if metrics.get("sum") != expected_sum(steps) or metrics.get("steps") != steps:
        return [f"sweep finished once: {job_id} ended with sum {metrics.get('sum')} over "
                f"{metrics.get('steps')} steps, not {expected_sum(steps)} over {steps}: a step "
                "lost or trained twice"]
    return []


def check_experiments(ledger: list[dict], ec2, image_of: Callable[[str], Path],
                      steps: Mapping[str, int], *, wait_s: float = 60.0,
                      table: str | None = None) -> tuple[list[dict], list[str]]:
    """Every experiment (job id -> its steps): one volume, finished exactly once on it, and
    the claim protocol kept (ledger). Returns (one row per experiment, violations)."""
    rows, found = [], []
    histories = lease_history(ledger, steps)
    for job_id, count in steps.items():
        volumes = experiment_volumes(ec2, job_id)
        holders = sorted({w["holder"] for w in histories[job_id] if w["holder"]})
        row = {"job": job_id, "steps": count, "volume": None, "instances": holders,
               "runs": None, "sum_ok": False}
        rows.append(row)
        if len(volumes) != 1:
            found.append(f"sweep one volume per experiment: {job_id} has {len(volumes)} "
                         f"({[v['VolumeId'] for v in volumes]})")
            continue
        volume_id = row["volume"] = volumes[0]["VolumeId"]
        completion, error = trainer_completion(volume_id, image_of(volume_id), wait_s)
        broken = completion_violations(job_id, count, completion, error)
        found += broken
        row["sum_ok"] = not broken
        row["runs"] = ((completion or {}).get("metrics") or {}).get("runs")
    found += protocol_violations(ledger, steps, table=table)
    return rows, found


def protocol_violations(ledger: list[dict], jobs: Iterable[str], *,
                        table: str | None = None) -> list[str]:
    """The claim protocol, from the ledger: every change of an experiment's volumes and
    snapshots by the instance holding its lease then, no experiment taken after it finished,
    every lease write by the instance it names (or lets go)."""
    jobs = list(jobs)
    found = violations(ledger, resource_jobs(ledger, jobs))
    found += lease_write_violations(ledger, jobs, table=table)
    return [f"sweep claim protocol: {v}" for v in found]


def cancels(ledger: list[dict], fleets: Iterable[str] | None = None) -> list[dict]:
    """The calls that cancel the sweep's fleet (``fleets``: its ids; None: any), tried or
    performed, by whoever made them (None: the operator or the harness)."""
    wanted = set(fleets) if fleets is not None else None
    return [r for r in calls(ledger, action=CANCEL_ACTIONS)
            if wanted is None or set(r.get("resources") or []) & wanted]


def cancel_violations(ledger: list[dict], jobs: Iterable[str], sweep_id: str, *,
                      fleets: Iterable[str] | None = None, all_finished: bool | None = None,
                      expect_cancel: bool = True) -> list[str]:
    """The fleet cancelled iff every experiment finished, exactly once, by an instance, and
    only after the last ``finished`` lease write; by the instance that took the sweep's
    cancel item (or took it over from a taker that was gone). ``all_finished``: what the
    volume images say (None: the ledger's lease writes decide); ``expect_cancel``: False when
    the harness itself cancelled the fleet (a soak job that ran out of time)."""
    jobs = list(jobs)
    histories = lease_history(ledger, jobs)
    finished_at = {job: next((w["t"] for w in writes if w["finished"]), None)
                   for job, writes in histories.items()}
    ledger_finished = all(t is not None for t in finished_at.values())
    done = ledger_finished if all_finished is None else all_finished and ledger_finished
    made = cancels(ledger, fleets)
    by_agents = [r for r in made if r.get("instance")]
    performed_by = sorted({r["instance"] for r in by_agents if performed(r)})
    out = []
    if any(not r.get("instance") for r in made if performed(r)) and expect_cancel:
        out.append("sweep fleet cancelled by an instance: the fleet was cancelled by a caller "
                   "that is no instance of the sweep (the operator or the harness)")
    if not done:
        if by_agents:
            unfinished = sorted(j for j, t in finished_at.items() if t is None)
            out.append(f"sweep fleet cancelled only when every experiment finished: "
                       f"{by_agents[0]['instance']} called {by_agents[0]['action']} (ledger seq "
                       f"{by_agents[0].get('seq')}) and {unfinished or 'an experiment'} never "
                       "finished")
        return out
    if not performed_by:
        if expect_cancel:
            out.append("sweep fleet cancelled once every experiment finished: every experiment "
                       "finished and no instance cancelled the fleet (ledger)")
        return out
    if len(performed_by) > 1:
        out.append(f"sweep fleet cancelled exactly once: {len(performed_by)} instances cancelled "
                   f"it ({performed_by})")
    first = next(r for r in by_agents if performed(r))
    last_finish = max(finished_at.values())
    early = [r for r in by_agents if r["t"] < last_finish]
    if early:
        late = max(finished_at, key=lambda j: finished_at[j])
        out.append(f"sweep fleet cancelled only when every experiment finished: "
                   f"{early[0]['instance']} called {early[0]['action']} at t={early[0]['t']:.3f}, "
                   f"before {late} was released finished (t={last_finish:.3f})")
    takes = cancel_takes(ledger, sweep_id)
    takers = [w["by"] for w in takes]
    if first["instance"] not in takers:
        out.append(f"sweep fleet cancelled by the instance that took the cancel: "
                   f"{first['instance']} cancelled it without taking the sweep's item "
                   f"{SWEEP_ITEM_PREFIX}{sweep_id} (takers: {takers})")
    out += taker_violations(ledger, takes)
    return out


def taker_violations(ledger: list[dict], takes: list[dict]) -> list[str]:
    """The sweep's cancel item changes hands only from a taker already terminated (one that
    died between its take and its cancel): never two live instances deciding to cancel."""
    gone_at: dict[str, float] = {}
    # Anyone's TerminateInstances: the harness's and the cloud's own (the checker's) too.
    for r in calls(ledger, action="TerminateInstances", checker=None):
        if performed(r):
            for instance in r.get("resources") or []:
                gone_at.setdefault(instance, r["t"])
    out, taker = [], None
    for write in takes:
        if taker is not None and write["by"] != taker and gone_at.get(taker, float("inf")) > write["t"]:
            out.append(f"sweep one cancel taker: {write['by']} took the sweep's cancel item at "
                       f"t={write['t']:.3f} from {taker}, which was still running")
        taker = write["by"]
    return out


def leave_violations(ledger: list[dict], jobs: Iterable[str]) -> list[str]:
    """An instance lowers the fleet's capacity (and ends itself) only when it holds no
    unfinished experiment: nothing it claimed is left without its holder."""
    histories = lease_history(ledger, jobs)
    out = []
    for r in calls(ledger, action=LEAVE_ACTIONS):
        who = r.get("instance")
        if not who or not performed(r):
            continue
        held = []
        for job, writes in histories.items():
            holder, finished = None, False
            for write in writes:
                if write["t"] > r["t"]:
                    break
                holder = write["holder"] or None
                finished = finished or write["finished"]
            if holder == who and not finished:
                held.append(job)
        if held:
            out.append(f"sweep leave only when idle: {who} called {r['action']} (ledger seq "
                       f"{r.get('seq')}) while it held the unfinished {held}")
    return out


def fleet_violations(ledger: list[dict], jobs: Iterable[str], sweep_id: str, *,
                     fleets: Iterable[str] | None = None, all_finished: bool | None = None,
                     expect_cancel: bool = True) -> list[str]:
    """:func:`cancel_violations` and :func:`leave_violations` together."""
    jobs = list(jobs)
    return (cancel_violations(ledger, jobs, sweep_id, fleets=fleets, all_finished=all_finished,
                              expect_cancel=expect_cancel)
            + leave_violations(ledger, jobs))


# -- data once (sweep.dataset_volume) --------------------------------------------------------

def prepare_dataset_volume(ec2, image_of: Callable[[str], Path], zone: str,
                           files: Mapping[str, bytes] | None, *, size_gib: int = 1,
                           volume_type: str = "gp3") -> str:
    """The user's dataset volume on the local cloud, prepared the seed's way: a volume made
    through the EC2 API (``ec2``: a client of the cloud's endpoint), then its image written with
    an ext4 filesystem holding ``files`` (path on the volume -> bytes, e.g. ``datasets/...``).
    ``files`` None: the volume is left blank (no filesystem). A directory-backed volume (the
    local cloud without loop devices) gets the files copied in. Returns the volume's id."""
    volume_id = ec2.create_volume(AvailabilityZone=zone, Size=size_gib,
                                  VolumeType=volume_type)["VolumeId"]
    ec2mod.wait_for_volume(ec2, volume_id, ("available",), 60, poll_s=0.5)
    if files is None:
        return volume_id
    image = Path(image_of(volume_id))
    with tempfile.TemporaryDirectory(prefix="spotrun-dataset-") as scratch:
        tree = Path(scratch) / "tree"
        for rel, data in files.items():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            (tree / rel).write_bytes(data)
        if image.is_dir():
            shutil.copytree(tree, image, dirs_exist_ok=True)
        else:
            subprocess.run(["mkfs.ext4", "-F", "-q", "-d", str(tree), str(image)], check=True)
    return volume_id


def dataset_violations(ledger: list[dict], ec2, image_of: Callable[[str], Path],
                       volumes: Mapping[str, str | None], sweep_id: str,
                       files: Mapping[str, bytes], *,
                       dataset_volume: str | None = None) -> tuple[dict, list[str]]:
    """Data once (issue 19): exactly one CreateSnapshot with the dataset role (of
    ``dataset_volume`` when given) in the ledger; each experiment's first volume (``volumes``:
    job id -> its volume at the end, None if it has none) made from that snapshot by an
    instance (the ledger's CreateVolume; EC2's SnapshotId and origin tag while that volume
    is still there); its volume at the end holding ``files`` byte for byte (the image).
    Returns ({"snapshot", "made_from_it", "bytes_identical"}, violations)."""
    found: list[str] = []
    made = [r for r in calls(ledger, action="CreateSnapshot") if performed(r)
            and (r.get("tags") or {}).get(T.ROLE) == T.DATASET_SNAPSHOT_ROLE]
    snapshot_ids = [i for r in made for i in r.get("created") or []]
    summary = {"snapshot": snapshot_ids[0] if len(snapshot_ids) == 1 else None,
               "made_from_it": [], "bytes_identical": []}
    if len(made) != 1 or len(snapshot_ids) != 1:
        found.append(f"sweep data once: {len(made)} CreateSnapshot calls with "
                     f"{T.ROLE}={T.DATASET_SNAPSHOT_ROLE} in the ledger ({snapshot_ids}), not "
                     "exactly one (`spotrun init`'s)")
    else:
        record = made[0]
        if (record.get("tags") or {}).get(T.JOB) != sweep_id:
            found.append(f"sweep data once: the dataset snapshot {snapshot_ids[0]} is tagged "
                         f"{T.JOB}={(record.get('tags') or {}).get(T.JOB)}, not {sweep_id}")
        if dataset_volume and dataset_volume not in (record.get("resources") or []):
            found.append(f"sweep data once: the dataset snapshot {snapshot_ids[0]} is of "
                         f"{record.get('resources')}, not of {dataset_volume}")
        if record.get("instance"):
            found.append(f"sweep data once: the dataset snapshot {snapshot_ids[0]} was made by "
                         f"the instance {record['instance']}, not by `spotrun init`")
    snapshot_id = summary["snapshot"]
    creates = [r for r in calls(ledger, action="CreateVolume") if performed(r)]
    for job_id, volume_id in volumes.items():
        first = next((r for r in sorted(creates, key=lambda r: r.get("seq", 0))
                      if (r.get("tags") or {}).get(T.JOB) == job_id), None)
        if first is None:
            found.append(f"sweep data once: no CreateVolume tagged {T.JOB}={job_id} in the ledger")
        elif snapshot_id is None or snapshot_id not in (first.get("resources") or []) \
                or (first.get("tags") or {}).get(M.ORIGIN) != M.FROM_DATASET[M.ORIGIN] \
                or not first.get("instance"):
            found.append(f"sweep data once: {job_id}'s first volume {first.get('created')} was "
                         f"not made from the dataset snapshot {snapshot_id} by an instance "
                         f"(CreateVolume of {first.get('resources')}, {M.ORIGIN}="
                         f"{(first.get('tags') or {}).get(M.ORIGIN)}, by {first.get('instance')})")
        else:
            summary["made_from_it"].append(job_id)
            first_id = next(iter(first.get("created") or []), None)
            still = ec2.describe_volumes(Filters=[{"Name": "volume-id", "Values": [first_id]}])[
                "Volumes"] if first_id else []
            for volume in still:  # migrated away and deleted: the ledger alone says
                if volume.get("State") not in ("deleting", "deleted") and (
                        volume.get("SnapshotId") != snapshot_id
                        or M.tags_of(volume).get(M.ORIGIN) != M.FROM_DATASET[M.ORIGIN]):
                    found.append(f"sweep data once: EC2 has {job_id}'s first volume {first_id} "
                                 f"from {volume.get('SnapshotId')}, origin "
                                 f"{M.tags_of(volume).get(M.ORIGIN)}, not from {snapshot_id}")
        if volume_id is None:
            continue  # check_experiments names the missing volume
        try:
            held = VolumeImage(image_of(volume_id)).read(list(files))
        except VolumeReadError as exc:
            found.append(f"sweep data once: {job_id}'s volume image could not be read ({exc})")
            continue
        differ = sorted(rel for rel, data in files.items() if held.get(rel) != data)
        if differ:
            found.append(f"sweep data once: {job_id}'s volume {volume_id} does not hold the "
                         f"prepared dataset bytes: {differ} "
                         f"{'missing' if not set(differ) & set(held) else 'differ'}")
        else:
            summary["bytes_identical"].append(job_id)
    return summary, found

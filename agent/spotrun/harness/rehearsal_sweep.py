"""`spotrun rehearse --sweep` (what `make demo-sweep` runs): a sweep on the local spot cloud.

N experiments on a fleet of capacity C, each the counting trainer with its own step count, the
real agents on the local cloud's instances, and what an operator types, each the real CLI in its
own process: `spotrun localcloud up --run-agents` (replacements in random zones, as on EC2), a
dataset volume prepared once (`datasets/` on ext4, docs/sweeps.md "Data once") and named as
`sweep.dataset_volume`, `init` (which snapshots it once), `launch`, K spot notices to instances
while they train (each to a different instance, once its experiment is between step 30 and half
its steps), `status --watch` until the sweep ends and `status --plot` for the learning curves.

The report is judged from what the agents cannot write: the cloud's ledger of calls and the
bytes on the volume images. Per experiment: the instances that held it (its lease item's
writes, in order), the cross-AZ migrations (volumes an instance made for it beyond its first),
the steps redone (the counting trainer's own runs log on the volume: the steps each run reached
beyond the checkpoint the next one resumed from), the seconds its holders kept on its volume
(``spotrun:held``, what `spotrun status` prices a row from) beside the seconds the ledger shows
its lease held, and its completion (the trainer's record with
its exact sum: a step lost or trained twice changes it). It fails, naming every check, unless
every experiment finished on exactly one volume with the claim protocol kept
(:mod:`spotrun.harness.soaksweep`), every notice asked for landed and its experiment was resumed
by another instance, the fleet was cancelled exactly once by an instance, the dataset was
snapshotted once and every experiment's first volume made from it with its bytes, and the
figure drew one curve per experiment.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from spotrun import heldtime
from spotrun import migration as M
from spotrun import tags
from spotrun.harness.rehearsal import commit_repository
from spotrun.harness.rehearsal_volume import CHECKPOINTS, VolumeImage, VolumeReadError
from spotrun.harness.soaksweep import (check_experiments, dataset_violations, fleet_violations,
                                       prepare_dataset_volume)
from spotrun.harness.sweepwitness import lease_history
from spotrun.localcloud.ledger import calls, performed, read_ledger

COUNTING_TRAINER = Path(__file__).resolve().with_name("soak_trainer.py")
RUNS_LOG = f"{CHECKPOINTS}/trainer-runs.jsonl"  # soak_trainer.RUNS_LOG, on the volume
# The demo's four learning rates; more experiments continue the series.
LEARNING_RATES = ("0.1", "0.03", "0.01", "0.003", "0.001", "0.0003", "0.0001", "0.00003")
MAX_EXPERIMENTS = len(LEARNING_RATES)
# Experiments train this many steps, the first most, each next one 40 fewer (80 at least): their
# ends spread out, so that instances hand over and the queue is exercised.
FIRST_STEPS, STEPS_LESS_EACH, FEWEST_STEPS = 240, 40, 80
# A notice goes to an experiment between these fractions of its steps: late enough that it has
# a checkpoint, early enough that its replacement has work left to resume.
INTERRUPT_FROM_STEP = 30
# What a sweep rehearsal writes under --out; a rerun removes exactly these (never the whole --out).
RUN_STATE = ("cloud", "work", "repo", "report.json", "report.txt", "rehearsal.log", "curves.png")
JOB_TOML = """\
[job]
id = "{sweep_id}"

[code]
repository = "{repository}"

[trainer]
command = ["{python}", "train.py"]
env = {{ STEP_S = "{step_s}", CKPT_EVERY = "{ckpt_every}" }}

[agent]
progress_tag_interval_s = 1.0
metrics_interval_s = 1.0

[launch]
fleet = "ec2-fleet"
target_capacity = {capacity}
image_id = "ami-0123456789abcdef0"
instance_types = ["p3.2xlarge"]
availability_zones = ["us-east-1a", "us-east-1b"]

[sweep]
claim = "{claim}"
{dataset}{experiments}
"""


class SweepRehearsalFailed(Exception):
    """The sweep could not be run to its end; the message says where it stopped."""


def experiment_steps(count: int) -> dict[str, int]:
    """The experiments' names (``lr<rate>``) and their step counts, in sweep order."""
    if not 1 <= count <= MAX_EXPERIMENTS:
        raise ValueError(f"--experiments: 1 to {MAX_EXPERIMENTS}, not {count}")
    return {f"lr{rate}": max(FEWEST_STEPS, FIRST_STEPS - STEPS_LESS_EACH * i)
            for i, rate in enumerate(LEARNING_RATES[:count])}


@dataclass
class SweepPlan:
    out: Path
    sweep_id: str = "demo-sweep"
    experiments: int = 4
    capacity: int = 2
    interrupts: int = 1
    member_zones: str = "random:1"
    claim: str = "zone-first"
    notice_s: float = 5.0
    dataset: bool = True  # False: prepared but not named (the dataset check then fails)
    step_s: float = 0.05
    ckpt_every: int = 20
    timeout_s: float = 900.0
    steps: dict[str, int] = field(init=False)

    def __post_init__(self):
        self.steps = experiment_steps(self.experiments)
        if not 1 <= self.capacity <= self.experiments:
            raise ValueError(f"--capacity: 1 to the number of experiments "
                             f"({self.experiments}), not {self.capacity}")
        from spotrun.config import _JOB_ID
        from spotrun.localcloud.cli import member_zones_choice

        longest = max((self.job_of(name) for name in self.steps), key=len)
        if not (_JOB_ID.match(self.sweep_id) and _JOB_ID.match(longest)):
            raise ValueError(f"--job {self.sweep_id!r}: a sweep id is letters, digits, '.', '_' "
                             f"and '-', short enough that its experiments' ids ({longest!r}) "
                             "are at most 63 characters")

        try:
            member_zones_choice(self.member_zones)
        except Exception as exc:  # argparse's ArgumentTypeError: the same words here
            raise ValueError(f"--az-policy (with --sweep): {exc}") from None
        if not 0 <= self.interrupts <= self.experiments:
            raise ValueError(f"--interrupts: 0 to the number of experiments "
                             f"({self.experiments}), not {self.interrupts}")

    def job_of(self, name: str) -> str:
        return f"{self.sweep_id}-{name}"


class Cli:
    """`spotrun ARGV` in its own process, in the operator's working directory."""

    def __init__(self, work: Path, env: dict):
        self.work, self.env = work, env

    def __call__(self, *argv: str, timeout: float = 120, ok: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "spotrun", *argv], cwd=self.work,
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        if ok and done.returncode != 0:
            raise SweepRehearsalFailed(f"`spotrun {' '.join(argv)}` exited {done.returncode}: "
                                       f"{(done.stderr or done.stdout)[-1500:]}")
        return done


def wait_for(probe: Callable, timeout: float, interval: float = 0.5):
    """``probe()``'s first truthy answer, or None when the time is up (polls the operator's
    view: a status call has no event to block on)."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(interval)


def dataset_files() -> dict[str, bytes]:
    """What the user prepares once: random bytes (no accident matches them) and a manifest."""
    data = os.urandom(256 * 1024)
    manifest = {"files": {"train.bin": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}
    return {"datasets/train.bin": data,
            "datasets/manifest.json": (json.dumps(manifest, indent=2) + "\n").encode()}


def volume_image(root: Path, volume_id: str) -> Path:
    """A volume's image in the local cloud (a directory when it runs without loop devices)."""
    image = root / "ebs" / "volumes" / f"{volume_id}.img"
    plain = image.with_suffix("")
    return plain if not image.exists() and plain.exists() else image


class SweepRehearsal:
    """One sweep rehearsal under ``plan.out``: :meth:`run` brings the local cloud up, drives the
    sweep through the operator CLI, takes it down and returns the report (its ``failures``
    empty when every check held)."""

    def __init__(self, plan: SweepPlan, narrate: Callable[[str], None] | None = None):
        self.plan = plan
        self.say = narrate or (lambda message: None)
        self.root = plan.out / "cloud"
        self.env: dict = {}
        self.interrupted: list[dict] = []  # {job, experiment, instance, at_step}
        self.missed: list[str] = []

    def run(self) -> dict:
        plan = self.plan
        work = plan.out / "work"
        work.mkdir(parents=True, exist_ok=True)
        repository = commit_repository(plan.out / "repo", {"train.py": COUNTING_TRAINER},
                                       "counting trainer")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.env["SPOTRUN_LOCALCLOUD_ROOT"] = str(self.root)
        spotrun = Cli(work, self.env)
        spotrun("localcloud", "up", "--run-agents", "--detach", "--member-zones", plan.member_zones)
        try:
            info = json.loads((self.root / "localcloud.json").read_text())
            self.env.update(AWS_ENDPOINT_URL=info["ec2_endpoint"], AWS_ACCESS_KEY_ID="testing",
                            AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION=info["region"])
            files = dataset_files()
            dataset_volume = prepare_dataset_volume(
                self.ec2(), lambda v: volume_image(self.root, v), "us-east-1a", files)
            self.say(f"dataset volume {dataset_volume}: " + ", ".join(
                f"{rel} ({len(data)} bytes)" for rel, data in files.items())
                + ("" if plan.dataset else " (not named in the job file: --no-dataset)"))
            (work / "spotrun.toml").write_text(self.job_file(repository, dataset_volume))
            return self._journey(spotrun, {"volume": dataset_volume, "files": files})
        finally:
            spotrun("localcloud", "down", ok=False)

    def job_file(self, repository: str, dataset_volume: str) -> str:
        plan = self.plan
        experiments = "".join(
            f'\n[[sweep.experiments]]\nname = "{name}"\nargs = ["--lr", "{name[2:]}"]\n'
            f'env = {{ STEPS = "{steps}" }}\n' for name, steps in plan.steps.items())
        return JOB_TOML.format(
            sweep_id=plan.sweep_id, repository=repository, python=sys.executable,
            step_s=plan.step_s, ckpt_every=plan.ckpt_every, capacity=plan.capacity,
            claim=plan.claim, experiments=experiments,
            dataset=f'dataset_volume = "{dataset_volume}"\n' if plan.dataset else "")

    def ec2(self):
        import boto3

        return boto3.client("ec2", endpoint_url=self.env["AWS_ENDPOINT_URL"],
                            region_name=self.env["AWS_DEFAULT_REGION"],
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def _journey(self, spotrun: Cli, dataset: dict) -> dict:
        plan = self.plan
        init = spotrun("init")
        for line in (init.stdout + init.stderr).splitlines():
            if "dataset" in line:
                self.say(line.strip())
        spotrun("launch")
        self.say(f"launched: {plan.experiments} experiments on {plan.capacity} instances "
                 f"(claims {plan.claim}, members in zones {plan.member_zones})")
        started = time.monotonic()
        for n in range(plan.interrupts):
            self._interrupt_one(spotrun, n + 1, plan.timeout_s - (time.monotonic() - started))
        self.say("waiting for the sweep to end (spotrun status --watch)")
        watch = spotrun("status", "--watch", "--interval", "2",
                        timeout=max(60.0, plan.timeout_s - (time.monotonic() - started)), ok=False)
        plot_path = plan.out / "curves.png"
        shown = json.loads(spotrun("status", "--json", "--plot", str(plot_path)).stdout)
        report = self._evidence(shown, plot_path, dataset)
        if watch.returncode != 0:
            report["failures"].insert(0, f"`spotrun status --watch` exited {watch.returncode}, "
                                         f"not 0 (the sweep did not end done): "
                                         f"{' '.join(watch.stderr.split())[-500:]}")
        return report

    def _interrupt_one(self, spotrun: Cli, number: int, time_left: float) -> None:
        """A spot notice to an instance training an experiment between step 30 and half its
        steps, neither already interrupted."""
        plan = self.plan
        taken_jobs = {i["job"] for i in self.interrupted}
        taken_instances = {i["instance"] for i in self.interrupted}

        def candidate():
            rows = json.loads(spotrun("status", "--json").stdout)["experiments"]
            for row in rows:
                step = (row.get("progress") or {}).get("global_step") or 0
                name = row["name"]
                if (row["phase"] == "training" and row["job"] not in taken_jobs
                        and INTERRUPT_FROM_STEP <= step <= plan.steps.get(name, 0) // 2):
                    holder = self.attached_instance(row["job"])
                    if holder and holder not in taken_instances:
                        return {"job": row["job"], "experiment": name, "instance": holder,
                                "at_step": step}
            return None

        found = wait_for(candidate, max(1.0, min(180.0, time_left)))
        if found is None:
            self.missed.append(f"notice {number} of {plan.interrupts} never sent: no experiment "
                               f"was training between step {INTERRUPT_FROM_STEP} and half its "
                               "steps on an instance not yet interrupted")
            return
        self.say(f"notice {number}: interrupting {found['instance']} while it trains "
                 f"{found['experiment']} (step {found['at_step']})")
        spotrun("localcloud", "interrupt", found["instance"], "--in", f"{plan.notice_s:g}")
        self.interrupted.append(found)

    def attached_instance(self, job_id: str) -> str | None:
        for volume in self.ec2().describe_volumes(Filters=tags.job_filters(job_id))["Volumes"]:
            for attachment in volume.get("Attachments", []):
                if attachment.get("State") in ("attaching", "attached"):
                    return attachment["InstanceId"]
        return None

    def _evidence(self, shown: dict, plot_path: Path, dataset: dict) -> dict:
        plan = self.plan
        ledger = wait_for(lambda: _ledger_with_fleet_deleted(self.root), 60)
        ledger = ledger or read_ledger(self.root / "ledger.jsonl")
        jobs = {plan.job_of(name): steps for name, steps in plan.steps.items()}
        image_of = lambda volume_id: volume_image(self.root, volume_id)  # noqa: E731
        ec2 = self.ec2()
        found, broken = check_experiments(ledger, ec2, image_of, jobs, wait_s=60)
        broken += fleet_violations(ledger, jobs, plan.sweep_id)
        data, unlike = dataset_violations(ledger, ec2, image_of,
                                          {row["job"]: row["volume"] for row in found},
                                          plan.sweep_id, dataset["files"],
                                          dataset_volume=dataset["volume"])
        rows = experiment_rows(plan, found, ledger, image_of, self.interrupted,
                               zones=instance_zones(ec2, ledger),
                               held={row["job"]: held_tag(ec2, row["volume"]) for row in found})
        deletes = [r for r in calls(ledger, action="DeleteFleets") if performed(r)]
        report = {
            "sweep": plan.sweep_id, "capacity": plan.capacity, "claim": plan.claim,
            "member_zones": plan.member_zones, "notices_asked": plan.interrupts,
            "experiments": rows, "interrupted": self.interrupted, "missed": self.missed,
            "fleet_deleted_by": deletes[0].get("instance") if deletes else None,
            "plot": str(plot_path),
            "curves": {label: len(points)
                       for label, points in shown["plot"]["drawn"].get("loss", {}).items()},
            "dataset": {"volume": dataset["volume"], "named": plan.dataset, **data,
                        "files": {rel: len(b) for rel, b in dataset["files"].items()}},
            "violations": broken, "dataset_violations": unlike,
        }
        report["failures"] = verdict(report)
        return report


def _ledger_with_fleet_deleted(root: Path) -> list[dict] | None:
    """The ledger once the last instance's DeleteFleets is in it (it lands just after the done
    tags that end `status --watch`)."""
    ledger = read_ledger(root / "ledger.jsonl")
    return ledger if any(performed(r) for r in calls(ledger, action="DeleteFleets")) else None


def instance_zones(ec2, ledger: list[dict]) -> dict[str, str]:
    """instance -> its zone, for every instance in the ledger that EC2 still describes."""
    instances = sorted({r["instance"] for r in ledger if r.get("instance")})
    zones = {}
    for instance in instances:
        try:
            reservations = ec2.describe_instances(InstanceIds=[instance])["Reservations"]
        except Exception:  # noqa: BLE001 - a zone is shown where known, never needed
            continue
        for reservation in reservations:
            for described in reservation["Instances"]:
                zones[described["InstanceId"]] = described["Placement"]["AvailabilityZone"]
    return zones


def held_tag(ec2, volume_id: str | None) -> dict[str, int]:
    """The volume's spotrun:held tag, parsed ({} when it has none or is gone)."""
    if not volume_id:
        return {}
    volumes = ec2.describe_volumes(Filters=[{"Name": "volume-id", "Values": [volume_id]}])["Volumes"]
    return heldtime.parse(tags.as_dict(volumes[0].get("Tags")).get(tags.HELD)) if volumes else {}


def holders_in_order(writes: list[dict]) -> list[str]:
    """The instances that held an experiment's lease, in the order they took it."""
    seen: list[str] = []
    for write in writes:
        if write["holder"] and write["holder"] not in seen:
            seen.append(write["holder"])
    return seen


def migrations(ledger: list[dict], job_id: str) -> int:
    """Volumes an instance made for the experiment beyond its first (created empty or from the
    dataset snapshot): each is a move to another zone by snapshot."""
    first_volume = (M.CREATED_EMPTY[M.ORIGIN], M.FROM_DATASET[M.ORIGIN])
    return sum(1 for r in calls(ledger, action="CreateVolume")
               if performed(r) and r.get("instance")
               and (r.get("tags") or {}).get(tags.JOB) == job_id
               and (r.get("tags") or {}).get(M.ORIGIN) not in first_volume)


def steps_redone(runs: list[dict]) -> int | None:
    """From the counting trainer's runs log: each run's start says where the previous run got
    to and the checkpoint it resumes from; the steps between were trained twice."""
    if not runs:
        return None
    return sum(max(0, run["reached_before"] - run["resumed_from"]) for run in runs
               if isinstance(run.get("reached_before"), int)
               and isinstance(run.get("resumed_from"), int))


def read_runs_log(image: Path) -> tuple[list[dict], str | None]:
    """The runs log on a volume image, and why it could not be read (None if it could)."""
    try:
        raw = VolumeImage(image).read([RUNS_LOG]).get(RUNS_LOG)
    except VolumeReadError as exc:
        return [], str(exc)
    if raw is None:
        return [], f"{RUNS_LOG}: not on the volume"
    runs = []
    for line in raw.decode(errors="replace").splitlines():
        try:
            runs.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill: that start never trained
    return runs, None


def lease_seconds(writes: list[dict]) -> float:
    """How long the experiment's lease was held, from its writes (the ledger's): from each
    claim to the write that let it go or gave it to another."""
    total, holder, since = 0.0, None, 0.0
    for write in sorted(writes, key=lambda w: w.get("seq") or 0):
        if write["holder"] != holder:
            if holder is not None:
                total += write["t"] - since
            holder, since = write["holder"], write["t"]
    return total


def experiment_rows(plan: SweepPlan, found: list[dict], ledger: list[dict],
                    image_of: Callable[[str], Path], interrupted: list[dict],
                    zones: dict[str, str], held: dict[str, dict] | None = None) -> list[dict]:
    """One row per experiment; ``held``: job -> its volume's spotrun:held (the agents' record
    of their time, beside the ledger's lease time)."""
    histories = lease_history(ledger, [row["job"] for row in found])
    rows = []
    for name, row in zip(plan.steps, found):
        runs, runs_error = read_runs_log(image_of(row["volume"])) if row["volume"] else ([], "no volume")
        instances = holders_in_order(sorted(histories[row["job"]], key=lambda w: w.get("seq") or 0))
        rows.append({
            "experiment": name, "job": row["job"], "steps": row["steps"],
            "volume": row["volume"], "instances": instances,
            "zones": [zones.get(i) for i in instances],
            "notices": sum(1 for i in interrupted if i["job"] == row["job"]),
            "migrations": migrations(ledger, row["job"]),
            "trainer_runs": len(runs), "steps_redone": steps_redone(runs),
            "runs_log_error": runs_error, "completed": row["sum_ok"],
            "held_s": sum((held or {}).get(row["job"], {}).values()),
            "lease_s": round(lease_seconds(histories[row["job"]]), 1),
        })
    return rows


def verdict(report: dict) -> list[str]:
    """Why the report does not show the sweep done right; [] when it does."""
    failures = list(report.get("missed") or [])
    if report.get("violations"):
        failures.append(f"{len(report['violations'])} sweep violation(s): "
                        + "; ".join(report["violations"][:5]))
    if report.get("dataset_violations"):
        failures.append(f"dataset check: {len(report['dataset_violations'])} violation(s): "
                        + "; ".join(report["dataset_violations"][:3]))
    by_job = {row["job"]: row for row in report["experiments"]}
    for notice in report.get("interrupted") or []:
        row = by_job.get(notice["job"], {})
        after = row.get("instances", [])[row.get("instances", []).index(notice["instance"]) + 1:] \
            if notice["instance"] in row.get("instances", []) else []
        if not after:
            failures.append(f"{notice['job']} was not resumed by another instance after the "
                            f"notice to {notice['instance']}: held by {row.get('instances')}")
    for row in report["experiments"]:
        if row["completed"] and row["steps_redone"] is None:
            failures.append(f"{row['job']}: steps redone unknown ({row['runs_log_error']})")
        # The holders' own record of their time (what its cost is priced from) against the
        # ledger's lease writes: never more than the lease was held (each holder's clock
        # starts after its claim and stops at its last tag write), never nothing.
        if row["completed"] and not row["held_s"]:
            failures.append(f"{row['job']}: no held time on its volume (spotrun:held)")
        elif row["held_s"] > row["lease_s"] + len(row["instances"]):
            failures.append(f"{row['job']}: {row['held_s']} s held by its volume's tag, more than "
                            f"the {row['lease_s']} s its lease was held (ledger)")
    if len(report.get("curves") or {}) != len(report["experiments"]):
        failures.append(f"the figure has {len(report.get('curves') or {})} curves, not "
                        f"{len(report['experiments'])}")
    return failures


def format_report(report: dict) -> str:
    """The per-experiment table and the sweep's lines, as `spotrun rehearse --sweep` prints."""
    head = ("experiment", "steps", "instances (zone)", "notices", "migrations", "redone",
            "held/lease s", "completed")
    table = [head]
    for row in report["experiments"]:
        held = ", ".join(f"{i} ({z[-2:] if z else '?'})" for i, z in zip(row["instances"], row["zones"]))
        table.append((row["experiment"], str(row["steps"]), held or "-", str(row["notices"]),
                      str(row["migrations"]),
                      "?" if row["steps_redone"] is None else str(row["steps_redone"]),
                      f"{row['held_s']}/{row['lease_s']:g}",
                      "yes, sum right" if row["completed"] else "NO"))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = [f"sweep {report['sweep']}: {len(report['experiments'])} experiments on "
             f"{report['capacity']} instances, claims {report['claim']}, members in zones "
             f"{report['member_zones']}"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() for r in table]
    for notice in report["interrupted"]:
        lines.append(f"notice: {notice['instance']} while it trained {notice['experiment']} "
                     f"(step {notice['at_step']})")
    lines.append(f"fleet deleted by: {report['fleet_deleted_by'] or 'nobody'}")
    data = report["dataset"]
    if data.get("snapshot"):
        lines.append(f"dataset: one snapshot {data['snapshot']} of {data['volume']}, "
                     f"{len(data['made_from_it'])} experiment volumes made from it, "
                     f"{len(data['bytes_identical'])} holding its bytes "
                     f"({', '.join(f'{rel} {size} B' for rel, size in data['files'].items())})")
    lines.append(f"learning curves: {report['plot']} ({len(report['curves'])} curves)")
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> str:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    text = format_report(report)
    (out / "report.txt").write_text(text + "\n")
    return text

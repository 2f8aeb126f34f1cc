"""`spotrun soak`: many randomized spot lifecycles with faults at the worst moments.

Seeded and reproducible: the profile and ``--seed`` decide every job's plan (trainer
length, checkpoint interval, and one fault kind per interruption, dealt from a shuffled deck
of the catalogue in :mod:`spotrun.harness.soakfaults` so every kind comes up about equally). Jobs
run one after another on one local spot cloud, each as a Spot Fleet whose instances run the
real agent and the counting trainer; after every job :mod:`spotrun.harness.soakcheck` checks the
invariants against the cloud's fault-free view. A failing job is named by ``--seed`` and its
index: ``spotrun soak --seed S --only-job I`` replays exactly that plan.

Sweep jobs (issue 19; :mod:`spotrun.harness.soakkinds_sweep`): the long profile makes every 8th job
a small sweep on a fleet of two or three, its one kind aimed at the claim protocol (claims at
once, an instance sent away between two experiments, the last two finishing together),
checked as a sweep and counted in the same summary; ``--kinds`` may name them.
"""
from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from spotrun import lease

from spotrun.harness import soakcheck
from spotrun.log import get_logger
from spotrun.harness.rehearsal import commit_repository
from spotrun.harness.soakdeletes import DeleteWitness
from spotrun.harness.soakfaults import CATALOGUE
from spotrun.harness.soakjob import LEASE_TABLE, JobEnded, SoakJob  # noqa: F401 - re-exported
from spotrun.harness.soakkinds_sweep import SWEEP_CATALOGUE, SweepSoakJob, check_sweep_job
from spotrun.harness.soakplan import PROFILES, JobPlan, Slot, plan_jobs  # noqa: F401 - re-exported

log = get_logger("soak")
KINDS = {**CATALOGUE, **SWEEP_CATALOGUE}  # what --kinds may name: single jobs' and sweeps'
TRAINER_FILE = Path(__file__).with_name("soak_trainer.py")


# -- the soak -------------------------------------------------------------------------------

def make_repository(path: Path) -> str:
    return commit_repository(path, {"train.py": TRAINER_FILE}, "soak trainer")


def run_soak(profile: str, seed: int, out: Path, jobs: int | None = None,
             only_job: int | None = None, echo=print, kinds: list[str] | None = None) -> dict:
    """Plan, run and check every job; returns the summary (``soakcheck.summarize``)."""
    from spotrun.localcloud import LocalCloud, TimingModel

    unknown = sorted(set(kinds or []) - set(KINDS))
    if unknown:
        raise ValueError(f"--kinds: unknown fault kind(s) {unknown}; known: {sorted(KINDS)}")
    plans = plan_jobs(profile, seed, jobs, kinds)
    if only_job is not None:
        if not 0 <= only_job < len(plans):
            raise ValueError(f"--only-job: {only_job} is not a job of this plan (0..{len(plans) - 1})")
        plans = [plans[only_job]]
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o755)  # the unprivileged trainer walks through it to the checkout
    (out / "plan.json").write_text(json.dumps([p.describe() for p in plans], indent=1))
    repository = make_repository(out / "repo")
    timeout_s = PROFILES[profile]["timeout_s"]
    results = []
    started = time.monotonic()
    with LocalCloud(out / "cloud", TimingModel.fast()) as cloud:
        decoy = soakcheck.make_decoy(cloud)
        deletes = DeleteWitness(cloud).install()  # inv2: the copies' images at each delete
        cloud.client("dynamodb", faults=False).create_table(**lease.table_definition(LEASE_TABLE))
        for plan in plans:
            # A sweep job (issue 19) is a small sweep on its own fleet, checked as a sweep.
            job = (SweepSoakJob if plan.sweep else SoakJob)(cloud, out / plan.job_id, plan,
                                                            repository, timeout_s)
            job.delete_witness = deletes
            job_started = time.monotonic()
            baseline = soakcheck.volume_ids(cloud)
            try:
                error = job.run_slots()
            finally:
                job.cleanup()
            result = (check_sweep_job if plan.sweep else soakcheck.check_job)(job, decoy, baseline,
                                                                               error)
            result["seconds"] = round(time.monotonic() - job_started, 1)
            results.append(result)
            echo(soakcheck.job_line(result))
            # After every job, so a run stopped half-way still has its table.
            partial = soakcheck.summarize(results, profile=profile, seed=seed,
                                          seconds=time.monotonic() - started)
            (out / "results.json").write_text(json.dumps({"summary": partial, "jobs": results},
                                                         indent=1, default=str))
            (out / "summary.txt").write_text(soakcheck.format_summary(partial) + "\n")
    summary = soakcheck.summarize(results, profile=profile, seed=seed,
                                  seconds=time.monotonic() - started)
    (out / "results.json").write_text(json.dumps({"summary": summary, "jobs": results}, indent=1,
                                                 default=str))
    return summary


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def cmd_soak(args) -> int:
    from spotrun import log as logmod

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    unknown = sorted(set(kinds or []) - set(KINDS))
    if unknown:
        print(f"spotrun soak: --kinds: unknown fault kind(s) {unknown}; known: {sorted(KINDS)}",
              file=sys.stderr)
        return 2
    if args.jobs is not None and args.jobs < 1:
        print("spotrun soak: --jobs: must be at least 1", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="spotrun-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    logmod.configure(stream=open(out / "soak.log", "a") if not args.verbose else sys.stderr)
    signal.signal(signal.SIGTERM, _interrupted)  # like Ctrl-C: the cloud's loop devices go too
    try:
        summary = run_soak(args.profile, args.seed, out, jobs=args.jobs, only_job=args.only_job,
                           kinds=kinds)
    except ValueError as exc:
        print(f"spotrun soak: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spotrun soak: stopped; the jobs run so far are in {out / 'summary.txt'}",
              file=sys.stderr)
        return 130
    table = soakcheck.format_summary(summary)
    (out / "summary.txt").write_text(table + "\n")
    print(table)
    print(f"details: {out}")
    return 0 if summary["violations"] == 0 else 1


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "soak", help="fault-injection soak: randomized spot jobs on the local cloud, invariants checked",
        description="Run N randomized jobs on the local spot cloud, each through several "
                    "interruptions with faults from the catalogue, and check the invariants "
                    "after each. Seeded: the same --profile/--seed/--jobs replay the same plan.")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="short")
    parser.add_argument("--seed", type=int, default=1, help="the plan's seed (default 1)")
    parser.add_argument("--jobs", type=int, help="number of jobs (default: the profile's)")
    parser.add_argument("--only-job", type=int, help="replay only this job index of the plan")
    parser.add_argument("--kinds", help="only these fault kinds, comma-separated (default: all)")
    parser.add_argument("--out", help="working directory (default: a new temporary one)")
    parser.add_argument("--verbose", action="store_true", help="the soak's own log on stderr")
    parser.set_defaults(func=cmd_soak)

"""`spotrun rehearse` (what `make demo` runs): the command line around spotrun.rehearsal.

A rerun in the same --out starts clean (it says so), the report goes to report.txt and
report.json, and the exit status is 1, with the reason, whenever the report does not show a
real resume (see rehearsal_report.verdict).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from spotrun.rehearsal import Rehearsal, RehearsalPlan
from spotrun.rehearsal_report import format_report

# What a rehearsal writes under --out; a rerun removes exactly these (never the whole --out).
RUN_STATE = ("repo", "cloud", "report.json", "report.txt", "rehearsal.log")


def clear_previous_run(out: Path) -> list[str]:
    """Remove an earlier rehearsal's state under ``out`` so that a rerun starts clean; returns
    the names removed. The old cloud's mounts and loop devices are released first, so that
    nothing is deleted through a mount that a crashed run left behind."""
    from spotrun.localcloud import ebs

    removed = []
    cloud = out / "cloud"
    if cloud.exists():
        ebs.lazy_unmount_under(cloud)
        ebs.EbsDataPlane(cloud, use_loop_devices=False).release_all()
    for name in RUN_STATE:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def cmd_rehearse(args) -> int:
    from spotrun import log as logmod

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    removed = clear_previous_run(out)
    print(f"rehearse: starting clean: removed the previous run's {', '.join(removed)} from {out}"
          if removed else f"rehearse: a fresh run in {out}", file=sys.stderr, flush=True)
    logmod.configure(stream=open(out / "rehearsal.log", "w"))
    narrate = None if args.quiet else (lambda message: print(f"rehearse: {message}", file=sys.stderr,
                                                              flush=True))
    plan = RehearsalPlan(out=Path(args.out), job_id=args.job, repository=args.repository or "",
                         ref=args.ref, interrupt_at_steps=args.interrupt_at_step or [40],
                         notice_s=args.notice_seconds, az_policy=args.az_policy,
                         timeout_s=args.timeout, trainer_user=args.trainer_user)
    if args.command:
        plan.command = args.command
    try:
        report = Rehearsal(plan, narrate=narrate).run()
    except (TimeoutError, RuntimeError) as exc:
        print(f"rehearse: FAILED: {exc} (logs under {out})", file=sys.stderr)
        return 1
    (out / "report.json").write_text(json.dumps(report, indent=2))
    table = format_report(report)
    (out / "report.txt").write_text(table + "\n")
    print(table)
    if report["failures"]:
        print(f"rehearse: FAILED: {'; '.join(report['failures'])} (report: {out / 'report.txt'})",
              file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "rehearse", help="run a whole spot job on the local spot cloud (the demo)",
        description="Train on the local spot cloud with the real agent: notices at chosen steps, "
                    "replacement in another AZ, migration, resume, completion, fleet cancelled.")
    parser.add_argument("--out", default="demo-out", help="working directory and report location")
    parser.add_argument("--job", default="rehearsal", help="job id")
    parser.add_argument("--repository", help="your training code (git URL or file://); default: "
                                             "the reference trainer on synthetic data")
    parser.add_argument("--ref", default="main", help="git ref to run")
    parser.add_argument("--command", nargs="+", help="trainer command (default: python train.py)")
    parser.add_argument("--interrupt-at-step", type=int, action="append",
                        help="send a spot notice when training reaches this global step (repeatable)")
    parser.add_argument("--notice-seconds", type=float, default=20.0,
                        help="time from notice to termination (AWS: 120; scaled down by default)")
    parser.add_argument("--az-policy", default="round-robin",
                        help="where replacements launch: random, round-robin, fixed:<az>")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    parser.add_argument("--trainer-user", default="",
                        help="user the trainer runs as (default: nobody, or root where nobody cannot "
                             "reach the work directory or the interpreter; on AWS: trainer.user)")
    parser.add_argument("--quiet", action="store_true", help="only the report")
    parser.set_defaults(func=cmd_rehearse)

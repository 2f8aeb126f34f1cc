"""`spotrun rehearse` (what `make demo` runs): the command line around spotrun.harness.rehearsal.

A rerun in the same --out starts clean (it says so), the report goes to report.txt and
report.json, and the exit status is 1, with the reason, whenever the report does not show what
was asked (see rehearsal_report.verdict): the demo (no --repository) must show a resume; a
user's own script must finish, and a notice that training outran is a note, not a failure.
Notices are only those asked for (the demo asks for its own). A failure prints the agent's and
trainer's last lines and the report so far, then one line of error.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from spotrun.harness.rehearsal import Rehearsal, RehearsalPlan
from spotrun.harness.rehearsal_report import format_report

# What a rehearsal writes under --out; a rerun removes exactly these (never the whole --out).
COMPARE_DIR = "with-callback"  # rehearse --compare-with-callback's second run
RUN_STATE = ("repo", "cloud", "report.json", "report.txt", "rehearsal.log", COMPARE_DIR)
# The demo (no --repository) exists to show a resume: it interrupts here unless told otherwise.
DEMO_INTERRUPT_AT_STEP = 40
BARE_PYTHON = ("python", "python3")
DEMO_STEPS = 192  # the demo trainer's steps: 3 epochs of 2048 samples, batches of 32


def clear_previous_run(out: Path, names: tuple[str, ...] = RUN_STATE) -> list[str]:
    """Remove an earlier rehearsal's state (``names``) under ``out`` so that a rerun starts
    clean; returns the names removed. The old cloud's mounts and loop devices are released
    first, so that nothing is deleted through a mount that a crashed run left behind."""
    from spotrun.localcloud import ebs

    removed = []
    cloud = out / "cloud"
    if cloud.exists():
        ebs.lazy_unmount_under(cloud)
        ebs.EbsDataPlane(cloud, use_loop_devices=False).release_all()
    for name in names:
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

    if args.sweep:
        return cmd_rehearse_sweep(args)
    wrong = [option for option, dest in SWEEP_ONLY if getattr(args, dest) not in (None, False)]
    if wrong:
        print(f"rehearse: {', '.join(wrong)}: only with --sweep", file=sys.stderr)
        return 2
    args.job = args.job or DEFAULT_JOB
    args.notice_seconds = args.notice_seconds or DEFAULT_NOTICE_S
    args.az_policy = args.az_policy or DEFAULT_AZ_POLICY
    args.out = args.out or DEFAULT_OUT
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    removed = clear_previous_run(out)
    print(f"rehearse: starting clean: removed the previous run's {', '.join(removed)} from {out}"
          if removed else f"rehearse: a fresh run in {out}", file=sys.stderr, flush=True)
    logmod.configure(stream=open(out / "rehearsal.log", "w"))
    narrate = None if args.quiet else (lambda message: print(f"rehearse: {message}", file=sys.stderr,
                                                              flush=True))
    demo = not args.repository
    steps, after = args.interrupt_at_step or [], args.interrupt_after or []
    if demo and not steps and not after:
        steps = [DEMO_INTERRUPT_AT_STEP]
    plan = RehearsalPlan(out=Path(args.out), job_id=args.job, repository=args.repository or "",
                         ref=args.ref, interrupt_at_steps=steps, interrupt_after_s=after,
                         notice_s=args.notice_seconds, az_policy=args.az_policy,
                         timeout_s=args.timeout, trainer_user=args.trainer_user,
                         command=trainer_command(args.command, args.python),
                         trainer_env=dict(args.env or []),
                         trainer_path_prepend=list(args.path_prepend or []),
                         mount_point=private_mount_point(args.mount_point, lambda m: print(
                             f"rehearse: {m}", file=sys.stderr, flush=True)),
                         rebalance_after_s=list(args.rebalance_after or []),
                         interrupt_on_files=list(args.interrupt_on_file or []),
                         maintenance_after_s=list(args.maintenance_after or []),
                         missed_is_failure=demo)
    rehearsal = Rehearsal(plan, narrate=narrate)
    try:
        report = rehearsal.run()
    except Exception as exc:  # noqa: BLE001 - one line and the evidence, never only a traceback
        _show_failure(rehearsal, out, exc)
        return 1
    if args.compare_with_callback and not report["failures"]:
        try:
            report["compare_with_callback"] = _compare_with_callback(plan, rehearsal, report, narrate)
        except Exception as exc:  # noqa: BLE001 - your run's report stands; one line on why
            reason = " ".join(str(exc).split()) or type(exc).__name__
            report["failures"].append(f"the --compare-with-callback run failed: "
                                      f"{type(exc).__name__}: {reason} (its logs under "
                                      f"{out / COMPARE_DIR})")
    _write_report(out, report)
    if report["failures"]:
        print(f"rehearse: FAILED: {'; '.join(report['failures'])} (report: {out / 'report.txt'})",
              file=sys.stderr)
        return 1
    return 0


def cmd_rehearse_sweep(args) -> int:
    """A sweep on the local cloud (spotrun.harness.rehearsal_sweep): one row per experiment."""
    from spotrun import log as logmod
    from spotrun.harness import rehearsal_sweep as sweep

    given = [option for option, dest in SINGLE_JOB_ONLY
             if getattr(args, dest) not in (None, False, [], "")]
    if given:
        print(f"rehearse: {', '.join(given)}: not with --sweep (a sweep rehearses the counting "
              "trainer; a script of yours: rehearse it as one job)", file=sys.stderr)
        return 2
    try:
        plan = sweep.SweepPlan(
            out=Path(args.out or DEFAULT_SWEEP_OUT).resolve(), sweep_id=args.job or "demo-sweep",
            experiments=args.experiments or 4, capacity=args.capacity or 2,
            interrupts=1 if args.interrupts is None else args.interrupts,
            member_zones=args.az_policy or "random:1", claim=args.claim or "zone-first",
            notice_s=args.notice_seconds or 5.0, dataset=not args.no_dataset,
            timeout_s=args.timeout)
    except ValueError as exc:
        print(f"rehearse: {exc}", file=sys.stderr)
        return 2
    plan.out.mkdir(parents=True, exist_ok=True)
    removed = clear_previous_run(plan.out, sweep.RUN_STATE)
    print(f"rehearse: starting clean: removed the previous run's {', '.join(removed)} from "
          f"{plan.out}" if removed else f"rehearse: a fresh run in {plan.out}",
          file=sys.stderr, flush=True)
    logmod.configure(stream=open(plan.out / "rehearsal.log", "w"))
    narrate = None if args.quiet else (lambda message: print(f"rehearse: {message}",
                                                             file=sys.stderr, flush=True))
    try:
        report = sweep.SweepRehearsal(plan, narrate=narrate).run()
    except Exception as exc:  # noqa: BLE001 - one line and where the logs are
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"rehearse: FAILED: {type(exc).__name__}: {reason} (instances' logs under "
              f"{plan.out / 'cloud'})", file=sys.stderr)
        return 1
    print(sweep.write_report(plan.out, report))
    if report["failures"]:
        print(f"rehearse: FAILED: {' | '.join(report['failures'])} (report: "
              f"{plan.out / 'report.txt'})", file=sys.stderr)
        return 1
    return 0


def _compare_with_callback(plan: RehearsalPlan, rehearsal: Rehearsal, report: dict, narrate) -> dict:
    """The same schedule — each notice after as many seconds of training as it came in this
    run — with the reference trainer and spotrun's callback, paced to train about as long, in
    <out>/with-callback; what each interruption cost there, beside this run's."""
    from spotrun.harness.rehearsal_script_report import callback_comparison

    schedule = rehearsal.schedule_as_run()
    step_s = round(max(0.05, schedule["training_s"] / DEMO_STEPS), 3)
    (narrate or (lambda m: None))(f"the same schedule with spotrun's callback, in {plan.out / COMPARE_DIR}")
    again = RehearsalPlan(out=Path(plan.out) / COMPARE_DIR, job_id=plan.job_id, repository="",
                          interrupt_at_steps=[], interrupt_after_s=schedule["interrupt_after_s"],
                          maintenance_after_s=schedule["maintenance_after_s"],
                          rebalance_after_s=list(plan.rebalance_after_s), notice_s=plan.notice_s,
                          az_policy=plan.az_policy, timeout_s=plan.timeout_s,
                          trainer_user=plan.trainer_user, mount_point=plan.mount_point,
                          trainer_env={"DEMO_STEP_S": str(step_s)}, missed_is_failure=False)
    callback = Rehearsal(again, narrate=narrate).run()
    (again.out / "report.json").write_text(json.dumps(callback, indent=2))
    (again.out / "report.txt").write_text(format_report(callback) + "\n")
    return callback_comparison(report, callback, step_s)


def trainer_command(command: list[str] | None, python: str | None) -> list[str]:
    """The trainer's argv: a bare `python`/`python3` first word means the interpreter running
    spotrun (its virtualenv or conda env), or --python; the trainer's PATH may have none."""
    interpreter = python or sys.executable
    argv = list(command) if command else ["python", "train.py"]
    if argv[0] in BARE_PYTHON:
        argv[0] = interpreter
    return argv


def _write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    table = format_report(report)
    if report.get("compare_with_callback"):
        from spotrun.harness.rehearsal_script_report import comparison_lines

        table += "\n" + "\n".join(comparison_lines(report["compare_with_callback"],
                                                   str(out / COMPARE_DIR / "report.txt")))
    table += "".join(f"\nnote: {n}" for n in report.get("notes", []))
    (out / "report.txt").write_text(table + "\n")
    print(table)


def _tail(path: Path, lines: int = 15) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:] or ["(empty)"]
    except FileNotFoundError:
        return ["(not written yet)"]
    except OSError as exc:
        return [f"(unreadable: {exc})"]


def _show_failure(rehearsal: Rehearsal, out: Path, exc: Exception) -> None:
    """The agent's and trainer's last lines, the report so far, then one line saying why."""
    for boot in rehearsal.boots:
        for name, key in (("agent", "log"), ("trainer", "trainer_log")):
            print(f"--- {boot['instance_id']}: the {name}'s last lines ({boot[key]}) ---",
                  file=sys.stderr)
            print("\n".join(_tail(Path(boot[key]))), file=sys.stderr)
    if rehearsal.partial_report is not None:
        print("--- the report so far ---", file=sys.stderr)
        _write_report(out, rehearsal.partial_report)
    reason = " ".join(str(exc).split()) or type(exc).__name__
    print(f"rehearse: FAILED: {type(exc).__name__}: {reason} (logs under {out})", file=sys.stderr)


def _env_item(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: want KEY=VALUE with a non-empty KEY")
    return key, value


def _python(text: str) -> str:
    if not (os.path.isfile(text) and os.access(text, os.X_OK)):
        raise argparse.ArgumentTypeError(f"{text!r} is not an executable file")
    return os.path.abspath(text)


def _whole_number(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"{text!r}: want a whole number >= {least}")
        return value
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: want a number of seconds > 0")
    return value


DEFAULT_MOUNT_POINT = "/dltraining"
DEFAULT_JOB, DEFAULT_OUT, DEFAULT_SWEEP_OUT = "rehearsal", "demo-out", "demo-sweep-out"
DEFAULT_NOTICE_S, DEFAULT_AZ_POLICY = 20.0, "round-robin"
# Options of one mode only: (as typed, argparse dest).
SWEEP_ONLY = (("--experiments", "experiments"), ("--capacity", "capacity"),
              ("--interrupts", "interrupts"), ("--claim", "claim"), ("--no-dataset", "no_dataset"))
SINGLE_JOB_ONLY = (("--repository", "repository"), ("--command", "command"), ("--python", "python"),
                   ("--env", "env"), ("--path-prepend", "path_prepend"),
                   ("--interrupt-at-step", "interrupt_at_step"),
                   ("--interrupt-after", "interrupt_after"),
                   ("--interrupt-on-file", "interrupt_on_file"),
                   ("--maintenance-after", "maintenance_after"),
                   ("--compare-with-callback", "compare_with_callback"),
                   ("--rebalance-after", "rebalance_after"), ("--trainer-user", "trainer_user"))


def _mount_point(text: str) -> str:
    path = os.path.normpath(text)
    if not os.path.isabs(path) or path == "/":
        raise argparse.ArgumentTypeError(f"--mount-point: an absolute path below /, not {text!r}")
    return path


def _relative_glob(text: str) -> str:
    if not text.strip() or text.startswith("/") or ".." in Path(text).parts:
        raise argparse.ArgumentTypeError(f"a glob relative to the volume's root (e.g. "
                         f"'checkpoints/model.003.*'), not {text!r}")
    return text


def private_mount_point(asked: str, say) -> str:
    """``asked`` where each instance can have a mount namespace of its own (root, unshare(1));
    else "" (the instance's own directory), said out loud: hard-coded paths will miss it."""
    why = ("not root" if os.geteuid() != 0
           else "no unshare(1) (util-linux)" if shutil.which("unshare") is None else "")
    if why:
        say(f"{why}: no mount namespace per instance, so the volume is mounted under each "
            f"instance's directory, not at {asked}; a script with hard-coded {asked} paths "
            "will not reach it")
        return ""
    return asked


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "rehearse", help="run a whole spot job on the local spot cloud (the demo)",
        description="Train on the local spot cloud with the real agent: notices at chosen steps, "
                    "replacement in another AZ, migration, resume, completion, fleet cancelled.")
    parser.add_argument("--out", help=f"working directory and report location (default: "
                                      f"{DEFAULT_OUT}; with --sweep: {DEFAULT_SWEEP_OUT})")
    parser.add_argument("--job", help=f"job id (default: {DEFAULT_JOB}; with --sweep, the "
                                      "sweep's: demo-sweep)")
    sweep = parser.add_argument_group(
        "a sweep (issue 19)", "--sweep: N experiments of the counting trainer on one fleet of "
        "capacity C, K of them interrupted, replacements in random zones; one row per "
        "experiment: instances, migrations, steps redone, completion (what make demo-sweep runs)")
    sweep.add_argument("--sweep", action="store_true", help="rehearse a sweep, not one job")
    sweep.add_argument("--experiments", type=_whole_number(1), metavar="N",
                       help="experiments in the sweep (default: 4; at most 8)")
    sweep.add_argument("--capacity", type=_whole_number(1), metavar="C",
                       help="the fleet's target capacity (default: 2; at most N)")
    sweep.add_argument("--interrupts", type=_whole_number(0), metavar="K",
                       help="spot notices, each to a different instance while its experiment "
                            "trains (default: 1)")
    sweep.add_argument("--claim", choices=("zone-first", "in-order"),
                       help="the sweep's claim policy (default: zone-first)")
    sweep.add_argument("--no-dataset", action="store_true",
                       help="prepare the dataset volume but leave sweep.dataset_volume out (the "
                            "rehearsal then fails its dataset check: a fault to plant)")
    parser.add_argument("--repository", help="your training code (git URL or file://); default: "
                                             "the reference trainer on synthetic data")
    parser.add_argument("--ref", default="main", help="git ref to run (default: main)")
    parser.add_argument("--command", nargs="+",
                        help="trainer command, run in the checked-out code (default: python "
                             "train.py); a bare python/python3 first word is the interpreter "
                             f"running spotrun ({sys.executable}) unless --python is given")
    parser.add_argument("--python", type=_python, metavar="PATH",
                        help="the interpreter a bare python/python3 in --command means "
                             "(default: the one running spotrun)")
    parser.add_argument("--env", type=_env_item, action="append", metavar="KEY=VALUE",
                        help="a variable for the trainer's environment (repeatable; default: none)")
    parser.add_argument("--path-prepend", action="append", metavar="DIR",
                        help="a directory put first on the trainer's PATH (repeatable; default: "
                             "none, the trainer's PATH is the agent's minimal one)")
    parser.add_argument("--interrupt-at-step", type=int, action="append", metavar="STEP",
                        help="send a spot notice when training reaches this global step, read "
                             "from the progress file (repeatable; default: none with "
                             f"--repository, step {DEMO_INTERRUPT_AT_STEP} for the demo)")
    parser.add_argument("--interrupt-after", type=_seconds, action="append", metavar="SECONDS",
                        help="send a spot notice this many seconds after the trainer started on "
                             "the instance then training, for scripts with no progress file "
                             "(repeatable, one instance each, after the --interrupt-at-step "
                             "ones; default: none)")
    parser.add_argument("--interrupt-on-file", type=_relative_glob, action="append", metavar="GLOB",
                        help="send a spot notice when a file matching GLOB (relative to the "
                             "volume's root, e.g. 'checkpoints/cifar10_model.003.*') appears on the "
                             "instance then training (repeatable, one instance each, after the "
                             "step and time ones; default: none)")
    parser.add_argument("--maintenance-after", type=_seconds, action="append", metavar="SECONDS",
                        help="schedule an instance-retirement event this many seconds after the "
                             "trainer started (NotBefore --notice-seconds later; the agent drains "
                             "ahead of it, the instance is terminated then and replaced; "
                             "repeatable, one instance each, after the notices; default: none)")
    parser.add_argument("--compare-with-callback", action="store_true",
                        help="after a run that passed, run the same schedule with spotrun's "
                             "reference trainer (its callback) in <out>/with-callback, and report "
                             "what each interruption cost there beside your script's")
    parser.add_argument("--rebalance-after", type=_seconds, action="append", metavar="SECONDS",
                        help="post a rebalance recommendation this many seconds after the trainer "
                             "started: the first to the first instance that trains, the second to "
                             "the second… (repeatable; default: none). The agent signals only a "
                             "trainer that asked for it (SIGUSR1 kills a script without a handler)")
    parser.add_argument("--mount-point", type=_mount_point, default=DEFAULT_MOUNT_POINT, metavar="PATH",
                        help="where each instance mounts the job's volume, inside a mount namespace "
                             f"of its own, as on EC2 (default: {DEFAULT_MOUNT_POINT}; needs root and "
                             "unshare(1), else the volume is under the instance's directory)")
    parser.add_argument("--notice-seconds", type=_seconds,
                        help="time from notice to termination (default: 20, with --sweep 5; "
                             "AWS gives 120)")
    parser.add_argument("--az-policy",
                        help="where replacements launch: random, round-robin, fixed:<az> "
                             "(default: round-robin); with --sweep, the fleet members' zones: "
                             "as-launched, round-robin, random:<seed> (default: random:1)")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds (default: 900)")
    parser.add_argument("--trainer-user", default="",
                        help="user the trainer runs as (default: nobody, or root where nobody cannot "
                             "reach the work directory or the interpreter; on AWS: trainer.user)")
    parser.add_argument("--quiet", action="store_true", help="only the report")
    parser.set_defaults(func=cmd_rehearse)

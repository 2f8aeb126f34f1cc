"""``spotrun init|launch|status|cancel|teardown|plan``: the operator's commands, run from a laptop."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


from spotrun import log
from spotrun.config import ConfigError
from spotrun.errors import SpotrunError, UsageError
from spotrun.operator import cancel as cancel_mod
from spotrun.operator import init as init_mod
from spotrun.operator import jobfile
from spotrun.operator import launch as launch_mod
from spotrun.operator import status as status_mod
from spotrun.operator import teardown as teardown_mod
from spotrun.operator.aws import AWS_ERRORS, Aws, describe_error
from spotrun.operator.progress import Reporter

LOCAL_STATE = Path("/var/lib/spotrun/state.json")


def _common(parser: argparse.ArgumentParser, job_id: bool = False) -> None:
    parser.add_argument("--job-file", "-f", metavar="PATH",
                        help=f"the job file (default: ./{jobfile.DEFAULT_JOB_FILE})")
    if job_id:
        parser.add_argument("--job", metavar="ID", help="the job id (instead of a job file)")
    parser.add_argument("--region", help="AWS region (default: the job file's aws.region, then boto3's chain)")
    parser.add_argument("--endpoint-url", default="",
                        help="another AWS endpoint (the local spot cloud, moto); AWS_ENDPOINT_URL works too")
    parser.add_argument("--json", action="store_true", help="machine-readable output, no progress lines")
    parser.add_argument("--verbose", "-v", action="store_true", help="structured log events on stderr")


def register(subparsers: argparse._SubParsersAction) -> None:
    init = subparsers.add_parser(
        "init", help="create (or adopt) the job's volume, IAM role/policy/profile and lease table",
        description="Idempotent: run it again and it adopts what exists. The volume is created "
                    "empty; the agent formats it on first attach.")
    _common(init)
    init.add_argument("--dry-run", action="store_true", help="print the plan; make no AWS call")
    init.set_defaults(func=cmd_init)

    launch = subparsers.add_parser(
        "launch", help="launch template (IMDSv2 only) + spot capacity for the job",
        description="Validates the job file first (no AWS call on a bad file), then creates the "
                    "launch template and an EC2 Fleet, Auto Scaling group or Spot Fleet.")
    _common(launch)
    launch.add_argument("--dry-run", action="store_true",
                        help="print the launch template, user data and fleet request; make no AWS call")
    launch.add_argument("--wait", action="store_true", help="wait until an instance is running")
    launch.add_argument("--timeout", type=float, default=900, help="seconds --wait waits (default 900)")
    launch.set_defaults(func=cmd_launch)

    status = subparsers.add_parser(
        "status", help="the job at a glance (or, on an instance with no job given, the local agent)",
        description="Capacity, instances, AZ, spot price now, the agent's phase and progress from the "
                    "volume's tags, volumes, snapshots and an estimated cost vs on demand.")
    _common(status, job_id=True)
    status.add_argument("--watch", action="store_true", help="refresh until interrupted (Ctrl-C)")
    status.add_argument("--interval", type=float, default=10.0, help="seconds between --watch refreshes")
    status.add_argument("--plot", metavar="PNG", type=Path,
                        help="also draw the learning curves the agents published to CloudWatch "
                             "(every experiment of a sweep on one figure; needs matplotlib: "
                             "pip install 'spotrun[plot]')")
    status.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)  # bounded --watch, for tests
    status.set_defaults(func=cmd_status)

    cancel = subparsers.add_parser(
        "cancel", help="cancel the job's fleet/group and terminate its instances; keeps the volume")
    _common(cancel, job_id=True)
    cancel.add_argument("--delete-volume", action="store_true",
                        help="also snapshot, then delete, the job's volume (asks first)")
    cancel.add_argument("--yes", "-y", action="store_true", help="don't ask (required without a terminal)")
    cancel.set_defaults(func=cmd_cancel)

    teardown = subparsers.add_parser(
        "teardown", help="after the job: remove its launch template, role, policy, instance profile "
                         "and lease entry; keeps the volume and snapshots unless asked",
        description="Refused while the job still runs (`spotrun cancel` first). Asks first.")
    _common(teardown)
    teardown.add_argument("--delete-volume", action="store_true",
                          help="also snapshot, then delete, the job's volume")
    teardown.add_argument("--delete-snapshots", action="store_true", help="also delete the job's snapshots")
    teardown.add_argument("--all", action="store_true",
                          help="also delete the lease table (shared by every job that uses it)")
    teardown.add_argument("--yes", "-y", action="store_true", help="don't ask (required without a terminal)")
    teardown.set_defaults(func=cmd_teardown)

    plan = subparsers.add_parser(
        "plan", help="the jobs a job file runs: one, or one per experiment of its [sweep]",
        description="Validates the job file (no AWS call) and lists each job it runs: its id, "
                    "the trainer's command line and the environment it changes.")
    plan.add_argument("--job-file", "-f", metavar="PATH",
                      help=f"the job file (default: ./{jobfile.DEFAULT_JOB_FILE})")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument("--write-job-files", metavar="DIR",
                      help="write one job file per experiment into DIR (<job id>.toml; each "
                           "one a single job for its own fleet); existing files are not replaced")
    plan.set_defaults(func=cmd_plan)


def _aws_errors_as_messages(func):
    """botocore's exceptions become one clear line and exit 1, not a traceback."""
    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except AWS_ERRORS as exc:
            raise SpotrunError(describe_error(exc)) from None
    return wrapper


def _setup(args: argparse.Namespace) -> Reporter:
    log.configure("info" if args.verbose else "warning", stream=sys.stderr)
    return Reporter(quiet=args.json)


def _aws(args: argparse.Namespace, job: jobfile.Job | None) -> Aws:
    region = args.region or (job.region if job else "")
    endpoint = args.endpoint_url or (job.config.aws.endpoint_url if job else "")
    return Aws(region=region, endpoint_url=endpoint)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=None if args.watch_line else 2, default=str) if args.json else text,
          flush=True)


@_aws_errors_as_messages
def cmd_init(args: argparse.Namespace) -> int:
    job = jobfile.load(args.job_file)  # validation before any AWS call
    reporter = _setup(args)
    args.watch_line = False
    if args.dry_run:
        steps = init_mod.plan(job)
        text = "\n".join([f"spotrun init {job.id}: plan (dry run, no AWS call)"] +
                         [f"  ensure {s.kind:17} {s.name:30} {s.detail}" for s in steps])
        _emit(args, {"job": job.id, "dry_run": True, "plan": [s.as_dict() for s in steps]}, text)
        return 0
    steps = init_mod.apply(_aws(args, job), job, reporter)
    text = "\n".join([f"spotrun init {job.id}:"] +
                     [f"  {s.action:8} {s.kind:17} {s.name:30} {s.detail}" for s in steps])
    _emit(args, {"job": job.id, "steps": [s.as_dict() for s in steps]}, text)
    return 0


@_aws_errors_as_messages
def cmd_launch(args: argparse.Namespace) -> int:
    job = jobfile.load(args.job_file)
    reporter = _setup(args)
    args.watch_line = False
    if args.dry_run:
        plan = launch_mod.plan(job)
        _emit(args, plan, _launch_plan_text(job, plan))
        return 0
    result = launch_mod.apply(_aws(args, job), job, reporter, wait=args.wait, timeout_s=args.timeout)
    text = (f"launched job {job.id}: {result['fleet']['kind']} {result['fleet']['id']}, launch template "
            f"{result['launch_template']['LaunchTemplateName']} v{result['launch_template']['Version']}, "
            f"user data {result['user_data_bytes']} bytes\nfollow it with: spotrun status --watch"
            + (f" --job-file {args.job_file}" if args.job_file else ""))
    _emit(args, result, text)
    return 0


def _launch_plan_text(job: jobfile.Job, plan: dict) -> str:
    meta = plan["launch_template"]["data"]["MetadataOptions"]
    where = ", ".join(job.launch.subnets or job.launch.availability_zones) or "any AZ of the region"
    price = f"at most ${job.launch.max_price:.4f}/h" if job.launch.max_price else "up to the on-demand price"
    lines = [f"spotrun launch {job.id}: plan (dry run, no AWS call)",
             f"  launch template  {plan['launch_template']['name']} (new version): {job.launch.image_id}, "
             f"profile {job.role_name}, HttpTokens={meta['HttpTokens']}, "
             f"hop limit {meta['HttpPutResponseHopLimit']}, tags in metadata {meta['InstanceMetadataTags']}",
             f"  capacity         {job.launch.fleet}, {job.launch.allocation_strategy}, "
             f"{job.launch.target_capacity} spot instance(s) of {', '.join(job.launch.instance_types)} "
             f"in {where}, {price}",
             f"  user data        {plan['user_data_bytes']} bytes (limit 16384):"]
    lines += [f"    {line}" for line in plan["user_data"].splitlines()]
    lines.append("  (--json shows the exact API requests)")
    return "\n".join(lines)


def _job_from_args(args: argparse.Namespace) -> tuple[str, jobfile.Job | None]:
    if args.job_file or (not args.job and Path(jobfile.DEFAULT_JOB_FILE).is_file()):
        job = jobfile.load(args.job_file)
        if args.job and args.job != job.id:
            raise UsageError(f"--job {args.job} does not match the job file's job.id {job.id}")
        return job.id, job
    if args.job:
        if not jobfile.agent_config._JOB_ID.match(args.job):
            raise UsageError(f"--job: {args.job!r} is not a valid job id")
        return args.job, None
    return "", None


def _local_status(args: argparse.Namespace) -> int:
    try:
        from spotrun.agentcmd import print_local_status
    except ImportError:
        print_local_status = None
    from spotrun import config as agent_config

    args.config = Path(os.environ.get("SPOTRUN_CONFIG", agent_config.DEFAULT_CONFIG_PATH))
    try:
        state = agent_config.load(args.config).state_path / "state.json"
    except agent_config.ConfigError:
        state = LOCAL_STATE
    if print_local_status is not None and state.exists():
        return int(print_local_status(args) or 0)
    raise UsageError(f"no job given: pass --job ID or --job-file PATH (or run where ./{jobfile.DEFAULT_JOB_FILE} "
                     "is; on an instance, `spotrun agent status` shows the local agent)")


@_aws_errors_as_messages
def cmd_status(args: argparse.Namespace) -> int:
    job_id, job = _job_from_args(args)
    if not job_id:
        return _local_status(args)
    _setup(args)
    aws = _aws(args, job)
    types = list(job.launch.instance_types) if job else []
    args.watch_line = args.watch
    shown = 0
    experiments = [(e.name, e.job_id, dict(e.parameters)) for e in job.experiments] if job else []
    while True:
        if experiments:  # a sweep: one row per experiment, each looked up as its own job
            view = status_mod.gather_sweep(aws, job_id, experiments, types)
            text = status_mod.render_sweep(view)
        else:
            view = status_mod.gather(aws, job_id, types)
            text = status_mod.render(view)
        if args.plot:
            view["plot"] = _plot_curves(aws, args.plot, job_id, experiments)
        if args.watch and sys.stdout.isatty() and not args.json:
            text = "\033[H\033[2J" + text  # redraw in place, like watch(1)
        _emit(args, view, text)
        if args.plot:
            print(f"learning curves: {args.plot} ({view['plot']['summary']})", file=sys.stderr,
                  flush=True)
        shown += 1
        ending = view["outcome"]
        if args.watch and ending:
            # Nothing more will happen: end with the final state instead of redrawing forever.
            print(_final_line(view), file=sys.stderr, flush=True)
            return WATCH_EXIT[ending]
        if not args.watch or (args.count and shown >= args.count):
            return 0
        if not args.json and not sys.stdout.isatty():
            print("", flush=True)
        time.sleep(args.interval)


def _plot_curves(aws, path: Path, job_id: str, experiments: list) -> dict:
    """Read every job's curves from CloudWatch and draw them into ``path``."""
    from spotrun.operator import curves as curves_mod

    labels = {exp_job: name + (" (" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"
                               if params else "")
              for name, exp_job, params in experiments} or {job_id: job_id}
    found = curves_mod.fetch(aws.client("cloudwatch"), list(labels))
    drawn = curves_mod.plot(found, path, labels=labels, title=f"spotrun {job_id}")
    points = sum(len(p) for lines in drawn.values() for p in lines.values())
    return {"path": str(path), "jobs": sorted(found), "drawn": drawn,
            "summary": f"{len(found)} of {len(labels)} jobs, {', '.join(drawn)}; {points} points"}


# `status --watch` ends with the job: 0 done, 1 failed, 3 cancelled (2 is bad input).
WATCH_EXIT = {"done": 0, "failed": 1, "cancelled": 3}


def _final_line(view: dict) -> str:
    if "experiments" in view:
        ended = ", ".join(f"{row['name']} {row['outcome']}" for row in view["experiments"])
        return f"sweep {view['sweep']} {view['outcome']}: {ended}"
    agent, ending = view["agent"], view["outcome"]
    if ending == "done":
        line = f"job {view['job']} done (completed {agent['completed'] or 'as recorded by the agent'})"
    elif ending == "failed":
        line = f"job {view['job']} FAILED: {agent['failure'] or 'see the volume tags'}"
    else:
        line = f"job {view['job']} cancelled: no capacity and no instance runs"
    if view["capacity"]:
        ids = ", ".join(f"{c['kind']} {c['id']}" for c in view["capacity"])
        line += f"; capacity still up ({ids}): `spotrun cancel` stops it"
    return line


@_aws_errors_as_messages
def cmd_cancel(args: argparse.Namespace) -> int:
    job_id, job = _job_from_args(args)
    if not job_id:
        raise UsageError("no job given: pass --job ID or --job-file PATH")
    if args.delete_volume and not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("--delete-volume deletes the job's data: confirm with --yes when not on a terminal")
        answer = input(f"Cancel job {job_id}, snapshot its volume, then DELETE the volume? "
                       f"Type the job id to confirm: ")
        if answer.strip() != job_id:
            raise UsageError("not confirmed; nothing was changed")
    reporter = _setup(args)
    args.watch_line = False
    result = cancel_mod.apply(_aws(args, job), job_id, reporter, delete_volume=args.delete_volume,
                              volume_jobs=teardown_mod.job_ids(job) if job is not None else None)
    text = (f"job {job_id}: cancelled {len(result['cancelled'])} fleet(s)/group(s), terminated "
            f"{len(result['terminated'])} stray instance(s); kept {len(result['volumes_kept'])} volume(s), "
            f"deleted {len(result['volumes_deleted'])}")
    _emit(args, result, text)
    return 0


@_aws_errors_as_messages
def cmd_teardown(args: argparse.Namespace) -> int:
    job = jobfile.load(args.job_file)  # the names come from the job file
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError("teardown removes the job's AWS resources: confirm with --yes when not on a terminal")
        extra = [w for w, on in (("the volume", args.delete_volume), ("the snapshots", args.delete_snapshots),
                                 (f"lease table {job.lease_table}", args.all)) if on]
        answer = input(f"Remove job {job.id}'s launch template, role, policy, instance profile and lease entry"
                       f"{' and ' + ', '.join(extra) if extra else ''}? Type the job id to confirm: ")
        if answer.strip() != job.id:
            raise UsageError("not confirmed; nothing was changed")
    reporter = _setup(args)
    args.watch_line = False
    result = teardown_mod.apply(_aws(args, job), job, reporter, delete_volume=args.delete_volume,
                                delete_snapshots=args.delete_snapshots, delete_table=args.all)
    text = (f"job {job.id}: removed {len(result['removed'])}, kept {len(result['kept'])}: "
            + ", ".join(f"{k['resource']} {k['name']}" for k in result["kept"]))
    _emit(args, result, text.rstrip(": "))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    job = jobfile.load(args.job_file)
    rows = [{"name": "", "job_id": job.id, "command": list(job.config.trainer.command),
             "env": {}, "parameters": {}}]
    if job.experiments:
        rows = [{"name": e.name, "job_id": e.job_id,
                 "command": list(job.experiment_job(e).config.trainer.command),
                 "env": dict(e.env), "parameters": dict(e.parameters)} for e in job.experiments]
    if args.write_job_files:
        rows = _write_job_files(job, Path(args.write_job_files), rows)
    if args.json:
        print(json.dumps({"job": job.id, "sweep": bool(job.experiments), "jobs": rows}, indent=2,
                         default=str))
        return 0
    what = (f"a sweep of {len(rows)} experiments on {job.launch.target_capacity} instance(s)"
            if job.experiments else "one job")
    lines = [f"{job.source}: {what}"]
    for row in rows:
        env = " ".join(f"{k}={v}" for k, v in row["env"].items())
        lines.append(f"  {row['job_id']:40} {' '.join(row['command'])}" + (f"  [{env}]" if env else ""))
        if row.get("job_file"):
            lines.append(f"  {'':40} -> {row['job_file']}")
    print("\n".join(lines))
    return 0


def _write_job_files(job: jobfile.Job, directory: Path, rows: list[dict]) -> list[dict]:
    """Each experiment's own job file; refused (nothing written) if a file is already there."""
    if not job.experiments:
        raise UsageError("--write-job-files: the job file has no [sweep]: it already is one job")
    paths = [directory / f"{e.job_id}.toml" for e in job.experiments]
    present = [str(p) for p in paths if p.exists()]
    if present:
        raise UsageError(f"--write-job-files: {present[0]} exists; nothing was written "
                         f"({len(present)} of {len(paths)} files are there)")
    directory.mkdir(parents=True, exist_ok=True)
    for experiment, path, row in zip(job.experiments, paths, rows):
        note = (f"Generated by `spotrun plan --write-job-files` from {job.source}:\n"
                f"experiment {experiment.name} of its sweep, as a job of its own.")
        own = job.experiment_job(experiment)  # on a fleet of its own: one instance
        own = dataclasses.replace(own, launch=dataclasses.replace(own.launch, target_capacity=1))
        path.write_text(jobfile.single_job_text(own, note))
        row["job_file"] = str(path)
    return rows

"""``spotrun agent run`` (what systemd starts) and ``spotrun agent status`` (on the instance).

`agent run` assembles the real collaborators (metadata, EC2, block devices, git, trainer,
monitor, fleet) around :class:`spotrun.lifecycle.Lifecycle`. Everything is validated before
anything is touched: a bad config or user data ends here with the key named and exit 2.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import pwd
import sys
import time
import traceback
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from spotrun import config as configmod
from spotrun import log as logmod
from spotrun.config import Config, ConfigError
from spotrun.lease import LeaseHeld
from spotrun.progress import epoch_step

CONFIG_ENV = "SPOTRUN_CONFIG"
# Room for the backoff between git attempts, on top of their own timeouts.
CHECKOUT_SLACK_S = 120.0


def register(subparsers: argparse._SubParsersAction) -> None:
    agent = subparsers.add_parser("agent", help="the on-instance agent (systemd runs 'agent run')",
                                  description="The agent that runs on each spot instance.")
    sub = agent.add_subparsers(dest="agent_command", metavar="SUBCOMMAND", required=True)
    run = sub.add_parser("run", help="run the lifecycle on this instance (started by systemd)",
                         description="Identify the instance, acquire the job's volume, check out "
                                     "the code, train, drain on a notice, finish and cancel the fleet.")
    _config_argument(run)
    run.add_argument("--no-user-data", action="store_true",
                     help="ignore the instance's user data (use the config file alone)")
    run.add_argument("--exit-when-done", action="store_true",
                     help="exit after draining or finishing instead of waiting to be terminated")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check-config", help="validate the config (file + user data) and exit",
                           description="Load and validate the configuration; exit 2 naming the "
                                       "bad key, 0 when it is complete.")
    _config_argument(check)
    check.add_argument("--no-user-data", action="store_true", help="validate the file alone")
    check.set_defaults(func=cmd_check_config)
    status = sub.add_parser("status", help="this instance's agent: phase, trainer, progress",
                            description="Print this instance's agent state.")
    _config_argument(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=print_local_status)


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path,
                        default=Path(os.environ.get(CONFIG_ENV, configmod.DEFAULT_CONFIG_PATH)),
                        help=f"agent config (default ${CONFIG_ENV} or {configmod.DEFAULT_CONFIG_PATH})")


def load_config(path: Path, *, use_user_data: bool = True) -> tuple[Config, object]:
    """The config file, overridden by the instance's user data; plus the metadata client."""
    from spotrun import userdata
    from spotrun.imds import MetadataClient

    base = configmod.load(path)
    metadata = MetadataClient.from_config(base.metadata)
    overrides = []
    if use_user_data:
        raw = metadata.user_data()
        if raw:
            def fetch_parameter(name: str) -> str:
                from spotrun import ec2
                region = base.aws.region or metadata.get("meta-data/placement/region")
                ssm = ec2.client("ssm", base.aws, region)
                return ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]

            overrides.append((userdata.parse(raw, fetch_parameter=fetch_parameter), "user-data"))
    config = configmod.load(path, *overrides, require_repository=True, require_lease=True)
    try:
        pwd.getpwnam(config.trainer.user)
    except KeyError:
        raise ConfigError("trainer.user", f"no such user {config.trainer.user!r} on this machine",
                          "config") from None
    if config.metadata != base.metadata:
        metadata = MetadataClient.from_config(config.metadata)
    return config, metadata


def cmd_check_config(args: argparse.Namespace) -> int:
    config, _ = load_config(args.config, use_user_data=not args.no_user_data)
    if config.sweep.id:
        print(f"ok: sweep {config.sweep.id} of {len(config.sweep.experiments)} experiments "
              f"({', '.join(e.job for e in config.sweep.experiments)}), repository "
              f"{config.code.repository} @ {config.code.ref}")
        return 0
    print(f"ok: job {config.job.id}, repository {config.code.repository} @ {config.code.ref}")
    return 0


def build_lifecycle(config: Config, metadata, *, lease=None, identify=None, cancel_fleet=None):
    """The lifecycle with its real edges. A sweep's experiment passes the ``lease`` it claimed,
    the ``identify`` it already did, and its own ``cancel_fleet`` (the sweep decides that)."""
    from spotrun import checkout as checkoutmod
    from spotrun import ec2, fleet, identity, metrics, monitor, notify, volumes
    from spotrun.lifecycle import Lifecycle

    def region_of(ident) -> str:
        return config.aws.region or ident.region

    def do_checkout(ident) -> str:
        code = config.code
        credentials = checkoutmod.load_credentials(code, aws_cfg=config.aws, region=region_of(ident))
        # git cannot kick the watchdog; its own deadline (per attempt, times attempts) bounds it.
        bound = inspect.signature(checkoutmod.checkout).parameters
        with notify.process_notifier().watchdog_stretched(
                bound["timeout_s"].default * bound["attempts"].default + CHECKOUT_SLACK_S):
            return checkoutmod.checkout(code.repository, code.ref, Path(code.workspace),
                                        credentials=credentials, owner=config.trainer.user)

    def cancel_own_fleet(launched_by) -> str:
        if launched_by is None:
            logmod.get_logger("lifecycle").warning(
                "nothing_to_cancel", reason="this instance was not launched by a fleet or group")
            return "nothing (not launched by a fleet or group)"
        region = config.aws.region or metadata.get("meta-data/placement/region")
        return fleet.cancel(launched_by, ec2_client=ec2.client("ec2", config.aws, region),
                            autoscaling_client=ec2.client("autoscaling", config.aws, region))

    return Lifecycle(
        config,
        metadata=metadata,
        identify=identify or (lambda: identity.identify(
            metadata, ec2_client_factory=lambda region: ec2.client("ec2", config.aws, region))),
        volume_manager=lambda ident: volumes.VolumeManager(config, ident, lease=lease),
        checkout=do_checkout,
        monitor=lambda on_event: monitor.InterruptionMonitor.from_config(
            metadata, config.metadata, on_event=on_event),
        cancel_fleet=cancel_fleet or cancel_own_fleet,
        record_held=lease is not None,  # a sweep's experiment: its cost is kept on its volume
        metrics=lambda: metrics.MetricsPublisher(
            ec2.client("cloudwatch", config.aws, config.aws.region
                       or metadata.get("meta-data/placement/region")), config.job.id),
    )


def build_sweep(config: Config, metadata):
    """The sweep's loop (spotrun.sweeprun) with its real edges: one lease per experiment, each
    experiment's lifecycle built as for a single job around the lease it claimed."""
    import signal

    from spotrun import ec2, fleet, identity, monitor, sweepclaim
    from spotrun.boot import StopRequested
    from spotrun.lease import Lease
    from spotrun.sweeprun import Ran, SweepRunner, going_away

    runner_state: dict = {}

    def identify():
        ident = identity.identify(
            metadata, ec2_client_factory=lambda region: ec2.client("ec2", config.aws, region))
        runner_state["region"] = config.aws.region or ident.region
        return ident

    def client(service: str):
        return ec2.client(service, config.aws, runner_state["region"])

    def leases(ident):
        options = {"absent_window_s": config.lease.takeover_window_s,
                   "absent_lookups": config.lease.takeover_lookups,
                   "loser_wait_s": config.lease.loser_wait_s}
        return [Lease(client("dynamodb"), config.aws.lease_table, e.job, ident.instance_id,
                      ident.availability_zone, client("ec2"), **options)
                for e in config.sweep.experiments]

    def run_experiment(experiment_config: Config, lease, ident) -> Ran:
        previous = runner_state.get("lifecycle")
        lifecycle = build_lifecycle(
            experiment_config, metadata, lease=lease, identify=lambda: ident,
            # A finished experiment is not the end of the sweep: the loop decides the cancel.
            cancel_fleet=lambda launched_by: "not cancelled: the sweep goes on")
        runner_state["lifecycle"] = lifecycle
        lifecycle._install_signal_handlers()  # a signal from here on is this experiment's
        if previous is not None and previous._stop_event.is_set():
            # Signalled after the last look (stop_due), during the claim: this experiment's
            # lifecycle stops at its first safe point and gives the claim back.
            lifecycle.events.put(StopRequested(signal.SIGTERM))
            lifecycle._stop_event.set()
        try:
            code = lifecycle.run()
        except LeaseHeld as exc:
            report_gave_up(lifecycle.state, exc)
            raise
        return Ran(experiment_config.job.id, lifecycle.phase, code)

    def stop_due() -> str | None:
        # The lifecycle's own reader of the notice path, made for one read (no threads).
        return going_away(runner_state.get("lifecycle"),
                          monitor.InterruptionMonitor.from_config(metadata, config.metadata))

    runner = SweepRunner(
        config, identify=identify, leases=leases, run_experiment=run_experiment,
        stop_due=stop_due,
        take_fleet_cancel=lambda ident: sweepclaim.take_fleet_cancel(
            client("dynamodb"), config.aws.lease_table, config.sweep.id, ident.instance_id,
            ec2=client("ec2")),
        cancel_fleet=lambda launched_by: fleet.cancel(
            launched_by, ec2_client=client("ec2"), autoscaling_client=client("autoscaling")),
        leave_fleet=lambda launched_by, instance_id: fleet.leave(
            launched_by, instance_id, ec2_client=client("ec2"),
            autoscaling_client=client("autoscaling")))
    return runner, runner_state


def cmd_run(args: argparse.Namespace) -> int:
    logmod.configure()
    log = logmod.get_logger("agent")
    try:
        config, metadata = load_config(args.config, use_user_data=not args.no_user_data)
    except ConfigError as exc:
        log.error("config_invalid", key=exc.key, source=exc.source, error=str(exc))
        raise
    logmod.configure(level=config.agent.log_level, job=config.job.id)
    log = logmod.get_logger("agent")
    from spotrun import awsclients
    # Only the EC2/DynamoDB operations the agent calls (spotrun.botomodel): ~25 MB less resident.
    awsclients.use_trimmed_models(config.state_path / "botocore-models")
    log.info("agent_starting", config=str(args.config), repository=config.code.repository,
             ref=config.code.ref)
    if config.sweep.id:
        return run_sweep(config, metadata, args)
    lifecycle = build_lifecycle(config, metadata)
    try:
        code = lifecycle.run()
    except LeaseHeld as exc:
        report_gave_up(lifecycle.state, exc)
        raise
    except (ClientError, BotoCoreError) as exc:
        # The operator reads one line (the call, EC2's code, the resource) at error priority;
        # the traceback is for debugging only.
        from spotrun import ec2
        phase = lifecycle.phase.value if lifecycle.phase else None
        log.error("agent_failed", error=ec2.summary(exc), error_type=type(exc).__name__,
                  aws_call=getattr(exc, "operation_name", None), aws_code=ec2.error_code(exc) or None,
                  phase=phase)
        log.debug("agent_failed_traceback", traceback=traceback.format_exc())
        return 1
    except Exception as exc:
        log.error("agent_failed", error=str(exc), error_type=type(exc).__name__,
                  phase=lifecycle.phase.value if lifecycle.phase else None)
        raise
    if not args.exit_when_done:
        lifecycle.wait_for_termination()
    return code


def run_sweep(config: Config, metadata, args: argparse.Namespace) -> int:
    """A sweep's instance: experiments one after another until none is left (spotrun.sweeprun)."""
    from spotrun.lifecycle import Lifecycle

    log = logmod.get_logger("agent")
    runner, runner_state = build_sweep(config, metadata)
    from spotrun.notify import process_notifier
    # READY before the first claim: an instance with nothing to claim runs no lifecycle (whose
    # run() says READY), and a Type=notify unit that never hears it is killed at its timeout.
    process_notifier().ready(f"sweep {config.sweep.id}: claiming an experiment")
    try:
        end = runner.run()
    except (ClientError, BotoCoreError) as exc:
        from spotrun import ec2
        current = runner_state.get("lifecycle")
        log.error("agent_failed", error=ec2.summary(exc), error_type=type(exc).__name__,
                  aws_call=getattr(exc, "operation_name", None), aws_code=ec2.error_code(exc) or None,
                  phase=current.phase.value if current is not None and current.phase else None)
        log.debug("agent_failed_traceback", traceback=traceback.format_exc())
        return 1
    log.info("sweep_instance_done", outcome=end.outcome, detail=end.detail,
             experiments=[r.job_id for r in end.ran])
    if not args.exit_when_done:
        waiter = runner_state.get("lifecycle")
        if waiter is None:  # nothing ran here: a lifecycle only to wait as one does
            waiter = Lifecycle(config, metadata=metadata, identify=None, volume_manager=None,
                               checkout=None, monitor=None, cancel_fleet=None)
            waiter._install_signal_handlers()
        waiter.wait_for_termination()
    codes = [r.code for r in end.ran]
    return max(codes, default=0)


def report_gave_up(state, exc: LeaseHeld) -> None:
    """An instance that lost the race for the job tells the operator: the state file (what
    `spotrun agent status` prints) and the journal, at error priority. It writes nothing on the
    job's resources: its volume tags are the winner's to write."""
    from spotrun.lease import GAVE_UP_HINT

    current = state.read()
    current.update(
        status=f"not needed: job held by instance {exc.holder} ({exc.holder_state}); "
               f"gave up after {exc.waited_s} s without touching the job's volume",
        gave_up={"holder": exc.holder, "holder_state": exc.holder_state,
                 "waited_s": exc.waited_s, "reason": str(exc)[:500]},
        next=GAVE_UP_HINT)
    state.write(current)
    logmod.get_logger("agent").error("agent_not_needed", holder=exc.holder,
                                     holder_state=exc.holder_state, waited_s=exc.waited_s,
                                     hint=GAVE_UP_HINT)


def print_local_status(args: argparse.Namespace) -> int:
    from spotrun.errors import SpotrunError
    from spotrun.state import StateFile

    try:
        state_dir = configmod.load(args.config).state_path
    except ConfigError:
        state_dir = Path(configmod.AgentConfig().state_dir)
    state = StateFile(state_dir / "state.json").read()
    if not state:
        raise SpotrunError(f"no agent state at {state_dir / 'state.json'}: is the agent running here?")
    if getattr(args, "json", False):
        json.dump(state, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    trainer = state.get("trainer") or {}
    progress = state.get("progress") or {}
    rows = [
        ("phase", state.get("phase")),
        ("status", state.get("status")),
        ("job", state.get("job")),
        ("instance", f"{state.get('instance_id')} in {state.get('az')}"),
        ("volume", f"{state.get('volume_id')} at {state.get('mount_point')}"),
        ("commit", state.get("commit")),
        ("trainer", f"pid {trainer.get('pid')} {trainer.get('state')}, restarts {trainer.get('restarts')}"
         if trainer else "not running"),
        ("progress", epoch_step(progress) or "-"),
        ("last checkpoint", _age(progress.get("last_checkpoint_time"))),
        ("interruptions", state.get("interruptions")),
        ("next", state.get("next")),
        ("updated", state.get("updated")),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value if value is not None else '-'}")
    return 0


def _age(when) -> str:
    if not isinstance(when, (int, float)):
        return "-"
    return f"{max(0.0, time.time() - when):.0f} s ago"

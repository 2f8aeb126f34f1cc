"""``spotrun localcloud ...``: run the local spot cloud and inject events into it.

``up`` runs a cloud (foreground, or ``--detach``ed into the background) and serves the
control API (control.py); every other command talks to that API, found through
``<root>/localcloud.json``. Bad arguments exit 2 with a message naming the argument.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from spotrun.errors import SpotrunError
from spotrun.localcloud import control
from spotrun.waiting import wait_until

DEFAULT_ROOT = "/var/tmp/spotrun-localcloud"
IMDS_FAULTS = ("5xx", "slow", "refused", "401", "malformed")
ACTIONS = ("terminate", "stop", "hibernate")


# ---- argument types (argparse turns ArgumentTypeError into "exit 2: message") -----------
def _instance_id(text: str) -> str:
    if not re.fullmatch(r"i-[0-9a-f]{8,17}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an instance id (i-0123456789abcdef0)")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be >= 0")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be > 0")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate (0..1)") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a rate is between 0 and 1")
    return value


def _action_rate(text: str) -> tuple[str, float]:
    action, sep, rate = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Z][A-Za-z]+", action):
        raise argparse.ArgumentTypeError(f"{text!r}: expected ACTION=RATE, e.g. AttachVolume=0.2")
    return action, _rate(rate)


def _tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, value


def _capacity(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,4}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: capacity is a whole number >= 0")
    return int(text)


def member_zones_choice(text: str) -> str:
    if text in ("as-launched", "round-robin") or re.fullmatch(r"random:\w+", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected as-launched, round-robin or random:<seed>")


def _az_policy(text: str) -> str:
    if text in ("random", "round-robin") or re.fullmatch(r"fixed:[a-z]{2}-[a-z]+-\d[a-z]", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected random, round-robin or fixed:<az>")


# ---- the parser ------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "localcloud", help="run and drive the local spot cloud",
        description="Run the local spot cloud (moto EC2, metadata, EBS on loop devices, "
                    "fleets) and inject spot events and faults into it.")
    commands = parser.add_subparsers(dest="localcloud_command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", type=Path,
                        default=Path(os.environ.get("SPOTRUN_LOCALCLOUD_ROOT", DEFAULT_ROOT)),
                        help="the cloud's directory (default $SPOTRUN_LOCALCLOUD_ROOT or "
                             f"{DEFAULT_ROOT})")

    up = commands.add_parser("up", parents=[common], help="start a local cloud",
                             description="Start a local cloud and serve its control API; "
                                         "writes <root>/localcloud.json.")
    up.add_argument("--timing", choices=("fast", "aws", "instant"), default="fast",
                    help="EBS/instance timing model (default fast: sub-second)")
    up.add_argument("--detach", action="store_true",
                    help="run in the background (log in <root>/localcloud.log)")
    up.add_argument("--control-port", type=int, default=0, help="control API port (default: any)")
    up.add_argument("--imdsv1", action="store_true",
                    help="metadata also answers without a token (IMDSv1 'optional' mode)")
    up.add_argument("--no-tags-in-metadata", action="store_true",
                    help="instance tags are not exposed under meta-data/tags/instance")
    up.add_argument("--run-agents", action="store_true",
                    help="instances that fleets and Auto Scaling groups launch through the EC2 "
                         "API (e.g. `spotrun launch`) boot the real agent, as the AMI does; "
                         "its log: <root>/instances/<id>/agent.log")
    up.add_argument("--member-zones", default="as-launched", type=member_zones_choice,
                    help="with --run-agents: the zone of each fleet instance among its fleet's "
                         "zones: as-launched (moto's, the region's first), round-robin, or "
                         "random:<seed> (replacements in random zones, as on EC2)")
    up.set_defaults(func=cmd_up)

    down = commands.add_parser("down", parents=[common], help="stop the local cloud")
    down.set_defaults(func=cmd_down)

    status = commands.add_parser("status", parents=[common],
                                 help="instances, AZs, volumes, snapshots, attachments")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    events = commands.add_parser("events", parents=[common],
                                 help="everything injected into the cloud, one JSON per line")
    events.add_argument("--since", type=int, default=0, help="skip the first N events")
    events.set_defaults(func=cmd_events)

    launch = commands.add_parser("launch", parents=[common], help="launch one instance")
    launch.add_argument("--az", help="availability zone (default: the first)")
    launch.add_argument("--type", dest="instance_type", default="p3.2xlarge")
    launch.add_argument("--tag", type=_tag, action="append", default=[], metavar="KEY=VALUE")
    launch.add_argument("--user-data", type=Path, metavar="FILE")
    launch.add_argument("--run", metavar="COMMAND", help="start this command on the instance")
    launch.set_defaults(func=cmd_launch)

    fleet = commands.add_parser("fleet", parents=[common],
                                help="request a Spot Fleet (maintain mode)")
    fleet.add_argument("--capacity", type=_capacity, default=1, help="target capacity")
    fleet.add_argument("--az-policy", type=_az_policy, default="random",
                       help="random | round-robin | fixed:<az>")
    fleet.add_argument("--type", dest="instance_type", default="p3.2xlarge")
    fleet.add_argument("--tag", type=_tag, action="append", default=[], metavar="KEY=VALUE")
    fleet.add_argument("--run", metavar="COMMAND", help="start this command on each instance")
    fleet.set_defaults(func=cmd_fleet)

    interrupt = commands.add_parser("interrupt", parents=[common],
                                    help="send a spot interruption notice")
    interrupt.add_argument("instance", type=_instance_id, metavar="INSTANCE")
    interrupt.add_argument("--action", choices=ACTIONS, default="terminate")
    interrupt.add_argument("--in", dest="in_seconds", type=_seconds, default=120.0,
                           metavar="SECONDS", help="time until the action (default 120)")
    interrupt.set_defaults(func=cmd_interrupt)

    rebalance = commands.add_parser("rebalance", parents=[common],
                                    help="send a rebalance recommendation")
    rebalance.add_argument("instance", type=_instance_id, metavar="INSTANCE")
    rebalance.set_defaults(func=cmd_rebalance)

    maintenance = commands.add_parser("maintenance", parents=[common],
                                      help="schedule a maintenance event")
    maintenance.add_argument("instance", type=_instance_id, metavar="INSTANCE")
    maintenance.add_argument("--code", default="system-reboot",
                             choices=("instance-reboot", "system-reboot", "system-maintenance",
                                      "instance-retirement", "instance-stop"))
    maintenance.add_argument("--in", dest="in_seconds", type=_seconds, default=3600.0,
                             metavar="SECONDS", help="until the window opens (default 3600)")
    maintenance.add_argument("--duration", type=_seconds, default=1800.0, metavar="SECONDS")
    maintenance.add_argument("--description", default="scheduled reboot")
    maintenance.set_defaults(func=cmd_maintenance)

    terminate = commands.add_parser("terminate", parents=[common],
                                    help="terminate an instance now (no notice)")
    terminate.add_argument("instance", type=_instance_id, metavar="INSTANCE")
    terminate.set_defaults(func=cmd_terminate)

    fault = commands.add_parser("fault", help="inject faults into metadata or the EC2 API")
    targets = fault.add_subparsers(dest="fault_target", metavar="TARGET", required=True)
    imds = targets.add_parser("imds", parents=[common], help="a fault in one instance's metadata")
    imds.add_argument("instance", type=_instance_id, metavar="INSTANCE")
    imds.add_argument("kind", choices=IMDS_FAULTS, metavar="KIND",
                      help=" | ".join(IMDS_FAULTS))
    imds.add_argument("--for", dest="duration_s", type=_positive_seconds, metavar="SECONDS",
                      help="how long (default: until the cloud stops)")
    imds.add_argument("--delay", type=_seconds, default=3.0, metavar="SECONDS",
                      help="answer delay for 'slow' (default 3)")
    imds.set_defaults(func=cmd_fault_imds)
    ec2 = targets.add_parser("ec2", parents=[common],
                             help="EC2 API faults (no options: clear them)")
    ec2.add_argument("--throttle", type=_rate, default=0.0, metavar="RATE",
                     help="RequestLimitExceeded rate")
    ec2.add_argument("--5xx", dest="server_error", type=_rate, default=0.0, metavar="RATE",
                     help="InternalError/Unavailable rate")
    ec2.add_argument("--performed-then-5xx", type=_action_rate, action="append", default=[],
                     metavar="ACTION=RATE", help="perform, then answer 5xx (repeatable)")
    ec2.add_argument("--seed", type=int, help="random seed, for replayable runs")
    ec2.set_defaults(func=cmd_fault_ec2)


# ---- up / down -------------------------------------------------------------------------
def _timing(name: str):
    from spotrun.localcloud.timing import TimingModel

    return {"fast": TimingModel.fast, "aws": TimingModel.aws_like,
            "instant": TimingModel.instant}[name]()


def _running_elsewhere(root: Path) -> int | None:
    try:
        info = control.read_state(root)
    except SpotrunError:
        return None
    pid = int(info["pid"])
    return pid if pid != os.getpid() and control.pid_alive(pid) else None


def cmd_up(args: argparse.Namespace) -> int:
    root = args.root.resolve()
    pid = _running_elsewhere(root)
    if pid:
        raise SpotrunError(f"a local cloud is already running under {root} (pid {pid}); "
                           f"stop it with: spotrun localcloud down --root {root}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpotrunError(f"--root {root}: cannot create it ({exc.strerror})") from None
    if args.detach:
        return _detach(args, root)
    return _serve(args, root)


def _serve(args: argparse.Namespace, root: Path) -> int:
    from spotrun.localcloud import LocalCloud
    from spotrun.localcloud.agents import InstanceAgents

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    with LocalCloud(root=root, timing=_timing(args.timing), require_imds_token=not args.imdsv1,
                    tags_in_metadata=not args.no_tags_in_metadata) as cloud:
        server = control.ControlServer(cloud, on_down=stop.set, port=args.control_port).start()
        agents = (InstanceAgents(cloud, member_zones=args.member_zones).start()
                  if args.run_agents else None)
        try:
            info = {"pid": os.getpid(), "control": server.endpoint, "control_key": server.key,
                    "ec2_endpoint": cloud.ec2_endpoint, "moto_endpoint": cloud.moto_endpoint,
                    "region": cloud.region, "azs": list(cloud.azs), "root": str(root),
                    "timing": args.timing, "uses_loop_devices": cloud.uses_loop_devices,
                    "run_agents": bool(args.run_agents),
                    "started": datetime.now(timezone.utc).isoformat()}
            path = control.write_state(root, info)
            print(f"local cloud up: EC2 {cloud.ec2_endpoint}, control {server.endpoint}, "
                  f"state {path}", file=sys.stderr, flush=True)
            if not cloud.uses_loop_devices:
                print("note: loop devices unavailable, volumes are directories",
                      file=sys.stderr, flush=True)
            stop.wait()
        finally:
            if agents is not None:
                agents.stop()  # before the cloud ends the instances: none is taken in meanwhile
            server.stop()
            (root / control.STATE_FILE).unlink(missing_ok=True)
    print("local cloud down", file=sys.stderr, flush=True)
    return 0


def _detach(args: argparse.Namespace, root: Path) -> int:
    log_path = root / "localcloud.log"
    argv = [sys.executable, "-m", "spotrun", "localcloud", "up", "--root", str(root),
            "--timing", args.timing, "--control-port", str(args.control_port)]
    argv += ["--imdsv1"] * args.imdsv1 + ["--no-tags-in-metadata"] * args.no_tags_in_metadata
    argv += ["--run-agents"] * args.run_agents + ["--member-zones", args.member_zones]
    (root / control.STATE_FILE).unlink(missing_ok=True)  # a stale one from a dead cloud
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def came_up() -> dict | None:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise SpotrunError(f"the local cloud exited with {proc.returncode}; "
                               f"end of {log_path}:\n{tail}")
        try:
            info = control.read_state(root)
        except SpotrunError:
            return None
        return info if info and info["pid"] == proc.pid else None

    try:  # polling for the child's state file
        info = wait_until(came_up, 120, interval_s=0.1, what="the local cloud to come up")
    except TimeoutError:
        proc.terminate()
        raise SpotrunError(f"the local cloud did not come up within 120 s; see {log_path}") from None
    print(f"local cloud up (pid {proc.pid}): EC2 {info['ec2_endpoint']}, "
          f"control {info['control']}, log {log_path}"
          + (", agents boot on fleet instances" if args.run_agents else ""))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    client = control.ControlClient(args.root)
    pid = int(client.info["pid"])
    client.call("POST", "/down")

    def ended() -> bool:
        _reap(pid)
        return not control.pid_alive(pid)
    wait_until(ended, 60, interval_s=0.1, what=f"the local cloud (pid {pid}) to end",
               error=lambda: SpotrunError(f"the local cloud (pid {pid}) is still running after 60 s"))
    print(f"local cloud under {args.root} stopped")
    return 0


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)  # our own detached child would stay a zombie
    except ChildProcessError:
        pass


# ---- inspection ------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    status = control.ControlClient(args.root).call("GET", "/status")
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(control.render_status(status))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    answer = control.ControlClient(args.root).call("GET", f"/events?since={args.since}")
    for event in answer["events"]:
        print(json.dumps(event, default=str, sort_keys=True))
    return 0


# ---- injection -------------------------------------------------------------------------
def _post(args: argparse.Namespace, path: str, body: dict) -> dict:
    answer = control.ControlClient(args.root).call("POST", path, body)
    return answer


def cmd_launch(args: argparse.Namespace) -> int:
    user_data = None
    if args.user_data:
        try:
            user_data = args.user_data.read_text()
        except OSError as exc:
            raise SpotrunError(f"--user-data {args.user_data}: {exc.strerror}") from None
    answer = _post(args, "/instances", {"az": args.az, "instance_type": args.instance_type,
                                        "tags": dict(args.tag), "user_data": user_data,
                                        "run": args.run})
    print(f"{answer['instance_id']} in {answer['az']}, metadata {answer['imds_endpoint']}"
          + (f", process {answer['pid']}" if answer.get("pid") else ""))
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    answer = _post(args, "/fleets", {"target_capacity": args.capacity,
                                     "az_policy": args.az_policy,
                                     "instance_type": args.instance_type,
                                     "tags": dict(args.tag), "run": args.run})
    print(f"{answer['fleet_request_id']}: {', '.join(answer['instances']) or 'no instances'}")
    return 0


def cmd_interrupt(args: argparse.Namespace) -> int:
    _post(args, f"/instances/{args.instance}/interrupt",
          {"action": args.action, "in_seconds": args.in_seconds})
    print(f"{args.instance}: spot notice '{args.action}' in {args.in_seconds:g} s")
    return 0


def cmd_rebalance(args: argparse.Namespace) -> int:
    _post(args, f"/instances/{args.instance}/rebalance", {})
    print(f"{args.instance}: rebalance recommendation sent")
    return 0


def cmd_maintenance(args: argparse.Namespace) -> int:
    answer = _post(args, f"/instances/{args.instance}/maintenance",
                   {"code": args.code, "in_seconds": args.in_seconds,
                    "duration_s": args.duration, "description": args.description})
    print(f"{args.instance}: {args.code} scheduled as {answer['event_id']}")
    return 0


def cmd_terminate(args: argparse.Namespace) -> int:
    _post(args, f"/instances/{args.instance}/terminate", {})
    print(f"{args.instance}: terminated")
    return 0


def cmd_fault_imds(args: argparse.Namespace) -> int:
    _post(args, f"/instances/{args.instance}/imds-fault",
          {"kind": args.kind, "duration_s": args.duration_s, "delay_s": args.delay})
    span = f"for {args.duration_s:g} s" if args.duration_s else "until the cloud stops"
    print(f"{args.instance}: metadata fault '{args.kind}' {span}")
    return 0


def cmd_fault_ec2(args: argparse.Namespace) -> int:
    performed = dict(args.performed_then_5xx)
    _post(args, "/ec2-faults", {"throttle": args.throttle, "server_error": args.server_error,
                                "performed_then_5xx": performed, "seed": args.seed})
    if not (args.throttle or args.server_error or any(performed.values())):
        print("EC2 API faults cleared")
    else:
        parts = [f"throttle {args.throttle:g}", f"5xx {args.server_error:g}"]
        parts += [f"{action} performed-then-5xx {rate:g}" for action, rate in performed.items()]
        print("EC2 API faults: " + ", ".join(parts))
    return 0

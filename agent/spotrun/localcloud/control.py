"""The running local cloud's control API: a small JSON-over-HTTP server on loopback.

``spotrun localcloud up`` serves it next to the cloud and writes where to find it in
``<root>/localcloud.json`` (mode 0600, with a random key every request must carry, so
other local users cannot inject events). The other ``spotrun localcloud`` commands are
clients of it (:class:`ControlClient`).

    GET  /status                             instances, AZs, volumes, snapshots, fleets
    GET  /events?since=N                     everything injected / notable, in order
    POST /instances                          {"az", "instance_type", "tags", "user_data", "run"}
    POST /instances/<id>/interrupt           {"action", "in_seconds"}
    POST /instances/<id>/rebalance           {}
    POST /instances/<id>/maintenance         {"code", "in_seconds", "duration_s", "description"}
    POST /instances/<id>/maintenance/<event> {"action": "cancel"|"complete"|"reschedule",
                                              "listed", "in_seconds", "duration_s"}
    POST /instances/<id>/terminate           {}
    POST /instances/<id>/imds-fault          {"kind", "duration_s", "delay_s", "path"}
    POST /ec2-faults                         {"throttle", "server_error", "performed_then_5xx", "seed",
                                              "attach_incorrect_state", "not_found_after_create_s",
                                              "dropped_before", "dropped_after"}
    POST /fleets                             {"target_capacity", "az_policy", "instance_type", "tags", "run"}
    POST /down                               stop the cloud
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler

from spotrun.localcloud.httpserver import LocalHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import requests

from spotrun.errors import SpotrunError, UsageError
from spotrun.log import get_logger
from spotrun import tags as tagkeys

STATE_FILE = "localcloud.json"
KEY_HEADER = "X-Spotrun-Control-Key"
MOTO_AMI_SNAPSHOT = "Auto-created snapshot for AMI"
log = get_logger("localcloud.control")


def run_env(instance) -> dict:
    """A ``--run`` process's environment: the instance's (its credentials, the cloud's
    endpoints), plus where its metadata service is, in the variable the AWS SDKs read for it
    (the real one at 169.254.169.254 is not this instance's). The real agent is booted by
    ``up --run-agents`` instead, with its agent.toml (agents.boot_agent)."""
    env = instance.env()
    env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = instance.imds_endpoint
    return env


class BadRequest(Exception):
    status = 400


class NotFound(BadRequest):
    status = 404


class Conflict(BadRequest):
    status = 409


def _number(body: dict, name: str, default: float | None, minimum: float = 0.0) -> float | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise BadRequest(f"{name}: must be a number >= {minimum:g}, got {value!r}")
    return float(value)


class ControlServer:
    """Serves the control API for ``cloud`` until :meth:`stop`; ``on_down`` ends ``up``."""

    def __init__(self, cloud: Any, on_down: Callable[[], None], host: str = "127.0.0.1",
                 port: int = 0):
        self.cloud = cloud
        self.on_down = on_down
        self.key = secrets.token_urlsafe(24)
        handler = type("Handler", (_Handler,), {"control": self})
        self._httpd = LocalHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.endpoint = f"http://{host}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.2}, daemon=True,
                                        name="localcloud-control")

    def start(self) -> "ControlServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # ---- the routes ------------------------------------------------------------------
    def route(self, method: str, path: str, query: dict, body: dict) -> Any:
        cloud = self.cloud
        if method == "GET" and path == "/status":
            return collect_status(cloud)
        if method == "GET" and path == "/events":
            since = int((query.get("since") or ["0"])[0] or 0)
            return {"events": list(cloud.events)[since:], "next": len(cloud.events)}
        if method != "POST":
            raise NotFound(f"no such endpoint: {method} {path}")
        if path == "/down":
            threading.Thread(target=self.on_down, daemon=True).start()
            return {"stopping": True}
        if path == "/ec2-faults":
            return self._ec2_faults(body)
        if path == "/instances":
            return self._launch(body)
        if path == "/fleets":
            return self._fleet(body)
        event = re.fullmatch(r"/instances/(i-[0-9a-f]+)/maintenance/([A-Za-z0-9-]+)", path)
        if event:
            self._running_instance(event.group(1))
            return self._maintenance_event(*event.groups(), body)
        match = re.fullmatch(r"/instances/(i-[0-9a-f]+)/([a-z-]+)", path)
        if not match:
            raise NotFound(f"no such endpoint: POST {path}")
        instance_id, verb = match.groups()
        self._running_instance(instance_id)
        if verb == "interrupt":
            action = body.get("action", "terminate")
            seconds = _number(body, "in_seconds", 120.0)
            cloud.interrupt(instance_id, action=action, in_seconds=seconds)
            return {"instance_id": instance_id, "action": action, "in_seconds": seconds}
        if verb == "rebalance":
            cloud.rebalance(instance_id)
            return {"instance_id": instance_id, "rebalance": True}
        if verb == "maintenance":
            start = datetime.now(timezone.utc) + timedelta(
                seconds=_number(body, "in_seconds", 3600.0))
            end = start + timedelta(seconds=_number(body, "duration_s", 1800.0))
            event_id = cloud.schedule_maintenance(
                instance_id, code=body.get("code", "system-reboot"), not_before=start,
                not_after=end, description=body.get("description"))  # None: the code's own
            return {"instance_id": instance_id, "event_id": event_id}
        if verb == "terminate":
            cloud.terminate(instance_id)
            return {"instance_id": instance_id, "terminated": True}
        if verb == "imds-fault":
            kind = body.get("kind")
            duration = _number(body, "duration_s", None, minimum=0.001)
            delay = _number(body, "delay_s", 3.0)
            aimed = body.get("path")
            if aimed is not None and not isinstance(aimed, str):
                raise BadRequest(f"path: must be a metadata path, got {aimed!r}")
            cloud.imds_fault(instance_id, kind, duration_s=duration, delay_s=delay,
                             **({"path": aimed} if aimed else {}))
            return {"instance_id": instance_id, "kind": kind, "duration_s": duration, "path": aimed}
        raise NotFound(f"no such instance action: {verb}")

    def _maintenance_event(self, instance_id: str, event_id: str, body: dict) -> dict:
        """Cancel, complete or reschedule a scheduled event, as AWS does to it."""
        metadata = self.cloud.instances[instance_id].metadata
        if metadata is None:
            raise Conflict(f"{instance_id} has no metadata service")
        action, listed = body.get("action"), body.get("listed", False)
        if not isinstance(listed, bool):
            raise BadRequest(f"listed: must be true or false, got {listed!r}")
        try:
            if action == "cancel":
                metadata.cancel_maintenance(event_id, listed=listed)
            elif action == "complete":
                metadata.complete_maintenance(event_id, listed=listed)
            elif action == "reschedule":
                start = datetime.now(timezone.utc) + timedelta(seconds=_number(body, "in_seconds", 3600.0))
                metadata.reschedule_maintenance(
                    event_id, start, start + timedelta(seconds=_number(body, "duration_s", 1800.0)))
            else:
                raise BadRequest(f"action: must be cancel, complete or reschedule, got {action!r}")
        except KeyError as exc:
            raise NotFound(str(exc.args[0])) from None
        return {"instance_id": instance_id, "event_id": event_id, "action": action}

    def _running_instance(self, instance_id: str) -> None:
        instance = self.cloud.instances.get(instance_id)
        if instance is None:
            raise NotFound(f"no instance {instance_id} in this local cloud")
        if instance.state != "running":
            raise Conflict(f"{instance_id} is {instance.state}: nothing to inject into")

    def _ec2_faults(self, body: dict) -> dict:
        rates = {name: _number(body, name, 0.0) for name in ("throttle", "server_error")}
        maps = {name: body.get(name) or {}
                for name in ("performed_then_5xx", "dropped_before", "dropped_after")}
        for name, given in maps.items():
            if not isinstance(given, dict):
                raise BadRequest(f"{name}: must map an EC2 action (or \"*\") to a rate")
        seed = body.get("seed")
        extra = {name: _number(body, name, 0.0)
                 for name in ("attach_incorrect_state", "not_found_after_create_s",
                              "attach_incorrect_state_first")}
        try:
            self.cloud.ec2_faults(throttle=rates["throttle"], server_error=rates["server_error"],
                                  seed=seed, **maps, **extra)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return {**rates, **extra, **maps, "seed": seed}

    def _launch(self, body: dict) -> dict:
        cloud = self.cloud
        az = body.get("az") or cloud.azs[0]
        if az not in cloud.azs:
            raise BadRequest(f"az: {az!r} is not one of {', '.join(cloud.azs)}")
        user_data = body.get("user_data")
        instance = cloud.launch_instance(az=az, instance_type=body.get("instance_type", "p3.2xlarge"),
                                         tags=dict(body.get("tags") or {}),
                                         user_data=user_data.encode() if user_data else None)
        pid = None
        if body.get("run"):
            pid = cloud.start_process(instance, shlex.split(body["run"]), env=run_env(instance)).pid
        return {"instance_id": instance.instance_id, "az": instance.az, "pid": pid,
                "imds_endpoint": instance.imds_endpoint}

    def _fleet(self, body: dict) -> dict:
        capacity = body.get("target_capacity", 1)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise BadRequest(f"target_capacity: must be an integer >= 0, got {capacity!r}")
        run = body.get("run")
        boot = ((lambda cloud, inst: cloud.start_process(inst, shlex.split(run), env=run_env(inst)))
                if run else None)
        launch = {"instance_type": body.get("instance_type", "p3.2xlarge"),
                  "tags": dict(body.get("tags") or {})}
        request_id = self.cloud.request_spot_fleet(capacity, launch,
                                                   az_policy=body.get("az_policy", "random"),
                                                   boot=boot)
        return {"fleet_request_id": request_id,
                "instances": self.cloud.fleets[request_id].instance_ids()}


# ---- status ---------------------------------------------------------------------------
def collect_status(cloud: Any) -> dict[str, Any]:
    """Instances, AZs, volumes, snapshots, attachments and fleets, as EC2 (timed) says."""
    ec2 = cloud.client("ec2", faults=False)
    zones = [{"name": z["ZoneName"], "id": z["ZoneId"], "state": z["State"]}
             for z in ec2.describe_availability_zones()["AvailabilityZones"]
             if z["ZoneName"] in cloud.azs]
    instances = []
    for reservation in ec2.describe_instances()["Reservations"]:
        for item in reservation["Instances"]:
            tags = tagkeys.as_dict(item.get("Tags"))
            local = cloud.instances.get(item["InstanceId"])
            metadata = getattr(local, "metadata", None)
            instances.append({
                "instance_id": item["InstanceId"], "state": item["State"]["Name"],
                "instance_type": item["InstanceType"],
                "az": item["Placement"]["AvailabilityZone"], "name": tags.get(tagkeys.NAME, ""),
                "fleet_request_id": tags.get(tagkeys.SPOT_FLEET_REQUEST, ""),
                "processes": [p.pid for p in getattr(local, "processes", []) if p.poll() is None],
                "metadata": metadata.describe() if metadata is not None else None,
                "root": str(local.root) if local is not None else None})
    volumes = []
    for item in ec2.describe_volumes()["Volumes"]:
        tags = tagkeys.as_dict(item.get("Tags"))
        volumes.append({
            "volume_id": item["VolumeId"], "state": item["State"], "az": item["AvailabilityZone"],
            "size_gib": item["Size"], "snapshot_id": item.get("SnapshotId") or "",
            "name": tags.get(tagkeys.NAME, ""), "job": tags.get(tagkeys.JOB, ""),
            "attachments": [{"instance_id": a["InstanceId"], "device": a.get("Device", ""),
                             "state": a["State"]} for a in item.get("Attachments", [])]})
    snapshots = []
    for item in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]:
        if item.get("Description", "").startswith(MOTO_AMI_SNAPSHOT):
            continue  # moto's ~1300 built-in AMIs each own a snapshot: noise here
        tags = tagkeys.as_dict(item.get("Tags"))
        snapshots.append({"snapshot_id": item["SnapshotId"], "state": item["State"],
                          "progress": item.get("Progress", ""), "volume_id": item.get("VolumeId", ""),
                          "job": tags.get(tagkeys.JOB, "")})
    fleets = [{"fleet_request_id": fid, "state": fleet.state, "target_capacity": fleet.target_capacity,
               "az_policy": fleet.policy.spec, "instances": fleet.instance_ids(),
               "launched": len(fleet.members)} for fid, fleet in dict(cloud.fleets).items()]
    return {"region": cloud.region, "root": str(cloud.root), "ec2_endpoint": cloud.ec2_endpoint,
            "uses_loop_devices": cloud.uses_loop_devices, "azs": zones,
            "instances": instances, "volumes": volumes, "snapshots": snapshots,
            "fleets": fleets, "events": len(cloud.events)}


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return f"{title}: none"
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = [f"{title}:"] + ["  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
                             for r in [header] + rows]
    return "\n".join(lines)


def _metadata_summary(metadata: dict | None) -> str:
    if not metadata:
        return "-"
    parts = []
    if metadata.get("notice"):
        parts.append(f"notice {metadata['notice']['action']} at {metadata['notice']['time']}")
    if metadata.get("rebalance"):
        parts.append("rebalance")
    if metadata.get("maintenance"):
        parts.append(f"{len(metadata['maintenance'])} maintenance")
    if metadata.get("faults"):
        parts.append("faults " + ",".join(metadata["faults"]))
    return "; ".join(parts) or "ok"


def render_status(status: dict) -> str:
    """The human-readable ``spotrun localcloud status``."""
    head = (f"local cloud {status['region']}  root {status['root']}\n"
            f"EC2 {status['ec2_endpoint']}  volumes on "
            f"{'loop devices' if status['uses_loop_devices'] else 'directories'}  "
            f"events {status['events']}\n"
            "AZs: " + ", ".join(f"{z['name']} ({z['id']})" for z in status["azs"]))
    instances = [[i["instance_id"], i["state"], i["instance_type"], i["az"],
                  i["fleet_request_id"] or "-", ",".join(map(str, i["processes"])) or "-",
                  _metadata_summary(i["metadata"])] for i in status["instances"]]
    volumes = [[v["volume_id"], v["state"], v["az"], f"{v['size_gib']} GiB",
                ", ".join(f"{a['instance_id']} {a['device']} ({a['state']})"
                          for a in v["attachments"]) or "-",
                v["job"] or v["name"] or "-"] for v in status["volumes"]]
    snapshots = [[s["snapshot_id"], s["state"], s["progress"] or "-", s["volume_id"] or "-",
                  s["job"] or "-"] for s in status["snapshots"]]
    fleets = [[f["fleet_request_id"], f["state"], str(f["target_capacity"]), f["az_policy"],
               ", ".join(f["instances"]) or "-", str(f["launched"])] for f in status["fleets"]]
    return "\n\n".join([
        head,
        _table("instances", ["ID", "STATE", "TYPE", "AZ", "FLEET", "PIDS", "METADATA"], instances),
        _table("volumes", ["ID", "STATE", "AZ", "SIZE", "ATTACHED TO", "JOB/NAME"], volumes),
        _table("snapshots", ["ID", "STATE", "PROGRESS", "VOLUME", "JOB"], snapshots),
        _table("fleets", ["ID", "STATE", "TARGET", "AZ POLICY", "INSTANCES", "LAUNCHED"], fleets),
    ])


class _Handler(BaseHTTPRequestHandler):
    control: ControlServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _answer(self, status: int, payload: Any) -> None:
        body = json.dumps(payload, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self, method: str) -> None:
        if not secrets.compare_digest(self.headers.get(KEY_HEADER, ""), self.control.key):
            self._answer(403, {"error": "missing or wrong control key"})
            return
        url = urlsplit(self.path)
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
            result = self.control.route(method, url.path, parse_qs(url.query), body)
        except json.JSONDecodeError as exc:
            self._refuse(method, url.path, 400, f"the request body is not JSON: {exc}")
        except BadRequest as exc:
            self._refuse(method, url.path, exc.status, str(exc))
        except (ValueError, KeyError, TypeError) as exc:
            self._refuse(method, url.path, 400, str(exc))
        except Exception as exc:  # noqa: BLE001 - the operator sees it; the cloud keeps running
            log.error("control_request_failed", method=method, path=url.path,
                      error=f"{type(exc).__name__}: {exc}")
            self._answer(500, {"error": f"{type(exc).__name__}: {exc}"})
        else:
            if method == "POST":
                log.info("control_request", method=method, path=url.path, body=body)
            self._answer(200, result)

    def _refuse(self, method: str, path: str, status: int, error: str) -> None:
        log.warning("control_request_refused", method=method, path=path, status=status,
                    error=error)
        self._answer(status, {"error": error})

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")


# ---- the state file and the client ---------------------------------------------------
def write_state(root: Path, info: dict) -> Path:
    path = root / STATE_FILE
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(info, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def read_state(root: Path) -> dict:
    path = root / STATE_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpotrunError(f"no local cloud is running under {root} ({path} does not exist); "
                           f"start one with: spotrun localcloud up --root {root}") from None
    except json.JSONDecodeError as exc:
        raise SpotrunError(f"{path}: not valid JSON ({exc})") from None
    for key in ("control", "control_key", "pid"):
        if key not in info:
            raise SpotrunError(f"{path}: missing {key!r}")
    return info


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ControlClient:
    def __init__(self, root: Path, timeout: float = 30.0):
        self.root = root
        self.info = read_state(root)
        self.timeout = timeout
        self._http = requests.Session()
        self._http.trust_env = False  # loopback: never through a proxy from the environment

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        url = self.info["control"] + path
        try:
            answer = self._http.request(method, url, json=body, timeout=self.timeout,
                                        headers={KEY_HEADER: self.info["control_key"]})
        except requests.ConnectionError:
            stale = "" if pid_alive(int(self.info["pid"])) else (
                f" (process {self.info['pid']} is gone: remove {self.root / STATE_FILE})")
            raise SpotrunError(f"the local cloud under {self.root} does not answer at "
                               f"{self.info['control']}{stale}") from None
        try:
            payload = answer.json()
        except ValueError:
            raise SpotrunError(f"the local cloud answered {answer.status_code} without JSON") from None
        if answer.status_code in (400, 404):
            raise UsageError(payload.get("error", answer.text))
        if answer.status_code == 409:
            raise SpotrunError(payload.get("error", answer.text))
        if answer.status_code != 200:
            raise SpotrunError(payload.get("error", answer.text))
        return payload

"""One emulated instance's metadata service (IMDS), following the AWS documentation.

IMDSv2 rules as documented in "Use the Instance Metadata Service to access instance
metadata" (EC2 User Guide): a session token from ``PUT /latest/api/token`` with
``X-aws-ec2-metadata-token-ttl-seconds`` between 1 and 21600 (else 400), a PUT carrying
``X-Forwarded-For`` is refused (403), GETs carry ``X-aws-ec2-metadata-token`` and get 401
when it is missing (tokens required), expired or not issued by this instance; GET answers
repeat the token's remaining TTL in ``X-aws-ec2-metadata-token-ttl-seconds``. In IMDSv1
("optional") mode a GET without a token is served, but a token that is sent is still
checked. Everything is ``text/plain``, JSON documents included, as on EC2.

What AWS has and this does not: the PUT hop limit (loopback has no hops), IAM credentials,
network interfaces, block-device-mapping; only the paths the agent and users need.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
import secrets
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from spotrun.localcloud.httpserver import LocalHTTPServer
from spotrun.localcloud.imdsevents import (EVENT_CODES, ScheduledEvents,  # noqa: F401
                                           maintenance_time)
# The wire protocol lives in imdshttp; its names are part of this module's interface.
from spotrun.localcloud.imdshttp import (MAX_TTL, MIN_TTL, TOKEN_HEADER, TTL_HEADER,  # noqa: F401
                                         VERSIONED, MetadataHandler)
from spotrun.log import get_logger

ACTIONS = ("terminate", "stop", "hibernate")
FAULT_KINDS = ("5xx", "slow", "refused", "401", "malformed")
# Faults that can be aimed at one path (the others answer normally).
PATH_FAULT_KINDS = ("5xx", "slow")
# Characters AWS allows in tag keys exposed in metadata (no spaces, no "/").
_TAG_KEY_OK = re.compile(r"^[A-Za-z0-9+\-=._:@]+$")

_log = get_logger("localcloud.imds")


@dataclasses.dataclass
class InstanceMetadata:
    """What one instance's metadata says about it; must match the instance in moto."""

    instance_id: str
    instance_type: str
    availability_zone: str
    availability_zone_id: str
    region: str
    account_id: str
    ami_id: str
    private_ip: str
    tags: dict[str, str]
    user_data: bytes | None
    tags_in_metadata: bool = True
    architecture: str = "x86_64"
    pending_time: datetime = dataclasses.field(
        default_factory=lambda: datetime.now(timezone.utc).replace(microsecond=0))

    def identity_document(self) -> dict[str, Any]:
        # Keys and nulls as in the EC2 User Guide's "Instance identity documents" example.
        return {
            "accountId": self.account_id,
            "architecture": self.architecture,
            "availabilityZone": self.availability_zone,
            "billingProducts": None,
            "devpayProductCodes": None,
            "marketplaceProductCodes": None,
            "imageId": self.ami_id,
            "instanceId": self.instance_id,
            "instanceType": self.instance_type,
            "kernelId": None,
            "pendingTime": iso_z(self.pending_time),
            "privateIp": self.private_ip,
            "ramdiskId": None,
            "region": self.region,
            "version": "2017-09-30",
        }


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def iso_z(when: datetime) -> str:
    """AWS's spot/rebalance time format: ``2026-11-27T08:22:00Z``."""
    return _utc(when).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Json(str):
    """A leaf served as JSON (the ``malformed`` fault truncates these)."""


class MetadataServer:
    """An HTTP metadata service for one instance, with notices and faults injectable.

    ``clock`` (monotonic seconds) decides token expiry; tests may inject their own.
    Fault durations run on real time because the listener must come back by itself.
    """

    def __init__(self, md: InstanceMetadata, host: str = "127.0.0.1", port: int = 0,
                 require_token: bool = True, clock: Callable[[], float] = time.monotonic,
                 on_event: Callable[[dict[str, Any]], None] | None = None):
        self.md = md
        self.on_event = on_event  # e.g. LocalCloud.record_event: one timeline for everything
        self.host = host
        self.port = port
        self.require_token = require_token
        self._clock = clock
        self._lock = threading.RLock()
        self._tokens: dict[str, float] = {}  # token -> expiry on self._clock
        self._notice: tuple[str, datetime] | None = None
        self._rebalance: datetime | None = None
        self.maintenance = ScheduledEvents()
        # kind, or "kind@path" for a fault aimed at one path -> (until, delay_s)
        self._faults: dict[str, tuple[float | None, float]] = {}
        # The service may grant a shorter token TTL than asked for (None: as asked);
        # without a token endpoint (False) it is an IMDSv1-only service: PUT is 404.
        self.token_ttl_cap: int | None = None
        self.token_endpoint = True
        self.gets: collections.Counter[str] = collections.Counter()  # path -> GETs answered
        self.token_puts = 0
        self._served_once: set[str] = set()
        self._httpd: LocalHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timers: list[threading.Timer] = []
        self._stopping = threading.Event()
        self.events: list[dict[str, Any]] = []
        self.requests = 0

    # ---- lifecycle -------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "MetadataServer":
        self._stopping.clear()
        self._listen()
        # (not "require_token": the logger redacts any key that mentions tokens)
        self._record("imds_started", endpoint=self.endpoint,
                     imdsv1_allowed=not self.require_token)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        self._unlisten()

    def __enter__(self) -> "MetadataServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _listen(self) -> None:
        handler = type("Handler", (MetadataHandler,), {"imds": self})
        deadline = time.monotonic() + 5.0
        while True:
            try:
                httpd = LocalHTTPServer((self.host, self.port), handler)
                break
            except OSError:
                # Re-listening on the same port after a "refused" fault: the old socket may
                # linger a moment; anything else is a real error.
                if self.port == 0 or time.monotonic() > deadline:
                    raise
                self._stopping.wait(0.05)
        httpd.daemon_threads = True
        self.port = httpd.server_address[1]
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                  name=f"imds-{self.md.instance_id}", daemon=True)
        with self._lock:
            self._httpd, self._thread = httpd, thread
        thread.start()

    def _unlisten(self) -> None:
        with self._lock:
            httpd, thread, self._httpd, self._thread = self._httpd, self._thread, None, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def listening(self) -> bool:
        return self._httpd is not None

    # ---- injection -------------------------------------------------------------------
    def notice(self, action: str = "terminate", time: datetime | None = None) -> None:
        """A spot interruption notice: ``spot/instance-action`` (and ``termination-time``)."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
        when = _utc(time or datetime.now(timezone.utc)).replace(microsecond=0)
        with self._lock:
            self._notice = (action, when)
            self._served_once.discard("spot")
        self._record("spot_notice", action=action, time=iso_z(when))

    def rebalance(self, notice_time: datetime | None = None) -> None:
        when = _utc(notice_time or datetime.now(timezone.utc)).replace(microsecond=0)
        with self._lock:
            self._rebalance = when
            self._served_once.discard("rebalance")
        self._record("rebalance_recommendation", notice_time=iso_z(when))

    def schedule_maintenance(self, code: str = "system-reboot", not_before: datetime | None = None,
                             not_after: datetime | None = None,
                             description: str | None = None,
                             event_id: str | None = None) -> str:
        entry = self.maintenance.add(code, not_before, not_after, description, event_id)
        self._maintenance_changed("maintenance_scheduled", entry)
        return entry["EventId"]

    def reschedule_maintenance(self, event_id: str, not_before: datetime,
                               not_after: datetime | None = None) -> None:
        """The same event (same EventId) at a new time, as AWS reschedules it."""
        self._maintenance_changed("maintenance_rescheduled",
                                  self.maintenance.reschedule(event_id, not_before, not_after))

    def cancel_maintenance(self, event_id: str, listed: bool = False) -> None:
        """Canceled: into the history, ``[Canceled]``; ``listed``: also still in the scheduled list."""
        self._maintenance_changed("maintenance_canceled",
                                  self.maintenance.end(event_id, "canceled", listed))

    def complete_maintenance(self, event_id: str, listed: bool = False) -> None:
        self._maintenance_changed("maintenance_completed",
                                  self.maintenance.end(event_id, "completed", listed))

    def _maintenance_changed(self, event: str, entry: dict[str, str]) -> None:
        with self._lock:
            self._served_once.discard("maintenance")
        self._record(event, code=entry["Code"], event_id=entry["EventId"], state=entry["State"],
                     not_before=entry["NotBefore"], not_after=entry["NotAfter"])

    def clear_notices(self) -> None:
        with self._lock:
            self._notice = None
            self._rebalance = None
        self.maintenance.cancel_all()
        self._record("notices_cleared")

    def fault(self, kind: str, duration_s: float | None = None, delay_s: float = 3.0,
              path: str | None = None) -> None:
        """Inject a fault for ``duration_s`` seconds (``None``: until :meth:`clear_faults`);
        ``path`` (e.g. ``meta-data/events/maintenance/scheduled``): only GETs of that path."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {', '.join(FAULT_KINDS)}, not {kind!r}")
        if duration_s is not None and duration_s <= 0:
            raise ValueError("duration_s must be positive")
        if path is not None:
            if kind not in PATH_FAULT_KINDS:
                raise ValueError(f"only {', '.join(PATH_FAULT_KINDS)} faults can be aimed at a path")
            path = path.strip("/").removeprefix("latest/")
            if not path:
                raise ValueError("path must name a metadata path")
        key = kind if path is None else f"{kind}@{path}"
        until = None if duration_s is None else time.monotonic() + duration_s
        with self._lock:
            self._faults[key] = (until, delay_s)
        self._record("imds_fault_started", kind=kind, duration_s=duration_s,
                     **({"delay_s": delay_s} if kind == "slow" else {}),
                     **({"path": path} if path else {}))
        if key == "refused":
            self._unlisten()
        if duration_s is not None:
            timer = threading.Timer(duration_s, self._end_fault, args=(key, until))
            timer.daemon = True
            with self._lock:
                self._timers.append(timer)
            timer.start()

    def clear_faults(self) -> None:
        with self._lock:
            kinds = list(self._faults)
        for kind in kinds:
            self._end_fault(kind, None, force=True)

    def _end_fault(self, kind: str, until: float | None, force: bool = False) -> None:
        with self._lock:
            current = self._faults.get(kind)
            # A newer injection of the same kind replaced this one: leave it running.
            if current is None or (not force and current[0] != until):
                return
            del self._faults[kind]
        if kind == "refused" and not self._stopping.is_set():
            self._listen()
        self._record("imds_fault_ended", kind=kind)

    def describe(self) -> dict[str, Any]:
        """What is injected right now, for the local cloud's status."""
        with self._lock:
            notice, rebalance = self._notice, self._rebalance
            return {"endpoint": self.endpoint, "listening": self.listening,
                    "faults": sorted(self._faults),
                    "notice": {"action": notice[0], "time": iso_z(notice[1])} if notice else None,
                    "rebalance": iso_z(rebalance) if rebalance else None,
                    "maintenance": self.maintenance.active_ids()}

    def active_faults(self) -> list[str]:
        with self._lock:
            return sorted(self._faults)

    def _fault(self, kind: str) -> tuple[float | None, float] | None:
        with self._lock:
            return self._faults.get(kind)

    def _path_fault(self, kind: str, request_path: str) -> tuple[float | None, float] | None:
        """The fault of ``kind`` aimed at this request's path (``/latest/<path>``), if any."""
        match = VERSIONED.match(request_path)
        path = (match.group(2) or "").strip("/") if match else ""
        with self._lock:
            return self._faults.get(f"{kind}@{path}") if path else None

    def _record(self, event: str, **fields: Any) -> None:
        entry = {"at": datetime.now(timezone.utc).isoformat(), "event": event,
                 "instance_id": self.md.instance_id, **fields}
        with self._lock:
            self.events.append(entry)
        _log.info(event, **{k: v for k, v in entry.items() if k not in ("at", "event")})
        if self.on_event is not None:
            self.on_event(dict(entry))

    # ---- tokens ----------------------------------------------------------------------
    def issue_token(self, ttl: int) -> str:
        now = self._clock()
        token = "AQAEA" + secrets.token_urlsafe(40)
        with self._lock:
            self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
            self._tokens[token] = now + ttl
        return token

    def token_ttl_left(self, token: str) -> int | None:
        """Seconds left on ``token`` if this instance issued it and it has not expired."""
        with self._lock:
            expiry = self._tokens.get(token)
        left = None if expiry is None else expiry - self._clock()
        return None if left is None or left <= 0 else max(1, math.ceil(left))

    # ---- the metadata tree -----------------------------------------------------------
    def _tree(self) -> dict[str, Any]:
        md = self.md
        with self._lock:
            notice, rebalance = self._notice, self._rebalance
        scheduled, history = self.maintenance.lists()
        meta: dict[str, Any] = {
            "ami-id": md.ami_id,
            "hostname": _hostname(md),
            "instance-id": md.instance_id,
            "instance-type": md.instance_type,
            "local-hostname": _hostname(md),
            "local-ipv4": md.private_ip,
            "placement": {"availability-zone": md.availability_zone,
                          "availability-zone-id": md.availability_zone_id,
                          "region": md.region},
            "events": {
                "maintenance": {"scheduled": _Json(json.dumps(scheduled, indent=2)),
                                "history": _Json(json.dumps(history, indent=2))},
                "recommendations": ({"rebalance": _Json(json.dumps(
                    {"noticeTime": iso_z(rebalance)}))} if rebalance else {}),
            },
        }
        if notice:
            action, when = notice
            meta["spot"] = {"instance-action": _Json(json.dumps({"action": action,
                                                                 "time": iso_z(when)}))}
            if action == "terminate":
                meta["spot"]["termination-time"] = iso_z(when)
        if md.tags_in_metadata:
            meta["tags"] = {"instance": {k: v for k, v in md.tags.items() if _TAG_KEY_OK.match(k)}}
        doc = json.dumps(md.identity_document(), indent=2, separators=(",", " : "))
        tree: dict[str, Any] = {"dynamic": {"instance-identity": {"document": _Json(doc)}},
                                "meta-data": meta}
        if md.user_data is not None:
            tree["user-data"] = md.user_data
        return tree

    def resolve(self, path: str) -> tuple[int, bytes | str]:
        """(status, body) for a GET of ``path``, ignoring tokens and faults."""
        if path in ("", "/"):
            return 200, "latest"
        match = VERSIONED.match(path)
        if not match:
            return 404, ""
        node: Any = self._tree()
        for part in [p for p in (match.group(2) or "").split("/") if p]:
            if not isinstance(node, dict) or part not in node:
                return 404, ""
            node = node[part]
        if isinstance(node, dict):
            return 200, "\n".join(k + "/" if isinstance(v, dict) else k
                                  for k, v in sorted(node.items()))
        if path.rstrip("/").endswith(("spot/instance-action", "spot/termination-time")):
            self._first_served("spot", path)
        elif path.endswith("recommendations/rebalance"):
            self._first_served("rebalance", path)
        elif path.rstrip("/").endswith("maintenance/scheduled") and node != "[]":
            self._first_served("maintenance", path)
        if isinstance(node, _Json) and self._fault("malformed"):
            return 200, node[: max(1, len(node) // 2)]
        return 200, node

    def _first_served(self, what: str, path: str) -> None:
        with self._lock:
            if what in self._served_once:
                return
            self._served_once.add(what)
        self._record("notice_served", what=what, path=path)


def _hostname(md: InstanceMetadata) -> str:
    suffix = "ec2.internal" if md.region == "us-east-1" else f"{md.region}.compute.internal"
    return f"ip-{md.private_ip.replace('.', '-')}.{suffix}"

"""LocalCloud: moto + the EC2 proxy + the EBS data plane + instances, started and stopped
together. The API is fixed in docs/internals.md ("The local spot cloud")."""
from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import boto3
from botocore.config import Config

from spotrun.localcloud import ebs
from spotrun.localcloud.compute import ComputeMixin
from spotrun.localcloud.ebs import EbsDataPlane
from spotrun.localcloud.faults import FaultInjector, FaultPlan
from spotrun.localcloud.instance import DUMMY_CREDENTIALS, Instance
from spotrun.localcloud.ledger import Ledger, read_ledger
from spotrun.localcloud.motoserver import (ACCOUNT_HEADER, DEFAULT_ACCOUNT_ID, MotoServer,
                                           claim_account_id, release_account_id, reset_account)
from spotrun.localcloud.overlay import Ec2Overlay
from spotrun.localcloud.proxy import Ec2Proxy, MotoUpstream
from spotrun.localcloud.timing import TimingModel
from spotrun.log import get_logger

log = get_logger("localcloud")
DEFAULT_AZS = ("us-east-1a", "us-east-1b", "us-east-1c")
_WARNING_EVENTS = ("ec2_fault_injected", "volume_attach_stuck", "loop_devices_unavailable")


class LocalCloud(ComputeMixin):
    def __init__(self, root: str | Path, timing: TimingModel | None = None, *,
                 region: str = "us-east-1", azs: tuple[str, ...] | None = None,
                 use_loop_devices: bool | None = None, require_imds_token: bool = True,
                 tags_in_metadata: bool = True):
        self.root = Path(root).absolute()
        self.timing = timing or TimingModel.fast()
        self.region = region
        default_azs = DEFAULT_AZS if region == "us-east-1" else tuple(f"{region}{s}" for s in "abc")
        self.azs = list(azs or default_azs)
        self.require_imds_token = require_imds_token
        self.tags_in_metadata = tags_in_metadata
        self.account_id = ""
        self.ec2_endpoint = self.moto_endpoint = self.checker_endpoint = ""
        self.instances: dict[str, Instance] = {}
        self.fleets: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self._use_loop_devices = use_loop_devices
        self._events_changed = threading.Condition()
        self._faults = FaultInjector()
        self._timers: list[threading.Timer] = []
        self._terminated_listeners: list[Callable[[Instance], None]] = []
        self._az_ids: dict[str, str] = {}
        self._ami_id = ""
        self._moto: MotoServer | None = None
        self._proxies: list[Ec2Proxy] = []
        # The call ledger (ledger.py) lives in the cloud's own directory, never an instance's.
        self.ledger_path = self.root / "ledger.jsonl"
        self._ledger: Ledger | None = None
        self._caller_instances: dict[str, str] = {}
        self._overlay: Ec2Overlay | None = None
        self.dataplane: EbsDataPlane | None = None
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> "LocalCloud":
        if self._started:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        self.instances, self.fleets = {}, {}  # a restarted cloud starts empty, as moto does
        try:
            self.dataplane = EbsDataPlane(self.root, self._use_loop_devices)
            self.dataplane.release_all()  # what a crashed run on this root left behind
            self.account_id = claim_account_id()
            reset_account(self.account_id)
            self._moto = MotoServer()
            self.moto_endpoint = self._moto.start()
            upstream = MotoUpstream(self.moto_endpoint, self.account_id, self.region)
            self._overlay = Ec2Overlay(self.dataplane, self.timing, upstream.ec2,
                                       self._device_dir_for, self.record_event,
                                       before_power_off=self._before_power_off,
                                       after_power_on=self._after_power_on,
                                       tags_changed=self._instance_tags_changed)
            self._overlay.start()
            self._open_ledger()
            fault_proxy = Ec2Proxy(upstream, self._overlay, self._faults, self.record_event,
                                   ledger=self._ledger)
            checker_proxy = Ec2Proxy(upstream, self._overlay, None, self.record_event,
                                     ledger=self._ledger)
            self._proxies = [fault_proxy, checker_proxy]
            self.ec2_endpoint, self.checker_endpoint = fault_proxy.start(), checker_proxy.start()
            self._started = True
            self._learn_region()
        except BaseException:
            self.stop()
            raise
        self.record_event("localcloud_started", ec2_endpoint=self.ec2_endpoint,
                          moto_endpoint=self.moto_endpoint, root=str(self.root),
                          uses_loop_devices=self.uses_loop_devices, account_id=self.account_id)
        if not self.uses_loop_devices:
            self.record_event("loop_devices_unavailable", reason=self.dataplane.no_loop_reason,
                              consequence="volumes are directories; nothing to mount")
        return self

    def stop(self) -> None:
        """Stop everything this cloud started; safe to call twice and after a failed start."""
        for timer in self._timers:
            timer.cancel()
        for fleet in list(self.fleets.values()):
            _quietly(fleet.stop)
        for inst in list(self.instances.values()):
            _quietly(lambda: self._power_off(inst, "terminated"))
        if self._overlay is not None:
            _quietly(self._overlay.stop)
        _quietly(lambda: ebs.lazy_unmount_under(self.root))
        if self.dataplane is not None:
            _quietly(self.dataplane.release_all)
        for proxy in self._proxies:
            _quietly(proxy.stop)
        if self._moto is not None:
            _quietly(self._moto.stop)
        if self._ledger is not None:
            _quietly(self._ledger.close)
        if self.account_id:
            release_account_id(self.account_id)
        was_started, self._started = self._started, False
        self._proxies, self._moto, self._overlay = [], None, None
        if was_started:
            self.record_event("localcloud_stopped")

    def _open_ledger(self) -> None:
        if self._ledger is None:
            if self.ledger_path.exists():  # another cloud's, on this root: kept, not mixed in
                self.ledger_path.rename(self.ledger_path.with_name(
                    f"ledger-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9}.jsonl"))
            self._ledger = Ledger(self.ledger_path, self._instance_of_key)
        self._ledger.open()  # a restarted cloud goes on appending to its own ledger

    def _instance_of_key(self, access_key_id: str) -> str | None:
        if access_key_id == DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"]:
            return None  # the operator's, the tests' and the cloud's own calls
        found = self._caller_instances.get(access_key_id)
        if found is None:
            self._caller_instances.update(
                {inst.access_key_id: inst.instance_id for inst in list(self.instances.values())})
            found = self._caller_instances.get(access_key_id)
        return found

    def ledger(self) -> list[dict[str, Any]]:
        """Every AWS request that reached the cloud's proxies, in order (ledger.py)."""
        return read_ledger(self.ledger_path)

    def __enter__(self) -> "LocalCloud":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def uses_loop_devices(self) -> bool:
        return bool(self.dataplane and self.dataplane.uses_loop_devices)

    # -- clients and events ------------------------------------------------------------------
    def client(self, service: str = "ec2", *, faults: bool = True,
               max_attempts: int | None = None, **kwargs: Any):
        """A boto3 client on the local cloud with dummy credentials.

        ``faults=False`` uses a second proxy that never injects faults (same timed state);
        ``max_attempts=1`` turns botocore's retries off to see injected errors as they are.
        """
        if not self._started:
            raise RuntimeError("LocalCloud is not started")
        if max_attempts is not None:
            kwargs["config"] = Config(retries={"total_max_attempts": max_attempts,
                                               "mode": "standard"})
        return boto3.client(service, region_name=self.region,
                            endpoint_url=self.ec2_endpoint if faults else self.checker_endpoint,
                            aws_access_key_id=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                            **kwargs)

    def moto_client(self, service: str = "ec2"):
        """boto3 straight on moto: the underlying, untimed state (for checkers)."""
        client = boto3.client(service, region_name=self.region, endpoint_url=self.moto_endpoint,
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        if self.account_id != DEFAULT_ACCOUNT_ID:
            account = self.account_id

            def add_account(request: Any, **_: Any) -> None:
                request.headers[ACCOUNT_HEADER] = account
            client.meta.events.register(f"before-sign.{service}.*", add_account)
        return client

    def record_event(self, event: str | Mapping[str, Any], **fields: Any) -> dict[str, Any]:
        """Append to ``events`` (and log). Other modules pass a ready dict with ``event``."""
        if isinstance(event, Mapping):
            entry = dict(event)
            entry.setdefault("at", datetime.now(timezone.utc).isoformat())
        else:
            entry = {"at": datetime.now(timezone.utc).isoformat(), "event": event, **fields}
            level = "warning" if event.startswith(_WARNING_EVENTS) else "info"
            getattr(log, level)(event, **fields)
        with self._events_changed:
            self.events.append(entry)
            self._events_changed.notify_all()
        return entry

    def wait_for_event(self, predicate: Callable[[dict], bool] | str, timeout: float = 10.0,
                       since: int = 0) -> dict[str, Any]:
        """The first event (from index ``since``) matching ``predicate`` (or with that name)."""
        test = (lambda e: e.get("event") == predicate) if isinstance(predicate, str) else predicate
        deadline = time.monotonic() + timeout
        with self._events_changed:
            while True:
                for entry in self.events[since:]:
                    if test(entry):
                        return entry
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no event matching {predicate!r} within {timeout}s")
                self._events_changed.wait(left)

    def on_instance_terminated(self, callback: Callable[[Instance], None]) -> None:
        self._terminated_listeners.append(callback)

    # -- faults -------------------------------------------------------------------------------
    def ec2_faults(self, throttle: float = 0.0, server_error: float = 0.0,
                   performed_then_5xx: Mapping[str, float] | None = None,
                   seed: int | None = None, actions: tuple[str, ...] = (),
                   attach_incorrect_state: float = 0.0,
                   not_found_after_create_s: float = 0.0,
                   dropped_before: Mapping[str, float] | None = None,
                   dropped_after: Mapping[str, float] | None = None,
                   attach_incorrect_state_first: int = 0) -> FaultPlan:
        """Set the EC2 fault plan (replaces the previous one; all zero = no faults)."""
        plan = FaultPlan(throttle, server_error, dict(performed_then_5xx or {}), actions, seed,
                         attach_incorrect_state, not_found_after_create_s,
                         dict(dropped_before or {}), dict(dropped_after or {}),
                         attach_incorrect_state_first)
        self._faults.configure(plan)
        self.record_event("ec2_faults_configured", throttle=plan.throttle,
                          server_error=plan.server_error,
                          performed_then_5xx=dict(plan.performed_then_5xx),
                          actions=list(plan.actions), seed=seed,
                          attach_incorrect_state=plan.attach_incorrect_state,
                          not_found_after_create_s=plan.not_found_after_create_s,
                          dropped_before=dict(plan.dropped_before),
                          dropped_after=dict(plan.dropped_after),
                          attach_incorrect_state_first=plan.attach_incorrect_state_first)
        return plan

    def instance_not_found(self, instance_id: str, *, lookups: int | None = None,
                           seconds: float | None = None, callers: set[str] | None = None) -> None:
        """EC2's eventual consistency for an instance (visibility.py): DescribeInstances naming
        ``instance_id`` answers InvalidInstanceID.NotFound the next ``lookups`` times and/or
        for ``seconds``, to ``callers`` (access key ids, e.g. ``inst.access_key_id``; None:
        every caller of the faulted endpoint). The checker's endpoint always sees it."""
        if not self._started:
            raise RuntimeError("LocalCloud is not started")
        self._proxies[0].visibility.hide_instance(instance_id, lookups=lookups, seconds=seconds,
                                                  callers=callers)
        self.record_event("instance_not_found_configured", instance_id=instance_id,
                          lookups=lookups, seconds=seconds,
                          callers=sorted(callers) if callers is not None else None)


def _quietly(action: Callable[[], Any]) -> None:
    try:
        action()
    except Exception:  # noqa: BLE001 - shutdown goes on; the failure is logged
        log.exception("localcloud_stop_step_failed")

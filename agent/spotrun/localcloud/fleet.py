"""Spot Fleet emulation on top of the local cloud.

The request itself lives in moto (RequestSpotFleet), so DescribeSpotFleetRequests and
CancelSpotFleetRequests work for the agent exactly as on EC2. The instances are the local
cloud's own (``cloud.launch_instance``: a metadata identity, a device directory, a process
tree), tagged ``aws:ec2spot:fleet-request-id`` as EC2 tags fleet instances. A loop in a
thread keeps the fleet at its target capacity in ``maintain`` mode, launching a
replacement in the AZ its policy picks after a termination, and terminates every instance
once the request is cancelled with TerminateInstances, whoever cancelled it.

Where moto differs from EC2 this module patches moto's in-process backend, each time
saying why:
  * moto launches its own instances for a request's capacity; here the request is made with
    capacity 0 and the real target written back, so only local-cloud instances exist.
  * moto's cancel-with-terminate ends moto's own instances (and fails when it has none);
    here it wakes this fleet's loop, which terminates the fleet's local-cloud instances.
  * moto forgets a request cancelled with termination; EC2 keeps showing it as
    ``cancelled`` (for 48 hours), so it is put back in that state.
  * ModifySpotFleetRequest through the API (a sweep's instance leaving: spotrun.fleet.leave)
    changes moto's request only; the loop keeps moto's target, read after it has noticed the
    instances gone, so an instance terminated right after the decrement is never replaced.
    moto would launch its own instances for a raised target: it wakes this loop instead, which
    launches the cloud's; a lowered target with the "default" policy terminates the excess, as
    EC2 does, "noTermination" leaves it running.
DescribeSpotFleetInstances stays empty (moto lists only its own spot requests): a known gap.
"""
from __future__ import annotations

import subprocess
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import boto3
from botocore.config import Config

from spotrun import tags as tagkeys
from spotrun.localcloud.fleetspec import AzPolicy, FleetMember, LaunchSpec  # noqa: F401 - re-exported
from spotrun.log import get_logger

FLEET_TYPES = ("maintain", "request")
GONE_STATES = ("shutting-down", "terminated")
DEFAULT_ACCOUNT_ID = "123456789012"
DEFAULT_IAM_FLEET_ROLE = "arn:aws:iam::{account}:role/aws-ec2-spot-fleet-tagging-role"

log = get_logger("localcloud.fleet")

Boot = Callable[[Any, Any], "subprocess.Popen | None"]


def moto_ec2_client(cloud: Any):
    """EC2 on moto directly: the fleet is AWS's side, so the client's fault proxy is bypassed."""
    if hasattr(cloud, "moto_client"):
        return cloud.moto_client("ec2")
    return boto3.client("ec2", endpoint_url=cloud.moto_endpoint, region_name=cloud.region,
                        aws_access_key_id="testing", aws_secret_access_key="testing",
                        config=Config(retries={"max_attempts": 3, "mode": "standard"}))


def _account_id(cloud: Any) -> str:
    return getattr(cloud, "account_id", None) or DEFAULT_ACCOUNT_ID


class SpotFleet:
    """One Spot Fleet request and the loop that keeps it at capacity.

    ``boot(cloud, instance)`` starts the instance's process tree (the agent) and may return
    its Popen; the fleet reaps it and kills what is left of it once the instance is gone.
    """

    def __init__(self, cloud: Any, target_capacity: int = 1,
                 launch: LaunchSpec | Mapping[str, Any] | None = None,
                 az_policy: str = "random", boot: Boot | None = None,
                 fleet_type: str = "maintain", seed: int | None = None,
                 poll_s: float = 0.5, replacement_delay_s: float = 0.0):
        if not isinstance(target_capacity, int) or target_capacity < 0:
            raise ValueError(f"target_capacity must be an integer >= 0, got {target_capacity!r}")
        if fleet_type not in FLEET_TYPES:
            raise ValueError(f"fleet_type must be one of {', '.join(FLEET_TYPES)}, not {fleet_type!r}")
        self.cloud = cloud
        self.target_capacity = target_capacity
        self.launch = LaunchSpec.of(launch)
        self.policy = AzPolicy(az_policy, list(cloud.azs), seed)
        self.boot = boot
        self.fleet_type = fleet_type
        self.poll_s = poll_s
        self.replacement_delay_s = replacement_delay_s
        self.request_id = ""
        self.state = "new"  # new | active | cancelled_running | cancelled | stopped
        self.members: list[FleetMember] = []  # every instance ever launched, in order
        self.events: list[dict[str, Any]] = []
        self._ec2 = moto_ec2_client(cloud)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_launch_at = 0.0
        self._passes_started = self._passes_done = 0  # reconcile passes, run one at a time
        listen = getattr(cloud, "on_instance_terminated", None)
        if callable(listen):
            # Woken by the termination itself; the poll only catches what bypasses the cloud
            # (a TerminateInstances call from the agent straight to the EC2 API).
            listen(lambda _instance: self.poke())

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> str:
        image_id = (self.launch.image_id or getattr(self.cloud, "ami_id", None)
                    or getattr(self.cloud, "_ami_id", None) or "ami-12c6146b")
        spec: dict[str, Any] = {"ImageId": image_id, "InstanceType": self.launch.instance_type}
        answer = self._ec2.request_spot_fleet(SpotFleetRequestConfig={
            "IamFleetRole": DEFAULT_IAM_FLEET_ROLE.format(account=_account_id(self.cloud)),
            "AllocationStrategy": "lowestPrice",
            "TargetCapacity": 0,  # see the module docstring: moto would launch its own
            "Type": self.fleet_type,
            "LaunchSpecifications": [spec],
        })
        self.request_id = answer["SpotFleetRequestId"]
        self._patch_moto(target_capacity=self.target_capacity)
        self.state = "active"
        self._record("fleet_requested", target_capacity=self.target_capacity,
                     az_policy=self.policy.spec, fleet_type=self.fleet_type)
        self._reconcile()  # the first instances are launched before start() returns
        self._thread = threading.Thread(target=self._loop, name=f"fleet-{self.request_id}",
                                        daemon=True)
        self._thread.start()
        return self.request_id

    def stop(self, terminate: bool = False) -> None:
        """Stop the loop (the local cloud's shutdown); ``terminate`` also ends the instances."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        if terminate:
            for member in self.live_members():
                self._terminate_member(member, reason="fleet_stopped")
        with self._lock:
            if self.state in ("active", "cancelled_running"):
                self.state = "stopped"
            self._changed.notify_all()

    def cancel(self, terminate_instances: bool = True) -> None:
        """CancelSpotFleetRequests through the EC2 API, as the agent does; the loop reacts."""
        self._ec2.cancel_spot_fleet_requests(SpotFleetRequestIds=[self.request_id],
                                             TerminateInstances=terminate_instances)
        self.poke()

    def modify_target_capacity(self, target_capacity: int) -> None:
        """ModifySpotFleetRequest: a larger target launches at once; a smaller one leaves the
        excess running for the caller to end (ExcessCapacityTerminationPolicy=noTermination)."""
        if not isinstance(target_capacity, int) or target_capacity < 0:
            raise ValueError(f"target_capacity must be an integer >= 0, got {target_capacity!r}")
        # moto first: the loop adopts moto's target on every pass (see _adopt_moto_target),
        # so a pass in between must not read the old one back.
        self._patch_moto(target_capacity=target_capacity)
        with self._lock:
            self.target_capacity = target_capacity
        self._record("fleet_target_modified", target_capacity=target_capacity)
        self.poke()

    def poke(self) -> None:
        """Reconcile now instead of at the next poll (e.g. right after a termination)."""
        self._wake.set()

    def settle(self, timeout: float = 30.0) -> bool:
        """Reconcile now and block until a whole pass that began after this call is over:
        what the fleet did not do by then, it was not going to do for the state at the call."""
        with self._lock:
            after = self._passes_started
        self.poke()
        return self.wait_for(lambda f: f._passes_done > after, timeout)

    # ---- queries ---------------------------------------------------------------------
    def live_members(self) -> list[FleetMember]:
        with self._lock:
            return [m for m in self.members if m.gone_at is None]

    def instance_ids(self, live_only: bool = True) -> list[str]:
        members = self.live_members() if live_only else list(self.members)
        return [m.instance_id for m in members]

    def wait_for(self, predicate: Callable[["SpotFleet"], bool], timeout: float = 30.0) -> bool:
        """Block until ``predicate(fleet)`` holds after some change, or ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    # ---- the loop --------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._reconcile()
            except Exception as exc:  # noqa: BLE001 - the fleet outlives one bad poll
                self._record("fleet_reconcile_failed", error=f"{type(exc).__name__}: {exc}")
            if self.state == "cancelled":
                break

    def _reconcile(self) -> None:
        with self._lock:
            self._passes_started += 1
        try:
            self._reconcile_once()
        finally:
            with self._lock:
                self._passes_done += 1
                self._changed.notify_all()

    def _reconcile_once(self) -> None:
        moto_state = self._moto_state()
        if moto_state in (None, "cancelled", "cancelled_terminating"):
            self._cancelled_with_termination()
            return
        if moto_state == "cancelled_running" and self.state == "active":
            with self._lock:
                self.state = "cancelled_running"
                self._changed.notify_all()
            self._record("fleet_cancelled", terminate_instances=False)
        self._notice_gone_instances()
        # After the gone instances: whoever lowers the target (spotrun.fleet.leave) does so
        # before terminating its instance, so a termination seen above comes with its target.
        self._adopt_moto_target()
        self._reap_processes()
        if self.state == "active" and self.fleet_type == "maintain":
            self._launch_up_to_target()
        elif self.state == "active" and not self.members:
            self._launch_up_to_target()  # a one-time "request" fleet launches once
        self._patch_moto(fulfilled_capacity=len(self.live_members()))

    def _adopt_moto_target(self) -> None:
        """ModifySpotFleetRequest made through the API changed moto's request: keep its target,
        and with the "default" policy terminate what exceeds it (moto asked for that through
        the request's terminate_instances, see _patch_moto)."""
        request = self._moto_request
        if request is None or self.state != "active":
            return  # moto out of process (nothing to read), or the fleet is ending
        target = int(request.target_capacity)
        with self._lock:
            changed, self.target_capacity = target != self.target_capacity, target
            terminate_excess, self._terminate_excess = self._terminate_excess, False
        if changed:
            self._record("fleet_target_modified", target_capacity=target, source="api")
        if terminate_excess:
            for member in self.live_members()[target:][::-1]:  # the newest go first
                self._terminate_member(member, reason="target_lowered")

    def _excess_termination_asked(self, *_: Any) -> None:
        """moto's request.terminate_instances: a cancel with termination (the loop sees the
        cancel) or a lowered target with the "default" policy (the excess goes)."""
        with self._lock:
            self._terminate_excess = True
        self._wake.set()

    def _launch_up_to_target(self) -> None:
        while len(self.live_members()) < self.target_capacity and not self._stop.is_set():
            if time.monotonic() < self._next_launch_at:
                return
            try:
                self._launch_one()
            except Exception as exc:  # noqa: BLE001 - EC2 retries capacity later, so do we
                self._next_launch_at = time.monotonic() + max(self.poll_s, 1.0)
                self._record("fleet_launch_failed", error=f"{type(exc).__name__}: {exc}")
                return

    def _launch_one(self) -> FleetMember:
        az = self.policy.choose()
        tags = {**self.launch.tags, tagkeys.SPOT_FLEET_REQUEST: self.request_id}
        options = {"image_id": self.launch.image_id} if self.launch.image_id else {}
        instance = self.cloud.launch_instance(az=az, instance_type=self.launch.instance_type,
                                              tags=tags, user_data=self.launch.user_data,
                                              **options)
        member = FleetMember(instance=instance, az=az, launched_at=time.monotonic())
        self._record("fleet_instance_launched", instance_id=member.instance_id, az=az,
                     replacement=len(self.members) >= self.target_capacity)
        if self.boot is not None:
            try:
                member.process = self.boot(self.cloud, instance)
            except Exception as exc:  # noqa: BLE001 - the instance exists, bootable or not
                self._record("fleet_boot_failed", instance_id=member.instance_id,
                             error=f"{type(exc).__name__}: {exc}")
            if member.process is not None:
                self._record("fleet_instance_booted", instance_id=member.instance_id,
                             pid=member.process.pid)
        with self._lock:  # published once booted, so watchers see it whole
            self.members.append(member)
            self._changed.notify_all()
        return member

    def _notice_gone_instances(self) -> None:
        live = self.live_members()
        if not live:
            return
        answer = self._ec2.describe_instances(InstanceIds=[m.instance_id for m in live])
        states = {i["InstanceId"]: i["State"]["Name"]
                  for r in answer["Reservations"] for i in r["Instances"]}
        for member in live:
            # The cloud's own record first: it knows before moto does (power-off comes first).
            local = getattr(member.instance, "state", None)
            state = "terminated" if local == "terminated" else states.get(member.instance_id,
                                                                          "terminated")
            if state in GONE_STATES:
                power_off = getattr(self.cloud, "power_off", None)
                if local == "running" and callable(power_off):
                    # Terminated in moto behind the cloud's back (TerminateInstances sent to
                    # moto's own endpoint, not the cloud's): it powers off now, as on EC2 --
                    # its processes die, its metadata goes -- not only its boot process.
                    power_off(member.instance, "terminated")
                self._mark_gone(member, state)
                if self.replacement_delay_s:
                    self._next_launch_at = time.monotonic() + self.replacement_delay_s

    def _mark_gone(self, member: FleetMember, state: str) -> None:
        with self._lock:
            if member.gone_at is not None:
                return
            member.gone_at = time.monotonic()
            self._changed.notify_all()
        self._end_process(member)
        self._record("fleet_instance_gone", instance_id=member.instance_id, az=member.az,
                     state=state)

    def _cancelled_with_termination(self) -> None:
        if self.state == "cancelled":
            return
        self._record("fleet_cancelled", terminate_instances=True)
        for member in self.live_members():
            self._terminate_member(member, reason="fleet_cancelled")
        self._patch_moto(keep_cancelled=True)
        with self._lock:
            self.state = "cancelled"
            self._changed.notify_all()

    def _terminate_member(self, member: FleetMember, reason: str) -> None:
        try:
            self.cloud.terminate(member.instance_id)
        except Exception as exc:  # noqa: BLE001 - already gone is fine; log anything else
            self._record("fleet_terminate_failed", instance_id=member.instance_id,
                         error=f"{type(exc).__name__}: {exc}")
        self._mark_gone(member, f"terminated ({reason})")

    def _reap_processes(self) -> None:
        for member in self.live_members():
            proc = member.process
            if proc is not None and proc.poll() is not None and not getattr(proc, "_reported", False):
                proc._reported = True  # type: ignore[attr-defined]
                self._record("fleet_boot_process_exited", instance_id=member.instance_id,
                             returncode=proc.returncode)

    def _end_process(self, member: FleetMember) -> None:
        """The instance is gone, so is its process tree (the cloud usually killed it already)."""
        proc = member.process
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._record("fleet_process_unkillable", instance_id=member.instance_id, pid=proc.pid)

    # ---- moto ------------------------------------------------------------------------
    def _moto_state(self) -> str | None:
        answer = self._ec2.describe_spot_fleet_requests(SpotFleetRequestIds=[self.request_id])
        configs = [c for c in answer.get("SpotFleetRequestConfigs", [])
                   if c["SpotFleetRequestId"] == self.request_id]
        return configs[0]["SpotFleetRequestState"] if configs else None

    def _patch_moto(self, target_capacity: int | None = None,
                    fulfilled_capacity: int | None = None, keep_cancelled: bool = False) -> None:
        try:
            from moto.ec2.models import ec2_backends
            backend = ec2_backends[_account_id(self.cloud)][self.cloud.region]
        except Exception:  # noqa: BLE001 - moto out of process: the request stays as made
            return
        request = backend.spot_fleet_requests.get(self.request_id)
        if keep_cancelled and request is None and self._moto_request is not None:
            request = self._moto_request
            request.state = "cancelled"
            request.target_capacity = self.target_capacity  # EC2 keeps the request's target
            request.fulfilled_capacity = 0.0
            backend.spot_fleet_requests[self.request_id] = request
        if request is None:
            return
        if self._moto_request is None:
            # moto's cancel-with-terminate terminates the moto spot requests' instances and
            # fails when there are none (ours are not moto's): hand it to this fleet instead;
            # so too a lowered target's excess. A raised target would launch moto's own
            # instances: this fleet launches the cloud's instead.
            request.terminate_instances = self._excess_termination_asked
            request.create_spot_requests = lambda *_: self._wake.set()
        self._moto_request = request
        if target_capacity is not None:
            request.target_capacity = target_capacity
        if fulfilled_capacity is not None:
            request.fulfilled_capacity = float(fulfilled_capacity)

    _moto_request: Any = None
    _terminate_excess = False

    def _record(self, event: str, **fields: Any) -> None:
        entry = {"at": datetime.now(timezone.utc).isoformat(), "event": event,
                 "fleet_request_id": self.request_id, **fields}
        with self._lock:
            self.events.append(entry)
        recorder = getattr(self.cloud, "record_event", None)
        if callable(recorder):
            recorder(dict(entry))
        log.info(event, **{k: v for k, v in entry.items() if k not in ("at", "event")})


def request_spot_fleet(cloud: Any, target_capacity: int = 1,
                       launch: LaunchSpec | Mapping[str, Any] | None = None,
                       az_policy: str = "random", boot: Boot | None = None,
                       **options: Any) -> SpotFleet:
    """Create and start a fleet; what ``LocalCloud.request_spot_fleet`` delegates to."""
    fleet = SpotFleet(cloud, target_capacity, launch, az_policy, boot, **options)
    fleet.start()
    return fleet

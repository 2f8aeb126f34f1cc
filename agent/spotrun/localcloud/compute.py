"""LocalCloud's instances: launch, processes, spot notices, stop and termination."""
from __future__ import annotations

import base64
import importlib
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping

from spotrun.localcloud import ebs
from spotrun.localcloud.instance import Instance
from spotrun.log import get_logger

log = get_logger("localcloud")
NOTICE_ACTIONS = ("terminate", "stop", "hibernate")
# The Deep Learning AMI stand-in (any id works in moto; the same default as fleet.py).
DEFAULT_AMI_ID = "ami-0123456789abcdef0"


class ComputeMixin:
    """Instance operations of :class:`spotrun.localcloud.cloud.LocalCloud`."""

    def _learn_region(self) -> None:
        ec2 = self.client("ec2", faults=False)
        zones = ec2.describe_availability_zones()["AvailabilityZones"]
        self._az_ids = {z["ZoneName"]: z["ZoneId"] for z in zones}
        unknown = [az for az in self.azs if az not in self._az_ids]
        if unknown:
            raise ValueError(f"azs: {unknown} not in {self.region} ({sorted(self._az_ids)})")
        # moto runs any image id; listing its ~1300 stock AMIs costs seconds per start.
        self._ami_id = DEFAULT_AMI_ID

    def launch_instance(self, az: str | None = None, instance_type: str = "p3.2xlarge",
                        tags: Mapping[str, str] | None = None, user_data: bytes | str = b"",
                        image_id: str | None = None) -> Instance:
        """RunInstances in moto, then the instance's dirs and its metadata server."""
        az = az or self.azs[0]
        if az not in self.azs:
            raise ValueError(f"az: {az!r} is not one of this cloud's zones {self.azs}")
        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        user_data = user_data.encode() if isinstance(user_data, str) else bytes(user_data or b"")
        # RunInstances refuses tag keys starting with "aws:" (reserved for AWS), which is
        # how EC2 itself tags fleet instances (aws:ec2spot:fleet-request-id); they are put
        # on in moto's backend below, as EC2 would.
        own_tags = {k: v for k, v in tags.items() if not k.startswith("aws:")}
        request: dict[str, Any] = {"ImageId": image_id or self._ami_id, "MinCount": 1,
                                   "MaxCount": 1, "InstanceType": instance_type,
                                   "Placement": {"AvailabilityZone": az}}
        if own_tags:
            request["TagSpecifications"] = [{"ResourceType": "instance", "Tags": [
                {"Key": k, "Value": v} for k, v in own_tags.items()]}]
        if user_data:
            request["UserData"] = base64.b64encode(user_data).decode()
        answer = self.client("ec2", faults=False).run_instances(**request)["Instances"][0]
        return self.take_in(answer["InstanceId"], az=az, instance_type=instance_type,
                            ami_id=request["ImageId"], tags=tags, user_data=user_data,
                            private_ip=answer.get("PrivateIpAddress", "10.0.0.10"))

    def take_in(self, instance_id: str, *, az: str, instance_type: str, ami_id: str,
                tags: Mapping[str, str], user_data: bytes = b"", private_ip: str = "10.0.0.10",
                **launched: Any) -> Instance:
        """An instance that exists in moto becomes one of this cloud's: its reserved
        (``aws:``) tags in moto's backend, its directories, its metadata service. For
        RunInstances here and for the members of moto's fleets and groups that
        agents.InstanceAgents finds; ``launched`` goes into the instance_launched event."""
        tags = {str(k): str(v) for k, v in tags.items()}
        reserved = {k: v for k, v in tags.items() if k.startswith("aws:")}
        if reserved:
            self._put_reserved_tags(instance_id, reserved)
        inst = Instance(instance_id=instance_id, az=az, az_id=self._az_ids.get(az, ""),
                        instance_type=instance_type, region=self.region,
                        account_id=self.account_id, ami_id=ami_id, private_ip=private_ip,
                        tags=tags, user_data=user_data, root=self.root / "instances" / instance_id,
                        ec2_endpoint=self.ec2_endpoint)
        inst.make_dirs()
        self.instances[instance_id] = inst
        inst.metadata = self._start_metadata(inst)
        self.record_event("instance_launched", instance_id=instance_id, az=az,
                          instance_type=instance_type, imds_endpoint=inst.imds_endpoint,
                          root=str(inst.root), **launched)
        return inst

    def _put_reserved_tags(self, instance_id: str, tags: dict[str, str]) -> None:
        """Only the ones moto lacks: it tags an Auto Scaling group's instances itself."""
        from moto.ec2.models import ec2_backends

        backend = ec2_backends[self.account_id][self.region]
        have = backend.tags.get(instance_id, {})
        missing = {k: v for k, v in tags.items() if have.get(k) != v}
        if missing:
            backend.create_tags([instance_id], missing)

    def _start_metadata(self, inst: Instance) -> Any:
        try:
            imds = importlib.import_module("spotrun.localcloud.imds")
        except ImportError as exc:  # the emulator is another module; the cloud runs without it
            log.warning("imds_unavailable", instance_id=inst.instance_id, error=str(exc))
            return None
        md = imds.InstanceMetadata(
            instance_id=inst.instance_id, instance_type=inst.instance_type,
            availability_zone=inst.az, availability_zone_id=inst.az_id, region=inst.region,
            account_id=inst.account_id, ami_id=inst.ami_id, private_ip=inst.private_ip,
            tags=dict(inst.tags), user_data=inst.user_data or None,
            tags_in_metadata=self.tags_in_metadata)
        server = imds.MetadataServer(md, host="127.0.0.1", port=0,
                                     require_token=self.require_imds_token)
        server.start()
        return server

    def instance(self, instance_id: str) -> Instance:
        try:
            return self.instances[instance_id]
        except KeyError:
            raise ValueError(f"instance_id: {instance_id!r} was not launched by this local cloud "
                             f"(known: {sorted(self.instances)})") from None

    def start_process(self, inst: Instance | str, argv: list[str],
                      env: Mapping[str, str] | None = None, **popen: Any):
        """Start ``argv`` as a process tree of the instance (its own session); env defaults
        to ``inst.env()``."""
        inst = self.instance(inst) if isinstance(inst, str) else inst
        if inst.state != "running":
            raise RuntimeError(f"{inst.instance_id} is {inst.state}: cannot start a process on it")
        proc = inst.start_process(list(argv), dict(env) if env is not None else None, **popen)
        self.record_event("process_started", instance_id=inst.instance_id, pid=proc.pid,
                          argv=[str(a) for a in argv][:6])
        return proc

    # -- going away ----------------------------------------------------------------------
    def terminate(self, instance_id: str) -> None:
        """TerminateInstances (the cloud's own call, never faulted): the processes are
        killed, mounts under the instance vanish, its volumes detach per the timing model."""
        inst = self.instance(instance_id)
        if inst.state == "terminated":
            return
        self.client("ec2", faults=False).terminate_instances(InstanceIds=[instance_id])
        self._power_off(inst, "terminated")  # also when moto forgot the instance

    def stop_instance(self, instance_id: str) -> None:
        """StopInstances: processes and mounts go, the EBS attachments stay (as on EC2)."""
        inst = self.instance(instance_id)
        if inst.state != "running":
            return
        self.client("ec2", faults=False).stop_instances(InstanceIds=[instance_id])
        self._power_off(inst, "stopped")

    def _before_power_off(self, state: str, instance_ids: set[str]) -> None:
        for instance_id in instance_ids:
            inst = self.instances.get(instance_id)
            if inst is not None:
                self._power_off(inst, state)

    def power_off(self, inst: Instance, state: str = "terminated") -> None:
        """What EC2 does to an instance that went ``terminated`` or ``stopped`` without this
        cloud being asked (moto ended it: a fleet or group deleted with its instances): its
        processes die, its mounts go."""
        self._power_off(inst, state)

    def _power_off(self, inst: Instance, state: str) -> None:
        # The notice timer, the API and stop() may race to power the same instance off.
        with inst.power_lock:
            if inst.state == "terminated" or inst.state == state:
                return
            self._power_off_locked(inst, state)

    def _power_off_locked(self, inst: Instance, state: str) -> None:
        killed = inst.kill_processes()
        if inst.metadata is not None:
            inst.metadata.stop()
        # A vanished instance's mounts vanish with it; here the kernel lets them go lazily.
        unmounted = ebs.lazy_unmount_under(inst.root)
        inst.state = state
        self.record_event(f"instance_{state}", instance_id=inst.instance_id, killed=killed,
                          unmounted=unmounted)
        if state == "terminated":
            for listener in list(self._terminated_listeners):
                try:
                    listener(inst)
                except Exception:  # noqa: BLE001 - a listener's bug must not stop the cloud
                    log.exception("terminated_listener_failed", instance_id=inst.instance_id)

    def _after_power_on(self, instance_ids: set[str]) -> None:
        """StartInstances: a stopped instance runs again with its attachments; its metadata
        comes back without the old notices. Nothing is booted: that is the fleet's job."""
        for instance_id in instance_ids:
            inst = self.instances.get(instance_id)
            if inst is None or inst.state != "stopped":
                continue
            with inst.power_lock:
                if inst.metadata is not None:
                    inst.metadata.clear_notices()
                    inst.metadata.start()
                inst.state = "running"
            self.record_event("instance_started", instance_id=instance_id)

    def _instance_tags_changed(self, resource_ids: set[str], added: dict,
                               removed: dict) -> None:
        for resource_id in resource_ids:
            inst = self.instances.get(resource_id)
            if inst is None:
                continue
            views = [inst.tags] + ([inst.metadata.md.tags] if inst.metadata is not None else [])
            for tags in views:
                tags.update({k: v or "" for k, v in added.items()})
                for key, value in removed.items():
                    if value is None or tags.get(key) == value:
                        tags.pop(key, None)

    def _device_dir_for(self, instance_id: str) -> Path | None:
        inst = self.instances.get(instance_id)
        return inst.device_dir if inst is not None else None

    # -- spot notices and metadata events ---------------------------------------------------
    def interrupt(self, instance_id: str, action: str = "terminate",
                  in_seconds: float = 120.0) -> datetime:
        """A spot interruption notice on the instance's metadata; at its time the instance is
        terminated (``stop``/``hibernate``: stopped). Returns the notice's time."""
        if action not in NOTICE_ACTIONS:
            raise ValueError(f"action: must be one of {NOTICE_ACTIONS}, not {action!r}")
        if in_seconds < 0:
            raise ValueError(f"in_seconds: must be >= 0, not {in_seconds!r}")
        inst = self.instance(instance_id)
        when = datetime.now(timezone.utc) + timedelta(seconds=in_seconds)
        if inst.metadata is not None:
            inst.metadata.notice(action, when)
        self.record_event("spot_interruption_notice", instance_id=instance_id, action=action,
                          time=when.isoformat(), in_seconds=in_seconds)
        act = self.terminate if action == "terminate" else self.stop_instance
        timer = threading.Timer(in_seconds, self._interruption_due, args=(act, instance_id))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()
        return when

    def _interruption_due(self, act: Any, instance_id: str) -> None:
        if self._started and self.instances[instance_id].state == "running":
            self.record_event("spot_interruption", instance_id=instance_id, action=act.__name__)
            act(instance_id)

    def rebalance(self, instance_id: str, notice_time: datetime | None = None) -> None:
        inst = self.instance(instance_id)
        if inst.metadata is not None:
            inst.metadata.rebalance(notice_time)
        self.record_event("rebalance_recommendation", instance_id=instance_id)

    def schedule_maintenance(self, instance_id: str, **event: Any) -> str | None:
        inst = self.instance(instance_id)
        event_id = inst.metadata.schedule_maintenance(**event) if inst.metadata else None
        self.record_event("maintenance_scheduled", instance_id=instance_id, event_id=event_id,
                          **{k: str(v) for k, v in event.items()})
        return event_id

    def imds_fault(self, instance_id: str, kind: str, duration_s: float | None = None,
                   **options: Any) -> None:
        inst = self.instance(instance_id)
        if inst.metadata is None:
            raise RuntimeError("the metadata emulator is not available")
        inst.metadata.fault(kind, duration_s, **options)
        self.record_event("imds_fault_injected", instance_id=instance_id, kind=kind,
                          duration_s=duration_s)

    def request_spot_fleet(self, target_capacity: int = 1, launch: Any = None,
                           az_policy: str = "random", boot: Any = None, **options: Any) -> str:
        """A Spot Fleet request (spotrun.localcloud.fleet); returns its request id, the
        fleet object is ``cloud.fleets[request_id]``."""
        from spotrun.localcloud.fleet import request_spot_fleet

        fleet = request_spot_fleet(self, target_capacity, launch, az_policy, boot, **options)
        self.fleets[fleet.request_id] = fleet
        return fleet.request_id

"""Instances launched through the EC2 API boot the real agent, as the spotrun AMI does.

``spotrun launch`` asks EC2 (here: moto, behind the cloud's proxy) for capacity: CreateFleet,
CreateAutoScalingGroup or RequestSpotFleet, with a launch template carrying the user-data
stub. moto then marks instances ``running`` and nothing more: no metadata service, no
process. With :class:`InstanceAgents` started (``spotrun localcloud up --run-agents``), every
instance such a fleet or group launches is taken in by the cloud (its directories, its
metadata service serving the launch template's user data and its tags) and boots
:func:`boot_agent`: what systemd does on the AMI (``spotrun agent run``, the unit's command
line), with the instance's metadata endpoint, the cloud's EC2 endpoint and the instance's
dummy credentials, its volume devices on the cloud's data plane, its output in
``<root>/instances/<id>/agent.log``. ``spotrun rehearse`` boots its fleets' agents with the
same :func:`boot_agent`.

What EC2 does and moto does not, done here while the instances' fleets run:
  * EC2 tags fleet instances ``aws:ec2:fleet-id`` / ``aws:ec2spot:fleet-request-id`` (the
    agent reads them to know what to cancel when the job is done); moto tags only its Auto
    Scaling groups' instances.
  * A ``maintain`` fleet replaces a terminated instance; moto's fleets never do (its Auto
    Scaling groups replace instances ended by TerminateInstances already).
  * An instance that moto terminates behind the cloud's back (DeleteFleets or
    CancelSpotFleetRequests with termination, DeleteAutoScalingGroup with ForceDelete, as the
    agent does when training is done) powers off: its processes die with it, as on EC2.
Instances the cloud launched itself (``launch_instance``, its own Spot Fleets) are never
taken in: only members of moto's fleets and groups are.

Every agent started for the local cloud, the soak and the tests is started by
:func:`agent_argv`: ``spotrun`` behind the test launcher (spotrun.localcloud.faultagent), which
installs the crash, pause and call-recording hooks the process's environment asks for.
"""
from __future__ import annotations

import base64
import binascii
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Mapping

from spotrun import tags as tagkeys
from spotrun.localcloud import motofleets
from spotrun.localcloud.motofleets import GONE
from spotrun.localcloud.instance import Instance
from spotrun.log import get_logger

log = get_logger("localcloud.agents")


def agent_argv(*args: str) -> list[str]:
    """The command line of ``spotrun *args`` (e.g. ``agent run --config PATH``) run through the
    test launcher: the same agent, with the fault hooks its environment names."""
    return [sys.executable, "-m", "spotrun.localcloud.faultagent", *args]


def agent_log_path(inst: Instance) -> Path:
    return inst.root / "agent.log"


def boot_agent(cloud: Any, inst: Instance, config: Mapping[str, Any], *,
               private_mounts: bool = False) -> subprocess.Popen:
    """What the AMI does at boot: systemd starts ``spotrun agent run`` (here, a process tree
    of the instance, killed when it powers off). ``config`` stands for the AMI's
    /etc/spotrun/agent.toml; the job comes from the user data, read through metadata.

    ``private_mounts``: the agent (and so its trainer) runs in a mount namespace of its own,
    as on its own machine: it can mount the volume at the configured mount point itself (e.g.
    ``/dltraining``), which no other instance, nor the host, sees. Its mounts die with its
    processes; the host reaches its files through ``/proc/<pid>/root``."""
    import tomli_w

    config_path = inst.root / "agent.toml"
    config_path.write_text(tomli_w.dumps(dict(config)))
    env = inst.env()
    env["SPOTRUN_CONFIG"] = str(config_path)  # the unit's default path, moved under the instance
    argv = agent_argv("agent", "run", "--config", str(config_path))
    if private_mounts:
        # unshare(1) execs the agent itself (no --fork): the pid the cloud kills is the agent's.
        argv = ["unshare", "--mount", "--propagation", "private", "--", *argv]
        cloud.dataplane.private_mount_namespaces = True
    with open(agent_log_path(inst), "ab") as log_file:  # the child holds its own copy
        return cloud.start_process(inst, argv, env=env, stdout=log_file, stderr=subprocess.STDOUT)


def local_ami_config(inst: Instance) -> dict[str, dict[str, Any]]:
    """The local stand-in for the AMI's agent.toml: where this instance's metadata, EC2,
    devices and directories are, plus what a desk-sized cloud needs. The job's own settings
    (user data) override it, as on AWS."""
    config = inst.agent_overrides()
    config["metadata"]["poll_interval_s"] = 0.5  # notices scaled down with the rest
    # The AMI's training user ("ubuntu") rarely exists on the machine running the cloud.
    config["trainer"] = {"user": "root", "restart_backoff_s": 1.0}
    config["volume"]["create_timeout_s"] = 120.0
    return config


def _user_data(raw: Any) -> bytes:
    """moto keeps the launch template's user data as the base64 text it was sent."""
    if isinstance(raw, (list, tuple)):
        raw = raw[0] if raw else b""
    if not raw:
        return b""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return text.encode()


class InstanceAgents:
    """Takes in the instances moto's fleets and groups launch, boots their agents, replaces
    what a ``maintain`` fleet lost and powers off what moto terminated (see the module)."""

    def __init__(self, cloud: Any, config=local_ami_config, poll_s: float = 0.2,
                 member_zones: str = "as-launched"):
        """``member_zones``: where a fleet's instance is placed among the zones its overrides
        allow. moto places every fleet instance in the region's first zone; EC2 places each
        where capacity and price say, so a replacement may well land in another zone than the
        instance it replaces. "as-launched" keeps moto's choice; "round-robin" cycles through
        the fleet's zones; "random:<seed>" draws each (reproducibly)."""
        if member_zones != "as-launched" and member_zones != "round-robin" \
                and not member_zones.startswith("random:"):
            raise ValueError(f"member_zones {member_zones!r}: as-launched, round-robin or random:<seed>")
        self.member_zones = member_zones
        self._zone_turn = 0
        self._zone_draw = random.Random(member_zones.split(":", 1)[1]) \
            if member_zones.startswith("random:") else None
        self.cloud = cloud
        self.config = config  # inst -> the AMI's agent config for it
        self.poll_s = poll_s
        self.taken: list[str] = []  # instance ids taken in, in order
        self._api_spot_fleets: set[str] = set()  # see motofleets.members
        self.booted: dict[str, subprocess.Popen] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "InstanceAgents":
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="localcloud-agents", daemon=True)
        self._thread.start()
        self.cloud.record_event("instance_agents_started")
        return self

    def stop(self) -> None:
        """Stop taking instances in (before the cloud stops: it ends the instances)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> "InstanceAgents":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.reconcile()
            except Exception as exc:  # noqa: BLE001 - one bad pass must not end the booting
                log.exception("instance_agents_pass_failed", error=f"{type(exc).__name__}: {exc}")

    # -- one pass ---------------------------------------------------------------------------
    def reconcile(self) -> None:
        ec2, autoscaling = motofleets.backends(self.cloud.account_id, self.cloud.region)
        # instance id -> (moto instance, reserved tags)
        members = motofleets.members(ec2, autoscaling, own=self.cloud.fleets,
                                     api_spot_fleets=self._api_spot_fleets)
        for instance_id, (moto_instance, reserved) in members.items():
            if moto_instance.state not in GONE and instance_id not in self.cloud.instances:
                self._take_in(moto_instance, reserved)
        self._power_off_gone(ec2)
        motofleets.replace_lost(ec2, own=self.cloud.fleets, api_spot_fleets=self._api_spot_fleets,
                                record_event=self.cloud.record_event)

    def _take_in(self, moto_instance: Any, reserved: dict[str, str]) -> None:
        cloud = self.cloud
        instance_id = moto_instance.id
        tags = {t["key"]: t["value"] for t in moto_instance.get_tags()}
        tags.update(reserved)
        self._place(moto_instance, reserved)
        inst = cloud.take_in(instance_id, az=moto_instance.placement.zone or cloud.azs[0],
                             instance_type=moto_instance.instance_type,
                             ami_id=moto_instance.image_id, tags=tags,
                             user_data=_user_data(moto_instance.user_data),
                             private_ip=moto_instance.private_ip or "10.0.0.10",
                             launched_by=reserved or {k: v for k, v in tags.items()
                                                      if k == tagkeys.AUTOSCALING_GROUP})
        self.taken.append(instance_id)
        if not inst.user_data:
            # An AMI launched without a job stays idle (the unit's ExecCondition): so here.
            cloud.record_event("instance_agent_skipped", instance_id=instance_id,
                               reason="no user data")
            return
        try:
            proc = boot_agent(cloud, inst, self.config(inst))
        except Exception as exc:  # noqa: BLE001 - the instance exists, bootable or not
            cloud.record_event("instance_agent_boot_failed", instance_id=instance_id,
                               error=f"{type(exc).__name__}: {exc}")
            return
        self.booted[instance_id] = proc
        cloud.record_event("instance_agent_booted", instance_id=instance_id, pid=proc.pid,
                           log=str(agent_log_path(inst)))

    def _place(self, moto_instance: Any, reserved: dict[str, str]) -> None:
        """Move a fleet member to the zone ``member_zones`` picks among its fleet's (before
        anything is known of it: EC2's DescribeInstances and the metadata then agree)."""
        fleet_id = reserved.get(tagkeys.EC2_FLEET) or reserved.get(tagkeys.SPOT_FLEET_REQUEST)
        if self.member_zones == "as-launched" or not fleet_id:
            return
        ec2, _ = motofleets.backends(self.cloud.account_id, self.cloud.region)
        fleet = ec2.fleets.get(fleet_id) or ec2.spot_fleet_requests.get(fleet_id)
        zones = sorted({o.get("AvailabilityZone") for c in getattr(fleet, "launch_template_configs", None) or []
                        for o in (c.get("Overrides") or []) if o.get("AvailabilityZone")})
        if not zones:
            return
        if self._zone_draw is not None:
            zone = self._zone_draw.choice(zones)
        else:
            zone, self._zone_turn = zones[self._zone_turn % len(zones)], self._zone_turn + 1
        moto_instance._placement.zone = zone

    def _power_off_gone(self, ec2: Any) -> None:
        """Terminated in moto but still running here: the cloud was not asked (a fleet or
        group deleted with its instances), so the instance dies now, processes and all."""
        for instance_id in list(self.taken):
            inst = self.cloud.instances.get(instance_id)
            if inst is None or inst.state != "running":
                continue
            try:
                moto_state = ec2.get_instance(instance_id).state
            except Exception:  # noqa: BLE001 - moto forgot it: gone as well
                moto_state = "terminated"
            if moto_state in GONE:
                self.cloud.power_off(inst, "terminated")
            elif moto_state == "stopped":
                self.cloud.power_off(inst, "stopped")

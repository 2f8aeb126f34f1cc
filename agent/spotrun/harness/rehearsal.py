"""`spotrun rehearse`: a whole spot job on the local spot cloud, with the real agent.

A Spot Fleet (capacity 1, maintain) boots instances whose "AMI" runs `spotrun agent run`; the
agent finds (or creates) the job's volume, checks out the training code from a git repository,
and trains. The rehearsal sends spot notices at chosen training steps; the fleet replaces each
terminated instance in another AZ, the agent migrates the volume there and resumes; when
training finishes the agent cancels the fleet. The report is built from what the agents
logged (their JSON events), what the cloud holds at the end, and — for the resume figures —
what the volume images hold (rehearsal_volume), which the agent cannot write.

It is `make demo`, the end-to-end tests' harness, and a way for users to rehearse their own
script's interruption handling (`--repository`, `--command`) before paying for GPUs.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from spotrun import tags as T
from spotrun.errors import SpotrunError
from spotrun.log import get_logger
# The set-up helpers live in rehearsal_setup; these names stay importable from here.
from spotrun.harness.rehearsal_setup import (DEMO_TRAIN_PY, _check_reachable,  # noqa: F401
                                     commit_repository, ensure_lease_table, make_demo_repository)
from spotrun.harness.rehearsal_report import (EventLog, InterruptionRecord, MissedInterruption,
                                      TimelineEntry, build_report)
from spotrun.harness.rehearsal_interrupts import Interrupting
from spotrun.harness.rehearsal_volume import VolumeReadError, list_script_files, read_volume_state
from spotrun.waiting import wait_until

log = get_logger("rehearsal")

@dataclass
class RehearsalPlan:
    out: Path
    job_id: str = "rehearsal"
    repository: str = ""  # "" = a generated repository with the reference trainer
    ref: str = "main"
    command: list[str] = field(default_factory=lambda: [sys.executable, "train.py"])
    trainer_env: dict[str, str] = field(default_factory=dict)
    trainer_user: str = "nobody"  # "" = nobody where it can reach the work, else root (said so)
    interrupt_at_steps: list[int] = field(default_factory=lambda: [40])
    # Notices by time, for scripts with no progress file: seconds since the trainer started on
    # the instance then training (after the step ones; one instance each, in order).
    interrupt_after_s: list[float] = field(default_factory=list)
    trainer_path_prepend: list[str] = field(default_factory=list)  # trainer.path_prepend
    # Where each instance mounts the job's volume: "" = a directory of the instance's own
    # under the cloud's root; a path (rehearse's default, /dltraining) = that path, inside a
    # mount namespace of the instance's own, so a script with hard-coded paths runs unchanged
    # and no two instances (nor the host) see each other's volume there.
    mount_point: str = ""
    # Rebalance recommendations by time: the k-th goes to the k-th instance that trains, once
    # its trainer has run that many seconds (if it is still training then).
    rebalance_after_s: list[float] = field(default_factory=list)
    # Notices when a file matching the glob (relative to the volume's root, e.g.
    # "checkpoints/cifar10_model.003.*") appears on the current instance's volume; after the
    # step and time ones, one instance each.
    interrupt_on_files: list[str] = field(default_factory=list)
    # Scheduled instance-retirement events by time (after all the notices): the event's
    # NotBefore is notice_s away, the agent drains that long ahead (its maintenance lead), and
    # the instance is terminated at NotBefore, as EC2 retires it.
    maintenance_after_s: list[float] = field(default_factory=list)
    # An asked-for notice that training outran: a failure (the demo, which must show a resume)
    # or a note in a report that still passes (a user's own script, which did finish).
    missed_is_failure: bool = True
    notice_s: float = 20.0  # the two-minute notice, scaled down so the demo is quick
    az_policy: str = "round-robin"
    timeout_s: float = 900.0
    # The fleet replaces an instance while the old one may still drain: two agents can meet,
    # so the agents use a lease table (created in the cloud at start if missing), as a job set
    # up by `spotrun init` does. "" = none: agent_config must then set aws.single_instance.
    lease_table: str = "spotrun-leases"
    # Extra agent config per section (e.g. {"trainer": {"max_restarts": 1}}), over the defaults here.
    agent_config: dict = field(default_factory=dict)


class Rehearsal(Interrupting):
    def __init__(self, plan: RehearsalPlan, cloud=None, narrate=None):
        self.plan = plan
        self.say = narrate or (lambda message: None)
        self.out = Path(plan.out).absolute()
        self._own_cloud = cloud is None
        self.cloud = cloud
        self.fleet = None
        self.interruptions: list[InterruptionRecord] = []
        self.missed: list[MissedInterruption] = []
        self.missed_after: list[tuple[float, str]] = []  # (seconds, why), the time-based ones
        self.missed_files: list[tuple[str, str]] = []  # (glob, why)
        self.partial_report: dict | None = None  # what a failed run had shown so far
        self.timeline: list[TimelineEntry] = []
        self.final_volume: dict | None = None
        self.final_volume_error: str | None = None
        self.final_script_files: list[dict] | None = None  # a script's own checkpoint files
        self.rebalances: list[dict] = []  # {"instance_id", "after_s", "wall"}, as sent
        self.missed_rebalances: list[tuple[float, str]] = []
        self._finished = threading.Event()
        self.boots: list[dict] = []
        self._lock = threading.Lock()
        self._event_logs: dict[str, EventLog] = {}  # agent log path -> its incremental reader
        self._event_logs_lock = threading.Lock()

    # -- set-up -----------------------------------------------------------------------------

    def _agent_config(self, inst) -> dict:
        overrides = inst.agent_overrides()
        overrides["metadata"]["poll_interval_s"] = 0.5
        overrides["volume"]["size_gib"] = 1
        overrides["volume"]["create_timeout_s"] = 120.0
        overrides["trainer"] = {"user": self.plan.trainer_user, "drain_reserve_s": 5.0,
                                "restart_backoff_s": 1.0}
        # A scheduled event's NotBefore is the notice's time here, scaled down like the notice.
        overrides.setdefault("agent", {})["maintenance_lead_s"] = self.plan.notice_s
        if self.plan.lease_table:
            overrides["aws"]["lease_table"] = self.plan.lease_table
        if self.plan.mount_point:
            overrides["volume"]["mount_point"] = self.plan.mount_point
        for section, values in self.plan.agent_config.items():
            overrides.setdefault(section, {}).update(values)
        return overrides

    def _job_overrides(self) -> dict:
        plan = self.plan
        return {"job": {"id": plan.job_id},
                "code": {"repository": plan.repository, "ref": plan.ref},
                "trainer": {"command": list(plan.command), "env": dict(plan.trainer_env),
                            **({"path_prepend": list(plan.trainer_path_prepend)}
                               if plan.trainer_path_prepend else {})}}

    def boot(self, cloud, inst) -> subprocess.Popen:
        """What the AMI does at boot: systemd starts `spotrun agent run` (here, a process)."""
        from spotrun.localcloud.agents import agent_log_path, boot_agent

        boot = {"instance_id": inst.instance_id, "az": inst.az, "boot_wall": time.time(),
                "log": str(agent_log_path(inst)), "trainer_log": str(inst.state_dir / "trainer.log")}
        log.info("instance_booting", instance_id=inst.instance_id, az=inst.az)
        self.say(f"instance {inst.instance_id} boots in {inst.az}: the agent starts")
        boot["process"] = boot_agent(cloud, inst, self._agent_config(inst),
                                     private_mounts=bool(self.plan.mount_point))
        with self._lock:
            self.boots.append(boot)
        return boot["process"]

    def start(self) -> None:
        from spotrun import userdata
        from spotrun.localcloud import LocalCloud, TimingModel
        from spotrun.localcloud.fleet import LaunchSpec

        self.out.mkdir(parents=True, exist_ok=True)
        needed = [self.out, Path(sys.executable).parent]
        if self.plan.command and Path(self.plan.command[0]).is_absolute():
            needed.append(Path(self.plan.command[0]).parent)  # --python elsewhere
        if not self.plan.trainer_user:
            try:
                _check_reachable("nobody", needed)
                self.plan.trainer_user = "nobody"
            except SpotrunError as exc:
                self.plan.trainer_user = "root"
                self.say(f"the trainer runs as root here: {exc} (on AWS it runs as trainer.user)")
        _check_reachable(self.plan.trainer_user, needed)
        if not self.plan.repository:
            self.plan.repository = make_demo_repository(self.out / "repo")
        if self.cloud is None:
            self.say(f"starting the local spot cloud under {self.out / 'cloud'}")
            # Loop devices, or a DataPlaneError saying how to ask for directories by name
            # (SPOTRUN_LOCALCLOUD_VOLUMES=directory): never a silent fallback.
            self.cloud = LocalCloud(self.out / "cloud", TimingModel.fast()).start()
            if not self.cloud.uses_loop_devices:
                self.say(f"volumes are directories ({self.cloud.dataplane.no_loop_reason}): "
                         "nothing is formatted, mounted, checked or detached for real")
        if self.plan.lease_table:
            ensure_lease_table(self.cloud, self.plan.lease_table)
        self.say(f"requesting a Spot Fleet: capacity 1, maintain, replacements {self.plan.az_policy}")
        # Tagged as `spotrun launch`'s template tags its instances (the job tag scopes the
        # role, and the agent finds the job's earlier instances by it).
        launch = LaunchSpec(instance_type="p3.2xlarge",
                            user_data=userdata.render(self._job_overrides()),
                            tags={T.NAME: f"spotrun-{self.plan.job_id}", T.JOB: self.plan.job_id})
        self.timeline.append(TimelineEntry(time.time(), "rehearsal", "Spot Fleet requested (capacity 1)"))
        request_id = self.cloud.request_spot_fleet(1, launch=launch, az_policy=self.plan.az_policy,
                                                   boot=self.boot)
        self.fleet = self.cloud.fleets[request_id]
        log.info("fleet_requested", fleet=request_id, az_policy=self.plan.az_policy)

    def stop(self) -> None:
        if self.cloud is not None and self._own_cloud:
            self._save_cloud_events()
            self.cloud.stop()

    def _save_cloud_events(self) -> None:
        """The cloud's own record (notices posted, instances terminated) beside the report:
        evidence the agent cannot write, kept after the cloud is gone."""
        try:
            with open(self.cloud.root / "cloud-events.jsonl", "w") as fh:
                for event in list(self.cloud.events):
                    fh.write(json.dumps(event, default=str) + "\n")
        except OSError as exc:
            log.warning("cloud_events_not_saved", error=str(exc))

    # -- watching -------------------------------------------------------------------------

    def current_instance(self):
        members = self.fleet.live_members() if self.fleet else []
        return self.cloud.instance(members[-1].instance_id) if members else None

    def on_volume(self, inst, rel: str) -> Path:
        """A path on the instance's mounted volume, as this process can reach it: through the
        agent's own mount namespace when the instance has one (gone with its processes)."""
        if not self.plan.mount_point:
            return inst.mount_point / rel
        pid = next((b["process"].pid for b in self.boots if b["instance_id"] == inst.instance_id), None)
        return Path(f"/proc/{pid}/root") / self.plan.mount_point.lstrip("/") / rel

    def progress_of(self, inst) -> dict:
        path = self.on_volume(inst, "checkpoints/.spotrun-progress.json")
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _await(self, what: str, condition, deadline: float, interval: float = 0.1):
        # Watching another process's files: nothing to block on.
        return wait_until(condition, deadline - time.monotonic(), interval_s=interval, what=what,
                          error=lambda: TimeoutError(f"rehearsal: timed out waiting for {what}"))

    def run(self) -> dict:
        plan = self.plan
        deadline = time.monotonic() + plan.timeout_s
        try:
            self.start()
            if plan.rebalance_after_s:
                threading.Thread(target=self._send_rebalances, name="rehearsal-rebalances",
                                 daemon=True).start()
            targets = ([("step", s) for s in plan.interrupt_at_steps]
                       + [("after", s) for s in plan.interrupt_after_s]
                       + [("file", g) for g in plan.interrupt_on_files]
                       + [("maintenance", s) for s in plan.maintenance_after_s])
            for index, (kind, target) in enumerate(targets):
                if kind == "step":
                    found = self._await(f"training step {target}",
                                        lambda: self._at_step(target), deadline)
                elif kind in ("after", "maintenance"):
                    found = self._await(f"{target:g} s of training",
                                        lambda: self._after(target), deadline, interval=0.25)
                else:
                    found = self._await(f"a file matching {target} on the volume",
                                        lambda: self._file_appeared(target), deadline, interval=0.1)
                if found == "cancelled":
                    self._missed(targets[index:])
                    break
                self._interrupt(*found, deadline, retire=kind == "maintenance")
            if self.interruptions:
                self.say("training resumes on the replacement; waiting for completion")
            self._await("the fleet to be cancelled", lambda: self._fleet_cancelled(), deadline)
            self.timeline.append(TimelineEntry(time.time(), "rehearsal", "the fleet is cancelled"))
            self.say("training complete: the agent recorded it on the volume and cancelled the fleet")
            self._read_final_volume(deadline)
            return self.report()
        except Exception:
            if self.cloud is not None and self.fleet is not None:
                try:
                    self.partial_report = self.report()
                except Exception as exc:  # the report is a courtesy here: the first error counts
                    log.warning("partial_report_failed", error=str(exc))
            raise
        finally:
            self._finished.set()
            self.stop()

    def _read_volume(self, volume_id: str | None):
        if not volume_id:
            raise VolumeReadError("the agent's released event names no volume")
        return read_volume_state(volume_id, self.cloud.dataplane.volume_path(volume_id))

    def _read_final_volume(self, deadline: float) -> None:
        """The job's one volume at the end, once its instance is gone and it is unmounted (an
        ext4 image is only whole on disk after the unmount writes its journal back)."""
        ec2 = self.cloud.moto_client("ec2")

        def available():
            volumes = ec2.describe_volumes(Filters=T.job_filters(self.plan.job_id))["Volumes"]
            if len(volumes) == 1 and volumes[0]["State"] == "available":
                return volumes[0]["VolumeId"]
            return None
        try:
            volume_id = self._await("the job's volume to be detached", available,
                                    min(deadline, time.monotonic() + 60))
            self.final_volume = self._read_volume(volume_id).as_dict()
            if not self.final_volume["checkpoints"]:
                self.final_script_files = list_script_files(self.cloud.dataplane.volume_path(volume_id))
        except (TimeoutError, VolumeReadError) as exc:
            self.final_volume_error = str(exc)

    def _agent_events(self, instance_id: str) -> list[dict]:
        """The events of the instance's first agent log, read incrementally."""
        for boot in self.boots:
            if boot["instance_id"] == instance_id:
                path = str(boot["log"])
                with self._event_logs_lock:
                    log_reader = self._event_logs.setdefault(path, EventLog(Path(path)))
                return log_reader.events()
        return []

    def await_agent_event(self, instance_id: str, event: str, timeout: float = 60.0, **match) -> dict:
        """The first event named ``event`` (with fields equal to ``match``) in an agent's log."""
        def found():
            for item in self._agent_events(instance_id):
                if item.get("event") == event and all(item.get(k) == v for k, v in match.items()):
                    return item
            return None

        return self._await(f"{event} {match or ''} from {instance_id}", found, time.monotonic() + timeout)

    def _drained_event(self, instance_id: str) -> dict | None:
        for event in self._agent_events(instance_id):
            if event.get("event") == "phase_changed" and event.get("phase") == "released":
                return event
        return None

    def _fleet_cancelled(self) -> bool:
        return self.fleet.state.startswith("cancelled")

    # -- the report -----------------------------------------------------------------------

    def report(self) -> dict:
        report = build_report(self)
        report["missed_interruptions_after_s"] = [{"after_s": s, "reason": why}
                                                  for s, why in self.missed_after]
        report["rebalances"] = [dict(r, trainer_next_exit=self._next_trainer_exit(r))
                                for r in self.rebalances]
        missed = ([f"no interruption landed at step {m.target_step}: {m.reason}" for m in self.missed]
                  + [f"no interruption landed {s:g} s after the trainer started: {why}"
                     for s, why in self.missed_after]
                  + [f"no interruption landed for a file matching {g}: {why}"
                     for g, why in self.missed_files]
                  + [f"no rebalance recommendation landed {s:g} s after the trainer started: {why}"
                     for s, why in self.missed_rebalances])
        report["notes"] = []
        if self.plan.missed_is_failure:
            report["failures"] += missed[len(self.missed):]  # the step ones are there already
        else:
            report["failures"] = [f for f in report["failures"] if f not in missed]
            report["notes"] = [f"{m} (not needed: the job finished without it)" for m in missed]
        return report


def register(subparsers) -> None:
    # The command's code is in rehearsal_cli (it imports this module).
    from spotrun.harness.rehearsal_cli import register as register_command

    register_command(subparsers)

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
from spotrun.rehearsal_setup import (DEMO_TRAIN_PY, _check_reachable,  # noqa: F401
                                     commit_repository, ensure_lease_table, make_demo_repository)
from spotrun.rehearsal_report import (InterruptionRecord, MissedInterruption, TimelineEntry,
                                      build_report, read_events, wall_time)
from spotrun.rehearsal_volume import VolumeReadError, list_script_files, read_volume_state
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


class Rehearsal:
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
        launch = LaunchSpec(instance_type="p3.2xlarge",
                            user_data=userdata.render(self._job_overrides()))
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

    def _missed(self, targets: list) -> None:
        """Training finished (the agent cancelled the fleet) before these notices could land."""
        for kind, target in targets:
            if kind == "step":
                self.missed.append(MissedInterruption(
                    target, "training finished (the fleet was cancelled) before the trainer "
                            "reached it: choose a step before the end"))
                self.say(f"no notice sent for step {target}: training finished first")
            elif kind in ("after", "maintenance"):
                self.missed_after.append((target, "training finished (the fleet was cancelled) "
                                                  "before it: choose a shorter time"))
                self.say(f"no notice sent {target:g} s after the trainer started: "
                         "training finished first")
            else:
                self.missed_files.append((target, "training finished (the fleet was cancelled) "
                                                  "before such a file appeared"))
                self.say(f"no notice sent for a file matching {target}: training finished first")

    def _file_appeared(self, pattern: str):
        """(instance, step) once a file matching ``pattern`` is on the current instance's
        volume; "cancelled" once the fleet is gone."""
        import glob

        if self._fleet_cancelled():
            return "cancelled"
        inst = self.current_instance()
        if inst is None or self._already_interrupted(inst) or not any(b["instance_id"] == inst.instance_id
                                                                     for b in self.boots):
            return None
        if not glob.glob(str(self.on_volume(inst, pattern))):
            return None
        step = self.progress_of(inst).get("global_step")
        return inst, step if isinstance(step, int) else 0

    def _after(self, seconds: float):
        """(instance, step) once the current instance's trainer has run ``seconds``;
        "cancelled" once the fleet is gone."""
        if self._fleet_cancelled():
            return "cancelled"
        inst = self.current_instance()
        if inst is None or self._already_interrupted(inst):
            return None
        started = self._trainer_started_wall(inst.instance_id)
        if started is None or time.time() - started < seconds:
            return None
        step = self.progress_of(inst).get("global_step")
        # A script with no progress file (or none yet) has no step to show: 0 keeps the
        # report's "notice before the checkpoint" comparison meaningful.
        return inst, step if isinstance(step, int) else 0

    def _send_rebalances(self) -> None:
        try:
            self._post_rebalances()
        except Exception:  # noqa: BLE001 - a thread's error must reach the log, not vanish
            log.exception("rebalances_failed")

    def _post_rebalances(self) -> None:
        """The k-th rebalance recommendation to the k-th instance that trains, once its trainer
        has run the asked seconds; one that cannot land is noted, as a missed notice is."""
        for k, seconds in enumerate(self.plan.rebalance_after_s):
            while True:
                if self._finished.wait(0.25):  # another process's log: nothing to block on
                    return
                if self._fleet_cancelled():
                    self.missed_rebalances.append((seconds, "training finished first"))
                    break
                started = [(b["instance_id"], wall) for b in list(self.boots)
                           if (wall := self._trainer_started_wall(b["instance_id"])) is not None]
                if len(started) <= k or time.time() - started[k][1] < seconds:
                    continue
                instance_id = started[k][0]
                inst = self.cloud.instance(instance_id)
                if inst.state != "running" or self._already_interrupted(inst):
                    self.missed_rebalances.append(
                        (seconds, f"{instance_id} was no longer training by then"))
                    break
                self.cloud.rebalance(instance_id)
                self.rebalances.append({"instance_id": instance_id, "after_s": seconds,
                                        "wall": time.time()})
                self.timeline.append(TimelineEntry(time.time(), "rehearsal",
                                                   f"rebalance recommendation posted to {instance_id}"))
                self.say(f"rebalance recommendation to {instance_id}, {seconds:g} s after its "
                         "trainer started")
                break

    def schedule_as_run(self) -> dict:
        """This run's interruptions as time-based ones — seconds of training on each instance
        when each landed — and the training time in all, to replay the same schedule with
        another trainer (rehearse --compare-with-callback)."""
        after, retire = [], []
        for record in self.interruptions:
            started = self._trainer_started_wall(record.instance_id)
            seconds = max(0.5, round(record.notice_wall - started, 1)) if started else 0.5
            (retire if record.cause == "instance-retirement" else after).append(seconds)
        training_s = 0.0
        for boot in self.boots:
            started = self._trainer_started_wall(boot["instance_id"])
            exits = [wall_time(e.get("ts")) for e in self._agent_events(boot["instance_id"])
                     if e.get("event") == "trainer_exited"]
            if started and exits and exits[-1]:
                training_s += exits[-1] - started
        return {"interrupt_after_s": after, "maintenance_after_s": retire,
                "training_s": round(training_s, 1)}

    def _next_trainer_exit(self, rebalance: dict) -> dict | None:
        """How the instance's trainer next exited after a rebalance recommendation: a script
        without a SIGUSR1 handler that was signalled dies of it (-10)."""
        for event in self._agent_events(rebalance["instance_id"]):
            if event.get("event") == "trainer_exited" and (wall_time(event.get("ts")) or 0) >= rebalance["wall"]:
                return {"returncode": event.get("returncode"), "outcome": event.get("outcome")}
        return None

    def _trainer_started_wall(self, instance_id: str) -> float | None:
        for event in self._agent_events(instance_id):
            if event.get("event") == "phase_changed" and event.get("phase") == "training":
                return wall_time(event.get("ts"))
        return None

    def _already_interrupted(self, inst) -> bool:
        # The drained instance stays a fleet member until its notice's time is up.
        return any(r.instance_id == inst.instance_id for r in self.interruptions)

    def _at_step(self, target: int):
        """(instance, step) once the current instance's trainer reports ``target``; "cancelled"
        once the fleet is gone (training finished first)."""
        if self._fleet_cancelled():
            return "cancelled"
        inst = self.current_instance()
        if inst is None or self._already_interrupted(inst):
            return None
        step = self.progress_of(inst).get("global_step")
        return (inst, step) if isinstance(step, int) and step >= target else None

    def _interrupt(self, inst, step: int, deadline: float, retire: bool = False) -> None:
        from datetime import datetime, timedelta, timezone

        record = InterruptionRecord(inst.instance_id, inst.az, step, time.time())
        where = (f"at training step {step}" if self.progress_of(inst)
                 else "(the trainer writes no progress file)")
        if retire:  # NotBefore has whole seconds, as AWS writes it
            not_before = (datetime.now(timezone.utc) + timedelta(seconds=self.plan.notice_s + 1)
                          ).replace(microsecond=0)
            self.cloud.schedule_maintenance(inst.instance_id, code="instance-retirement",
                                            not_before=not_before)
            what = (f"instance-retirement event scheduled for {inst.instance_id} {where}, "
                    f"not before {not_before.timestamp() - record.notice_wall:.0f} s from now")
        else:
            self.cloud.interrupt(inst.instance_id, "terminate", in_seconds=self.plan.notice_s)
            what = (f"spot notice posted to {inst.instance_id} {where}, termination in "
                    f"{self.plan.notice_s:g} s")
        record.cause = "instance-retirement" if retire else "spot notice"
        self.interruptions.append(record)
        self.timeline.append(TimelineEntry(record.notice_wall, "rehearsal", what))
        log.info("notice_sent", instance_id=inst.instance_id, at_step=step, cause=record.cause)
        self.say(what)
        released = self._await(f"{inst.instance_id} to drain",
                               lambda: self._drained_event(inst.instance_id), deadline)
        # Unmounted now, and deleted only after the replacement's copy is verified: read the
        # checkpoint the replacement must resume from, straight from the image.
        try:
            state = self._read_volume(released.get("volume_id"))
            record.volume_after_drain = state.as_dict()
            if not state.checkpoints:  # a script of its own: its files are the evidence
                record.script_files_after_drain = list_script_files(
                    self.cloud.dataplane.volume_path(released.get("volume_id")))
            newest = state.newest
            holds = (f"checkpoint {newest.name} at step {newest.step}" if newest else
                     f"the script's {Path(record.script_files_after_drain[-1]['path']).name} newest"
                     if record.script_files_after_drain else "no checkpoint")
            self.say(f"{inst.instance_id} drained in {released.get('drain_s')} s: the volume holds "
                     f"{holds}; unmounted, snapshotted and released")
        except VolumeReadError as exc:
            record.volume_read_error = str(exc)
            self.say(f"{inst.instance_id} drained, but its volume could not be read: {exc}")
        if retire:
            self._await("the retirement's time", lambda: time.time() >= not_before.timestamp(),
                        deadline, interval=0.25)
            self.cloud.terminate(inst.instance_id)
            self.timeline.append(TimelineEntry(time.time(), "rehearsal",
                                               f"{inst.instance_id} retired (terminated) at its event's time"))
            self.say(f"{inst.instance_id} retired at its event's time")

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
        for boot in self.boots:
            if boot["instance_id"] == instance_id:
                return read_events(Path(boot["log"]))
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
    from spotrun.rehearsal_cli import register as register_command

    register_command(subparsers)

"""The agent's lifecycle on one instance, as a state machine.

identify → acquire-volume → (completed? → finish) → checkout → train ⇄ (rebalance: checkpoint now)
→ notice: drain → release | finished (verified): finish | crash or outside stop: restart with
backoff → give up: fail-policy. A final state (done, failed) is on the volume's tags and in the
state file before the fleet is cancelled: the cancel terminates this instance.

Every step is idempotent and starts from what AWS and the disk say, so the agent restarted at
any point (crash, `systemctl restart`, reboot) simply runs again. Side effects live in the edge
modules (imds, ec2/volumes, blockdev, checkout, trainerproc, monitor, fleet); this module only
decides. Each transition is one structured event, one systemd STATUS= line, one rewrite of the
state file and (when it changes what the operator should see) a tag on the job's volume.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from spotrun import heldtime
from spotrun import metrics as metricsmod
from spotrun import progress as progressmod
from spotrun import tags as T
from spotrun.boot import COMPLETION_RECORD, Boot, Interrupted, StopRequested  # noqa: F401
from spotrun.config import Config
from spotrun.log import bind, get_logger
from spotrun.maintenance import MaintenanceDue, MaintenancePlan
from spotrun.monitor import Maintenance, Rebalance, SpotNotice
from spotrun.notify import Notifier, process_notifier
from spotrun.phases import ALLOWED, NEXT, Phase, TransitionError  # noqa: F401 - re-exported
from spotrun.progress import PROGRESS_FILE
from spotrun.state import StateFile, kill_leftover_trainer
from spotrun.supervisor import (Supervisor, SupervisorDone, SupervisorOutcome, SupervisorResult,
                                TrainerExited, TrainerStarted)
from spotrun.trainerproc import TrainerProcess
from spotrun_trainer.protocol import COMPLETION_ENV, COMPLETION_FILE, HELLO_ENV, HELLO_FILE
from spotrun_trainer.store import write_json_atomic

log = get_logger("lifecycle")

# A trainer always gets this long to checkpoint, even for a notice whose time is (nearly) past.
MIN_TRAINER_DRAIN_S = 5.0
STATUS_INTERVAL_S = 5.0


@dataclass(frozen=True)
class Tick:
    pass


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Lifecycle(Boot):
    """One agent run. Collaborators are injected so tests can drive the same code."""

    def __init__(self, config: Config, *, metadata, notifier: Notifier | None = None,
                 identify: Callable[[], Any], volume_manager: Callable[[Any], Any],
                 checkout: Callable[[Any], str], monitor: Callable[[Callable[[object], None]], Any],
                 cancel_fleet: Callable[[Any], str], clock: Callable[[], float] = time.monotonic,
                 metrics: Callable[[], Any] | None = None, record_held: bool = False):
        """``record_held``: a sweep's experiment: keep the time this instance holds it on the
        volume's ``spotrun:held`` tag (spotrun.heldtime), the record its cost is priced from."""
        self.config = config
        self.metadata = metadata
        self.notifier = notifier or process_notifier()
        self._identify = identify
        self._volume_manager = volume_manager
        self._checkout = checkout
        self._monitor_factory = monitor
        self._cancel_fleet = cancel_fleet
        self._metrics_factory = metrics  # -> spotrun.metrics.MetricsPublisher, made on first use
        self._metrics = None
        self._last_metrics = float("-inf")
        self.clock = clock
        self.events: queue.Queue = queue.Queue()
        self.state = StateFile(config.state_path / "state.json")
        self.phase: Phase | None = None
        self.identity = None
        self.volumes = None
        self.volume_id: str | None = None
        self.commit: str | None = None
        self.supervisor: Supervisor | None = None
        self.maintenance: MaintenancePlan | None = None
        self.watch: Watch | None = None  # from boot: the monitor's events before training
        self._monitor = None
        self._drained_for: str | None = None  # the scheduled event the last drain was for
        self.interruptions = 0
        self._last_tags = 0.0
        self._record_held = record_held
        self._held_before: dict[str, int] | None = None  # earlier holders', read once
        self._held_from = clock()  # made right after the claim: held from here
        self._stop_event = threading.Event()
        self.final: dict[str, Any] = {}  # what the state file says of a final state

    # -- transitions --------------------------------------------------------------------

    def transition(self, phase: Phase, *, tags: dict[str, str] | None = None,
                   tagged_on_release: bool = False, **fields: Any) -> None:
        """``tags`` go on the volume with the phase, in one call that must succeed: a final
        state is recorded before the fleet is cancelled, or not cancelled at all.
        ``tagged_on_release``: the release wrote them while the lease was still held (after
        it, the volume is the next holder's: no write from here)."""
        previous = self.phase
        if phase not in ALLOWED[previous]:
            raise TransitionError(f"lifecycle: {previous} → {phase} is not a transition")
        self.phase = phase
        bind(phase=phase.value)
        log.info("phase_changed", previous=previous.value if previous else None, **fields)
        self.notifier.status(self.status_line())
        self._write_state()
        if tagged_on_release:
            pass
        elif tags is not None:
            self.volumes.record(**self._with_held({T.PHASE: phase.value, **tags}))
        elif self.volumes is not None and self.volume_id is not None:
            self._record_tags({T.PHASE: phase.value}, force=True)

    def status_line(self) -> str:
        phase = self.phase.value if self.phase else "starting"
        if self.phase is Phase.TRAINING:
            training = progressmod.training_status(self.progress())
            if training:
                return training
        return f"{phase}: next, {NEXT[self.phase]}" if self.phase else phase

    def progress(self) -> dict:
        trainer = self.supervisor.current if self.supervisor is not None else None
        return progressmod.read_progress(self.config.checkpoints_path,
                                         getattr(trainer, "started_wall", None))

    def latest_checkpoint(self) -> dict:
        return progressmod.latest_checkpoint(self.config.checkpoints_path)

    def _write_state(self) -> None:
        trainer = None
        if self.supervisor is not None and self.supervisor.current is not None:
            proc = self.supervisor.current
            trainer = {"pid": proc.pid, "state": proc.state.value, "restarts": self.supervisor.restarts}
        ident = self.identity
        self.state.write({
            "phase": self.phase.value if self.phase else None,
            "job": self.config.job.id,
            "instance_id": ident.instance_id if ident else None,
            "az": ident.availability_zone if ident else None,
            "volume_id": self.volume_id,
            "mount_point": str(self.config.mount_point),
            "commit": self.commit,
            "trainer": trainer,
            "progress": self.progress() if self.phase is Phase.TRAINING else None,
            "interruptions": self.interruptions,
            "next": NEXT.get(self.phase) if self.phase else None,
            "status": self.status_line(),
            **self.final,
        })

    def _publish_metrics(self, progress: dict, *, force: bool = False) -> None:
        interval = self.config.agent.metrics_interval_s
        if self._metrics_factory is None or interval == 0 or not progress:
            return
        if self._metrics is None and not metricsmod.metric_values(progress):
            # Nothing to draw yet (or a trainer that reports no metrics): no client. Making
            # one trims botocore's model once (~0.1 s of CPU; measured idle share 1.4 % in the
            # 10 s it falls in, 0.7-0.8 % after).
            return
        now = self.clock()
        if not force and now - self._last_metrics < interval:
            return
        self._last_metrics = now
        try:
            if self._metrics is None:
                self._metrics = self._metrics_factory()
            self._metrics.publish(progress)
        except Exception as exc:  # learning curves are a report; never stop training for them
            log.warning("metrics_publish_failed", error=str(exc)[:300])

    def _with_held(self, values: dict[str, str]) -> dict[str, str]:
        """``values`` plus the held-time tag when this run keeps it and holds a volume. The
        earlier holders' share is read from the volume once (one DescribeVolumes a run); if
        it cannot be read, the tag is left as it is this time."""
        if not (self._record_held and self.volume_id and self.identity is not None):
            return values
        if self._held_before is None:
            try:
                volume = next((v for v in self.volumes.job_volumes()
                               if v["VolumeId"] == self.volume_id), None)
            except Exception as exc:  # a report: never stop training for it
                log.warning("held_time_unread", error=str(exc)[:300])
                return values
            self._held_before = heldtime.parse(T.as_dict((volume or {}).get("Tags")).get(T.HELD))
        where = heldtime.key(getattr(self.identity, "instance_type", "unknown"),
                             getattr(self.identity, "availability_zone", "unknown"))
        held = heldtime.add(self._held_before, where, self.clock() - self._held_from)
        return {**values, T.HELD: heldtime.format_tag(held)}

    def _record_tags(self, values: dict[str, str], *, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_tags < self.config.agent.progress_tag_interval_s:
            return
        self._last_tags = now
        try:
            self.volumes.record(**self._with_held(values))
        except Exception as exc:  # progress tags are a report; never stop training for them
            log.warning("progress_tags_failed", error=str(exc))

    # -- the run --------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signal_handlers()
        kill_leftover_trainer(self.state.read())
        self.transition(Phase.IDENTIFYING)
        # READY once the config is valid and the lifecycle has taken charge, not after the
        # mount: a Type=notify start job waits for READY, and a migration by snapshot may take
        # hours (boot would hang in `starting`, units ordered after us would wait). Later phases
        # are STATUS= lines, and the watchdog, which systemd arms at READY, covers them.
        self.notifier.ready(self.status_line())
        self._watch()  # one monitor for the whole run: a notice is seen from boot on
        try:
            return self._boot()
        finally:
            self._unwatch()

    def unread_reason_to_go(self) -> str | None:
        """Why this instance is going away, as this lifecycle knows it after it ended: a stop
        signal it received, or a notice or stop its monitor queued that it never read (it
        ended first); None if neither. A look only: nothing is taken from the queue."""
        if self._stop_event.is_set():
            return "stop requested"
        with self.events.mutex:
            queued = list(self.events.queue)
        for event in queued:
            if isinstance(event, StopRequested):
                return "stop requested"
            if isinstance(event, SpotNotice):
                return f"spot interruption notice ({event.action})"
        return None

    def _install_signal_handlers(self) -> None:
        def on_signal(signum, _frame):
            if self.supervisor is not None:  # before the trainer's exit can be judged finished
                self.supervisor.note_agent_stopping()
            # Deactivating from here on: no watchdog, TimeoutStopSec runs (a no-op if the
            # signal was systemd's own stop). Said before the loop is woken, so that it comes
            # before the drain's own status. Lock-free, so safe in a handler.
            self.notifier.stopping(f"stopping on {signal.Signals(signum).name}: draining")
            self.events.put(StopRequested(signum))
            self._stop_event.set()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)

    def _trainer_env(self) -> dict[str, str]:
        cfg = self.config
        env = dict(cfg.trainer.env)
        library = cfg.trainer.library_path
        if library and Path(library).is_dir():
            env["PYTHONPATH"] = os.pathsep.join(p for p in (library, env.get("PYTHONPATH")) if p)
        env.update({
            "SPOTRUN_JOB_ID": cfg.job.id,
            "SPOTRUN_DATA_DIR": str(cfg.datasets_path),
            "SPOTRUN_CHECKPOINT_DIR": str(cfg.checkpoints_path),
            "SPOTRUN_CODE_COMMIT": self.commit or "",
            "SPOTRUN_PROGRESS_FILE": str(cfg.checkpoints_path / PROGRESS_FILE),
            HELLO_ENV: str(cfg.checkpoints_path / HELLO_FILE),
            COMPLETION_ENV: str(cfg.checkpoints_path / COMPLETION_FILE),
        })
        return env

    def _new_trainer(self) -> TrainerProcess:
        cfg = self.config
        workspace = Path(cfg.code.workspace)
        return TrainerProcess(
            cfg.trainer.command, user=cfg.trainer.user,
            cwd=workspace / cfg.trainer.working_dir if cfg.trainer.working_dir else workspace,
            env=self._trainer_env(), path_prepend=cfg.trainer.path_prepend,
            log_path=cfg.state_path / "trainer.log", protocol=cfg.trainer.protocol,
            hello_file=cfg.checkpoints_path / HELLO_FILE,
            completion_file=cfg.checkpoints_path / COMPLETION_FILE)

    def train(self) -> int:
        cfg = self.config.trainer
        self.supervisor = Supervisor(self._new_trainer, max_restarts=cfg.max_restarts,
                                     backoff_s=cfg.restart_backoff_s,
                                     backoff_max_s=cfg.restart_backoff_max_s,
                                     on_event=self.events.put)
        if self._stop_event.is_set():  # the agent was signalled before training began
            self.supervisor.note_agent_stopping()
        # Started at boot by run(); started here only when train() is driven on its own.
        owner = self._watch()
        self._drained_for = None
        log.info("resume_point", **self.latest_checkpoint())
        self.transition(Phase.TRAINING)
        self.supervisor.start()
        try:
            code = self._training_loop()
            # Drained for scheduled maintenance: never wait for a termination that was called off.
            resume = self._drained_for is not None and self._called_off(self._drained_for)
        finally:
            if owner:
                self._unwatch()
        return self._resume() if resume else code

    def _resume(self) -> int:
        """The maintenance drained for was called off: take the volume back and train on."""
        if self.phase is Phase.RELEASED:
            # Let go: the volume is whoever acquires it next; no phase tag on it until we do.
            self.volume_id = None
        self.transition(Phase.ACQUIRING, resumed_after=self.phase.value)
        try:
            return self._acquire_and_train(self.commit)  # checked out already
        except Interrupted as stop:
            return self._stopped_before_training(stop)

    def _training_loop(self) -> int:
        while True:
            self.notifier.kick()
            try:
                event = self.events.get(timeout=STATUS_INTERVAL_S)
            except queue.Empty:
                event = Tick()
            if isinstance(event, Tick):
                self.notifier.status(self.status_line())
                self._write_state()
                progress = self.progress()
                if progress:
                    self._record_tags({T.PROGRESS: progressmod.progress_tag(progress)})
                    self._publish_metrics(progress)
            elif isinstance(event, (TrainerStarted, TrainerExited)):
                self._write_state()
            elif isinstance(event, Rebalance):
                # SIGUSR1 only to a trainer that asked for it: it kills a script without a handler.
                log.warning("rebalance_recommendation", notice_time=str(event.notice_time),
                            checkpoint_requested=self.supervisor.checkpoint_now())
            elif isinstance(event, Maintenance):  # armed, moved or disarmed by its code and state
                self.maintenance.update(event)
            elif isinstance(event, MaintenanceDue):
                if self.maintenance.is_current(event):  # not canceled or moved since it fired
                    log.warning("maintenance_due", event_id=event.event_id, code=event.action,
                                not_before=_iso(event.time))
                    self._drained_for = event.event_id
                    return self.drain(event.action, event.time, keep_volume=event.keep_volume)
            elif isinstance(event, SpotNotice):
                log.warning("interruption_notice", action=event.action, time=_iso(event.time))
                return self.drain(event.action, event.time)
            elif isinstance(event, StopRequested):
                log.warning("stop_requested", signal=signal.Signals(event.signal).name)
                budget = self.config.agent.stop_budget_s
                return self.drain("stop-request", _utcnow().timestamp() + budget)
            elif isinstance(event, SupervisorDone):
                return self._trainer_done(event.result)

    # -- endings --------------------------------------------------------------------------

    def _trainer_done(self, result: SupervisorResult) -> int:
        if result.outcome is SupervisorOutcome.FINISHED:
            return self.finish(completion=result.completion)
        if result.outcome is SupervisorOutcome.PREEMPTED:  # stopped without a drain: treat as one
            return self.drain("trainer-stopped", _utcnow().timestamp())
        return self.fail(result)

    def drain(self, action: str, notice_time: datetime | float, *, keep_volume: bool | None = None) -> int:
        """Checkpoint and stop the trainer inside the notice, then hand the volume on, or keep
        it attached (``keep_volume``; by default for a stop or hibernate notice)."""
        when = notice_time if isinstance(notice_time, datetime) else datetime.fromtimestamp(
            notice_time, timezone.utc)
        reserve = self.config.trainer.drain_reserve_s
        trainer_s = max(MIN_TRAINER_DRAIN_S, (when - _utcnow()).total_seconds() - reserve)
        self.interruptions += 1
        # SIGTERM first: the phase's bookkeeping (state file, a tag call to EC2) must not
        # come out of the trainer's share of the notice.
        self.supervisor.request_stop()
        self.transition(Phase.DRAINING, action=action, notice_time=_iso(when),
                        trainer_budget_s=round(trainer_s, 1))
        started = self.clock()
        result = self.supervisor.drain(self.clock() + trainer_s, clock=self.clock,
                                       kick=self.notifier.kick,
                                       kick_every_s=self.notifier.kick_every_s)
        progress = self.progress()
        log.info("trainer_drained", outcome=result.outcome.value, killed=result.killed,
                 seconds=round(self.clock() - started, 3), reached_step=progress.get("global_step"),
                 **self.latest_checkpoint())
        self._record_tags({T.INTERRUPTIONS: self._interruptions_total(),
                           **({T.PROGRESS: progressmod.progress_tag(progress)} if progress else {})}, force=True)
        if action in ("stop", "hibernate") if keep_volume is None else keep_volume:
            self.volumes.unmount_in_place()  # a stopped or rebooted instance keeps its EBS volumes
            self.transition(Phase.STOPPED)
        else:
            self.volumes.release(final_tags={T.PHASE: Phase.RELEASED.value})
            self.transition(Phase.RELEASED, tagged_on_release=True,
                            drain_s=round(self.clock() - started, 3))
        # After the volume is handed on: a slow CloudWatch never eats the drain's budget.
        self._publish_metrics(progress, force=True)
        # No STOPPING=1 here (only on a stop signal): systemd would take the unit for
        # deactivating and a later `systemctl stop` (the shutdown after the notice) would send
        # no SIGTERM at all.
        return 0

    def _interruptions_total(self) -> str:
        """Interruptions of the whole job: the volume's count (kept across instances) + 1."""
        for volume in self.volumes.job_volumes():
            if volume["VolumeId"] == self.volume_id:
                previous = T.as_dict(volume.get("Tags")).get(T.INTERRUPTIONS, "0")
                return str(int(previous) + 1 if previous.isdigit() else 1)
        return "1"

    def finish(self, *, already_complete: bool = False, completion: dict | None = None) -> int:
        """Completion record durable → unmount/release → done on the tags and in the state file
        → cancel the fleet, last. ``completion``: the trainer's own record, kept in ours."""
        self.transition(Phase.FINISHING, already_complete=already_complete)
        if self.supervisor is not None:  # the last point of the curve, while the volume is here
            self._publish_metrics(self.progress(), force=True)
        record_path = self.config.mount_point / COMPLETION_RECORD
        metrics: dict = {}
        if self.volume_id is not None and not already_complete:
            metrics_path = self.config.checkpoints_path / "final_metrics.json"
            try:
                metrics = json.loads(metrics_path.read_text())
            except (OSError, ValueError):
                pass
            if not metrics and isinstance((completion or {}).get("metrics"), dict):
                metrics = completion["metrics"]
            record = {"time": _iso(_utcnow()), "commit": self.commit,
                      "instance_id": self.identity.instance_id, "metrics": metrics}
            if completion is not None:
                record["trainer"] = completion
            write_json_atomic(record_path, record)
            log.info("completion_recorded", path=str(record_path), metrics=metrics,
                     trainer_record=completion is not None)
        done: dict[str, str] | None = None
        if self.volumes is not None:
            done = {T.COMPLETED: _iso(_utcnow())}
            if metrics:
                done[T.RESULT] = json.dumps(metrics, separators=(",", ":"), default=str)[:T.MAX_VALUE]
            # Done on the tags while the lease is still ours; then nobody needs to write them.
            self.volumes.release(snapshot=False, finished=True,
                                 final_tags=self._with_held({T.PHASE: Phase.DONE.value, **done}))
        self.final = {"completed": done[T.COMPLETED] if done else True}
        self.transition(Phase.DONE, tagged_on_release=done is not None)
        self._cancel_fleet(self.identity.launched_by)
        return 0

    def fail(self, result: SupervisorResult) -> int:
        """The reason and the failed phase on the tags and in the state file → release → cancel
        (policy "cancel"), last: the cancel terminates this instance, and with it this code."""
        reason = (result.reason or "trainer gave up")[:250]
        policy = self.config.trainer.failure_policy
        log.error("failure_policy", policy=policy, reason=reason, restarts=result.restarts)
        self.final = {"failure": reason, "failure_policy": policy}
        self.transition(Phase.FAILED, tags={T.FAILURE: reason}, reason=reason, policy=policy)
        self.volumes.release(snapshot=False, finished=True)
        if policy == "cancel":
            self._cancel_fleet(self.identity.launched_by)
        return 0

    def _safe_point(self, where: str, *, look: bool = False) -> None:
        self.notifier.kick()  # called between the polls of every volume and snapshot wait
        super()._safe_point(where, look=look)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """After a drain or the end: stay up (systemd sees us alive) until stopped or killed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.notifier.kick()
            step = self.notifier.kick_every_s or STATUS_INTERVAL_S
            if deadline is not None:
                step = min(step, max(0.0, deadline - time.monotonic()))
            if self._stop_event.wait(step):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False


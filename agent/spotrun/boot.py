"""Before training: a notice while the agent identifies, acquires (perhaps migrates) the
job's volume or checks out the code.

Metadata is watched from boot (:meth:`spotrun.lifecycle.Lifecycle.run` starts the monitor
before identifying), so a notice is seen at once, not after those phases end. Nothing is
checkpointed before training, so there is no trainer to drain: the phase stops at its next
*safe point* — a place where the migration journal on EC2 is consistent (the step's tags are
written, no call half made) — and what is held is given back as a drain would. The safe
points (:meth:`Watch.check`) are: after identify; at the start of each volume plan; in a
migration after the snapshot is requested, between polls of the snapshot and new-volume
waits and after the new volume is available; before attach; after attach + mount; after
the acquire; after the checkout. Nothing is deleted half-way: an interrupted migration stays
in its journaled state and the next instance continues it (:mod:`spotrun.migration`).
"""
from __future__ import annotations

import queue
import signal as signalmod
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from spotrun import tags as T
from spotrun.crashpoints import pausepoint
from spotrun.log import bind, get_logger
from spotrun.maintenance import MaintenanceDue, MaintenancePlan, called_off
from spotrun.monitor import SPOT_PATH, Maintenance, Rebalance, SpotNotice
from spotrun.phases import Phase

log = get_logger("lifecycle")

COMPLETION_RECORD = ".spotrun-completed.json"


@dataclass(frozen=True)
class StopRequested:
    """SIGTERM/SIGINT to the agent (systemctl stop, shutdown): drain like a notice."""

    signal: int


@dataclass(frozen=True)
class Reason:
    """Why the instance is going: what a drain needs to know."""

    action: str  # terminate, stop, hibernate, stop-request, or the maintenance drain's action
    time: datetime
    keep_volume: bool  # a stop/hibernate/reboot keeps its EBS volumes attached
    cause: str  # the log event that announced it
    event_id: str | None = None  # the scheduled event a maintenance drain is for


class Interrupted(Exception):
    """Raised only at a safe point (see the module docstring), never inside a step."""

    def __init__(self, where: str, reason: Reason):
        super().__init__(f"{reason.cause} ({reason.action}) at {where}")
        self.where = where
        self.reason = reason


class Watch:
    """The lifecycle's events before training: ``check(where)`` takes in what the monitor
    queued and raises :class:`Interrupted` once one asks the instance to go."""

    def __init__(self, events: queue.Queue, maintenance: MaintenancePlan):
        self.events = events
        self.maintenance = maintenance
        self.pending: Reason | None = None

    def check(self, where: str) -> None:
        while self.pending is None:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            self.pending = self._reason(event)
        if self.pending is not None:
            raise Interrupted(where, self.pending)

    def _reason(self, event: object) -> Reason | None:
        now = datetime.now(timezone.utc)
        if isinstance(event, SpotNotice):
            return Reason(event.action, event.time, event.action in ("stop", "hibernate"),
                          "interruption_notice")
        if isinstance(event, StopRequested):
            log.warning("stop_requested", signal=signalmod.Signals(event.signal).name)
            return Reason("stop-request", now, False, "stop_requested")
        if isinstance(event, Maintenance):
            self.maintenance.update(event)
        elif isinstance(event, MaintenanceDue) and self.maintenance.is_current(event):
            return Reason(event.action, event.time, event.keep_volume, "maintenance_due",
                          event.event_id)
        elif isinstance(event, Rebalance):
            # Nothing is checkpointed yet: the trainer starts from the volume's latest anyway.
            log.warning("rebalance_recommendation", notice_time=str(event.notice_time),
                        checkpoint_requested=False, reason="before training: nothing to checkpoint")
        return None


class Tap:
    """``events`` as :func:`spotrun.maintenance.called_off` reads it, with every scheduled
    event also handed to the maintenance plan (which lives as long as the monitor)."""

    def __init__(self, events: queue.Queue, on_maintenance: Callable[[Maintenance], None]):
        self._events = events
        self._on = on_maintenance

    def get(self, timeout: float | None = None):
        event = self._events.get(timeout=timeout)
        if isinstance(event, Maintenance):
            self._on(event)
        return event


def stop_before_training(lc, stop: Interrupted) -> None:
    """Give back what the interrupted phase holds, record it, and end RELEASED (STOPPED for a
    stop/hibernate/reboot). The lease is released too: at a safe point the journal is
    consistent, so the next instance may continue at once rather than after the takeover
    window. A migration is left as journaled (its copy detached, its source untouched)."""
    reason, phase = stop.reason, lc.phase
    log.warning("reported", what="interrupted_before_training", cause=reason.cause,
                interrupted_phase=phase.value, at=stop.where, action=reason.action,
                notice_time=reason.time.isoformat(), keep_volume=reason.keep_volume)
    lc.interruptions += 1
    lc.transition(Phase.DRAINING, action=reason.action, interrupted_phase=phase.value, at=stop.where)
    lease = getattr(lc.volumes, "lease", None)
    if phase is Phase.IDENTIFYING and lease is not None and lease.generation is not None:
        # A sweep's experiment, its lease claimed before this lifecycle began: let the claim
        # go as a stopped acquire does (spotrun.volumes), so another instance may claim it
        # at once -- unless the job's volume is attached here (an agent restarted in the
        # middle of it): that is given back below, as after an acquire.
        lc.volumes.let_go_of_lease_unless_attached()
    holds = lc.volumes is not None and (
        phase is not Phase.IDENTIFYING or (lease is not None and lease.generation is not None))
    if holds and lc.volume_id is not None:  # acquired: the volume is ours to tag, as a drain does
        lc._record_tags({T.INTERRUPTIONS: lc._interruptions_total()}, force=True)
    if holds and reason.keep_volume:
        lc.volumes.unmount_in_place()
    released_ours = holds and not reason.keep_volume and lc.volume_id is not None
    # An acquire stopped with nothing attached has let its lease go already: released once.
    if holds and not reason.keep_volume and (lease is None or lease.generation is not None):
        # The drain snapshot only of the job's proven volume: an unfinished copy is not one.
        # The phase goes on its tags while the lease is still held (see Lifecycle.drain).
        lc.volumes.release(snapshot=None if released_ours else False,
                           final_tags={T.PHASE: Phase.RELEASED.value} if released_ours else None)
    lc.transition(Phase.STOPPED if reason.keep_volume else Phase.RELEASED,
                  interrupted_phase=phase.value, tagged_on_release=released_ours)


class Boot:
    """The lifecycle's phases before training (a part of :class:`spotrun.lifecycle.Lifecycle`)."""

    def _boot(self) -> int:
        try:
            pausepoint("identify.started")
            self.identity = self._identify()
            bind(**self.identity.log_context())
            self.volumes = self._volume_manager(self.identity)
            self._safe_point("identify.done")
            if self._completed_by_tags():
                return self.finish(already_complete=True)
            self.transition(Phase.ACQUIRING)
            pausepoint("acquire.started")
            return self._acquire_and_train()
        except Interrupted as stop:
            return self._stopped_before_training(stop)

    def _acquire_and_train(self, commit: str | None = None) -> int:
        """ACQUIRING → CHECKING_OUT (``commit``: checked out already) → training."""
        if hasattr(self.volumes, "safe_point"):
            self.volumes.safe_point = self._safe_point
        self.volume_id = self.volumes.acquire().volume_id
        bind(volume_id=self.volume_id)
        if (self.config.mount_point / COMPLETION_RECORD).exists():
            return self.finish(already_complete=True)
        self._safe_point("acquire.done")
        self.transition(Phase.CHECKING_OUT, **({"commit": commit} if commit else {}))
        if commit is None:
            pausepoint("checkout.started")
            self.commit = self._checkout(self.identity)
            self._record_tags({T.COMMIT: self.commit, T.FAILURE: "-"}, force=True)
        # A last look at the notice path itself: a notice the monitor has yet to read must
        # not start a trainer only to drain it (one metadata request per boot).
        self._safe_point("checkout.done", look=True)
        return self.train()

    def _safe_point(self, where: str, *, look: bool = False) -> None:
        """Raises Interrupted if a notice (or a due maintenance, or a stop) came in."""
        if self.watch is None:
            return
        poll = getattr(self._monitor, "poll_path", None)
        if look and poll is not None:
            try:
                for event in poll(SPOT_PATH)[0]:  # what it has not handed on before
                    self.events.put(event)
            except Exception as exc:  # noqa: BLE001 - the monitor's thread reads it anyway
                log.warning("notice_look_failed", error=str(exc)[:200])
        self.watch.check(where)

    def _stopped_before_training(self, stop: Interrupted) -> int:
        stop_before_training(self, stop)
        event_id = stop.reason.event_id
        # Drained for scheduled maintenance that is then called off: take the volume back.
        if event_id is not None and self._called_off(event_id):
            self.transition(Phase.ACQUIRING, resumed_after=self.phase.value)
            try:
                return self._acquire_and_train(self.commit)
            except Interrupted as again:
                return self._stopped_before_training(again)
        return 0

    def _watch(self) -> bool:
        """Start the monitor (and the maintenance plan it feeds) unless it runs; True if
        this call started it."""
        if self._monitor is not None:
            return False
        self._monitor = self._monitor_factory(self.events.put)
        self.maintenance = MaintenancePlan(self.events.put, self.config.agent.maintenance_lead_s)
        self.watch = Watch(self.events, self.maintenance)
        self._monitor.start()
        return True

    def _unwatch(self) -> None:
        monitor, self._monitor, self.watch = self._monitor, None, None
        if self.maintenance is not None:
            self.maintenance.close()
        if monitor is not None:
            monitor.stop()

    def _called_off(self, event_id: str) -> bool:
        return called_off(Tap(self.events, self.maintenance.update), event_id,
                          self.config.agent.maintenance_lead_s, self._stop_event,
                          tick=lambda: self.notifier.status(self.status_line()))

    def _completed_by_tags(self) -> bool:
        for volume in self.volumes.job_volumes():
            if T.as_dict(volume.get("Tags")).get(T.COMPLETED):
                self.volume_id = volume["VolumeId"]
                log.info("job_already_completed", volume_id=self.volume_id)
                return True
        return False


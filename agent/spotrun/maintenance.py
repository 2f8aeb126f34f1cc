"""Scheduled maintenance → a drain at the right time, of the right kind, or none at all.

What each event code means (EC2 User Guide, "Scheduled events for your instances"; API
``InstanceStatusEvent.code``):

- ``instance-stop``: the instance is stopped at the scheduled time and migrated to a new host
  when started; ``instance-retirement``: stopped (EBS-backed) or terminated (instance store).
  Either way it may never run this job again (a fleet replaces it): drain and release the
  volume, as for a termination notice, so the replacement can take it.
- ``instance-reboot`` (the instance) / ``system-reboot`` (its host): it comes back within
  minutes, EBS attached, and the agent starts again on boot: checkpoint and unmount, and keep
  the volume attached, as for a stop notice.
- ``system-maintenance``: network or power maintenance; the instance may be briefly
  unreachable and keeps running. No drain, unless its description says the instance stops or
  is retired (drain and release) or is rebooted / loses power (as a reboot).

An event announced again with a new NotBefore (rescheduled) moves its drain; one canceled,
completed or no longer listed disarms it. A timer that already fired hands on a
:class:`MaintenanceDue` with its generation; the lifecycle acts only on the current one, so a
drain queued just before the cancel is dropped too.
"""
from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from spotrun.log import get_logger
from spotrun.monitor import Maintenance, SpotNotice

log = get_logger("maintenance")

REBOOT_CODES = ("instance-reboot", "system-reboot")
STOP_CODES = ("instance-stop", "instance-retirement")
NO_DRAIN_CODES = ("system-maintenance",)
_STOP_WORDS = ("stop", "retire", "terminat")
_REBOOT_WORDS = ("reboot", "restart", "power")


@dataclass(frozen=True)
class MaintenanceDue:
    """Time to drain for scheduled event ``event_id`` (only if ``generation`` is still armed)."""

    event_id: str
    generation: int
    action: str
    keep_volume: bool
    time: datetime


def drain_kind(event: Maintenance) -> tuple[str, bool] | None:
    """(the drain's action, whether the volume stays attached), or None: no drain."""
    code = event.code
    if code in REBOOT_CODES:
        return code, True
    if code in STOP_CODES:
        return code, False
    if code in NO_DRAIN_CODES:
        text = event.description.lower()
        if any(word in text for word in _STOP_WORDS):
            return code, False
        if any(word in text for word in _REBOOT_WORDS):
            return code, True
        return None
    # A code this agent does not know: the instance may go; the safe drain releases.
    log.warning("maintenance_code_unknown", code=code, event_id=event.event_id)
    return code or "maintenance", False


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class MaintenancePlan:
    """One drain timer per scheduled event, moved or disarmed as the event changes."""

    def __init__(self, put: Callable[[object], None], lead_s: float,
                 now: Callable[[], datetime] = _utcnow):
        self._put = put
        self._lead_s = lead_s
        self._now = now
        self._lock = threading.Lock()
        self._armed: dict[str, tuple[int, threading.Timer]] = {}
        self._generations = itertools.count(1)

    def update(self, event: Maintenance) -> None:
        if not event.active:
            if self._disarm(event.event_id):
                log.warning("maintenance_disarmed", event_id=event.event_id, code=event.code,
                            state=event.state)
            return
        kind = drain_kind(event)
        if kind is None:
            self._disarm(event.event_id)
            log.warning("maintenance_no_drain", event_id=event.event_id, code=event.code,
                        description=event.description, not_before=event.not_before.isoformat())
            return
        action, keep_volume = kind
        delay = max(0.0, (event.not_before - self._now()).total_seconds() - self._lead_s)
        with self._lock:
            previous = self._armed.pop(event.event_id, None)
            if previous is not None:
                previous[1].cancel()
            generation = next(self._generations)
            timer = threading.Timer(delay, self._put, args=(MaintenanceDue(
                event.event_id, generation, action, keep_volume, event.not_before),))
            timer.daemon = True
            self._armed[event.event_id] = (generation, timer)
            timer.start()
        log.warning("maintenance_rescheduled" if previous else "maintenance_scheduled",
                    event_id=event.event_id, code=event.code, not_before=event.not_before.isoformat(),
                    keep_volume=keep_volume, drain_in_s=round(delay, 1))

    def is_current(self, due: MaintenanceDue) -> bool:
        with self._lock:
            armed = self._armed.get(due.event_id)
        return armed is not None and armed[0] == due.generation

    def armed(self) -> list[str]:
        with self._lock:
            return sorted(self._armed)

    def _disarm(self, event_id: str) -> bool:
        with self._lock:
            armed = self._armed.pop(event_id, None)
        if armed is not None:
            armed[1].cancel()
        return armed is not None

    def close(self) -> None:
        with self._lock:
            armed, self._armed = list(self._armed.values()), {}
        for _, timer in armed:
            timer.cancel()


def called_off(events: queue.Queue, event_id: str, lead_s: float, stopping: threading.Event,
               tick: Callable[[], None], tick_s: float = 5.0) -> bool:
    """After a drain for scheduled event ``event_id``, with the monitor still watching: True
    once the event is called off (canceled, completed or no longer listed while this instance
    runs on, or moved beyond the drain's lead): take the volume back and train on. False once
    the instance is going after all (a notice, the agent stopped): stay drained."""
    while not stopping.is_set():
        try:
            event = events.get(timeout=tick_s)
        except queue.Empty:
            tick()
            continue
        if isinstance(event, SpotNotice) or type(event).__name__ == "StopRequested":
            return False
        if isinstance(event, Maintenance) and event.event_id == event_id:
            later = (event.not_before - _utcnow()).total_seconds() > lead_s
            if not event.active or later:
                log.warning("maintenance_called_off", event_id=event_id, state=event.state,
                            not_before=event.not_before.isoformat())
                return True
    return False

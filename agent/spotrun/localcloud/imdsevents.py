"""Scheduled events as the metadata service lists them (EC2 User Guide, "Scheduled events
for your instances"): ``meta-data/events/maintenance/scheduled`` holds the active ones,
``.../history`` the completed or canceled ones, with ``State`` "completed"/"canceled" and
the description prefixed ``[Completed]``/``[Canceled]``. A rescheduled event keeps its
``EventId`` and gets a new ``NotBefore``/``NotAfter``.

Independent services differ on one point: whether an ended event leaves the scheduled list
at once or stays listed there for a while with its new state. ``listed=True`` on
:meth:`ScheduledEvents.cancel` / :meth:`ScheduledEvents.complete` gives the second form, so
the agent is tested against both.
"""
from __future__ import annotations

import secrets
import threading
from datetime import datetime, timezone

# The codes EC2 documents (API InstanceStatusEvent.code).
EVENT_CODES = ("instance-reboot", "system-reboot", "system-maintenance", "instance-retirement",
               "instance-stop")
DEFAULT_DESCRIPTIONS = {
    "instance-reboot": "scheduled reboot",
    "system-reboot": "scheduled reboot",
    "system-maintenance": "scheduled network maintenance",
    "instance-retirement": "The instance is running on degraded hardware",
    "instance-stop": "The instance is running on degraded hardware",
}
_ENDED = {"canceled": "[Canceled] ", "completed": "[Completed] "}


def _utc(when: datetime) -> datetime:
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def maintenance_time(when: datetime) -> str:
    """AWS's scheduled-events format: ``21 Jan 2019 09:00:43 GMT``."""
    return _utc(when).strftime("%d %b %Y %H:%M:%S GMT")


class ScheduledEvents:
    """The scheduled and history lists of one instance (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.scheduled: list[dict[str, str]] = []
        self.history: list[dict[str, str]] = []

    def lists(self) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        with self._lock:
            return [dict(e) for e in self.scheduled], [dict(e) for e in self.history]

    def active_ids(self) -> list[str]:
        with self._lock:
            return [e["EventId"] for e in self.scheduled if e["State"] == "active"]

    def add(self, code: str, not_before: datetime | None, not_after: datetime | None,
            description: str | None, event_id: str | None) -> dict[str, str]:
        if code not in EVENT_CODES:
            raise ValueError(f"code must be one of {', '.join(EVENT_CODES)}, not {code!r}")
        not_before = _utc(not_before or datetime.now(timezone.utc))
        not_after = _utc(not_after or not_before)
        if not_after < not_before:
            raise ValueError("not_after is before not_before")
        entry = {"NotBefore": maintenance_time(not_before), "Code": code,
                 "Description": description or DEFAULT_DESCRIPTIONS[code],
                 "EventId": event_id or f"instance-event-{secrets.token_hex(9)[:17]}",
                 "NotAfter": maintenance_time(not_after), "State": "active"}
        with self._lock:
            if any(e["EventId"] == entry["EventId"] for e in self.scheduled):
                raise ValueError(f"event {entry['EventId']} is already scheduled")
            self.scheduled.append(entry)
        return dict(entry)

    def _find(self, event_id: str) -> dict[str, str]:
        for entry in self.scheduled:
            if entry["EventId"] == event_id and entry["State"] == "active":
                return entry
        raise KeyError(f"no active scheduled event {event_id}")

    def reschedule(self, event_id: str, not_before: datetime,
                   not_after: datetime | None = None) -> dict[str, str]:
        not_before = _utc(not_before)
        not_after = _utc(not_after or not_before)
        if not_after < not_before:
            raise ValueError("not_after is before not_before")
        with self._lock:
            entry = self._find(event_id)
            entry["NotBefore"], entry["NotAfter"] = (maintenance_time(not_before),
                                                     maintenance_time(not_after))
            return dict(entry)

    def end(self, event_id: str, state: str, listed: bool = False) -> dict[str, str]:
        """``state``: "canceled" or "completed"; ``listed``: it stays in the scheduled list."""
        prefix = _ENDED[state]
        with self._lock:
            entry = self._find(event_id)
            ended = {**entry, "State": state, "Description": prefix + entry["Description"]}
            self.scheduled.remove(entry)
            if listed:
                self.scheduled.append(dict(ended))
            self.history.append(ended)
            return dict(ended)

    def cancel_all(self) -> None:
        for event_id in self.active_ids():
            try:
                self.end(event_id, "canceled")
            except KeyError:  # ended meanwhile
                pass
        with self._lock:
            self.scheduled = []

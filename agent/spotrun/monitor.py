"""Watches instance metadata for spot interruption notices, rebalance recommendations and
scheduled maintenance, and hands each new one to a callback exactly once.

Each path is watched by its own thread on its own schedule, and what a path says is handed
on as soon as its answer arrives: a slow or hanging answer on one path never holds back
another's. The interruption notice (two minutes, most of them needed by the drain) is asked
for every 0.25 s by default; a rebalance recommendation every 2 s; scheduled maintenance
(announced days ahead) every 5 s: 4.7 requests a second in all, inside the service's
per-instance limit and the agent's goal of at most 5 at idle (``[metadata]`` config keys
``notice_poll_interval_s``, ``poll_interval_s``, ``maintenance_poll_interval_s``).

Scheduled events are followed, not only announced: a new or rescheduled event (same
EventId, new NotBefore) is a :class:`Maintenance` with state "active"; one this monitor
announced that is then canceled or completed (``State``, or the ``[Canceled]``/``[Completed]``
description prefix AWS gives it) or no longer listed is announced again with that state
("canceled", "completed", "gone"), so whoever armed a drain for it can disarm it.

Outages (refused, 5xx, timeouts) are expected — the service can hiccup while the instance is
being reclaimed. They are logged once when they begin (a first path gets no answer) and once
when they end (every path answers again); a path whose read ran long is read again at once.
A malformed answer is a warning naming the path (once per distinct answer), never the end of
monitoring.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable, Union

from spotrun.imds import MetadataError, MetadataUnavailable
from spotrun.log import get_logger

if TYPE_CHECKING:  # pragma: no cover
    from spotrun.imds import MetadataClient

log = get_logger("monitor")

SPOT_PATH = "meta-data/spot/instance-action"
REBALANCE_PATH = "meta-data/events/recommendations/rebalance"
MAINTENANCE_PATH = "meta-data/events/maintenance/scheduled"
SPOT_ACTIONS = ("terminate", "stop", "hibernate")
# Defaults of the [metadata] config keys (seconds between reads of each path).
NOTICE_INTERVAL_S = 0.25
REBALANCE_INTERVAL_S = 2.0
MAINTENANCE_INTERVAL_S = 5.0
# AWS marks an ended scheduled event by its State and by a prefix on its description.
_ENDED_PREFIXES = {"[Canceled]": "canceled", "[Completed]": "completed"}


@dataclass(frozen=True)
class SpotNotice:
    """The spot interruption notice: ``action`` (terminate, stop, hibernate) at ``time``."""

    action: str
    time: datetime


@dataclass(frozen=True)
class Rebalance:
    """A rebalance recommendation: elevated risk of interruption; checkpoint early."""

    notice_time: datetime


@dataclass(frozen=True)
class Maintenance:
    """A scheduled event (system-reboot, instance-stop, instance-retirement, ...); ``state``
    "active" when announced or rescheduled, then "canceled", "completed" or "gone"."""

    event_id: str
    code: str
    not_before: datetime
    not_after: datetime | None
    description: str
    state: str = "active"

    @property
    def active(self) -> bool:
        return self.state == "active"


Event = Union[SpotNotice, Rebalance, Maintenance]


class _Malformed(ValueError):
    pass


def parse_time(text: object, field: str) -> datetime:
    """ISO 8601 (``2024-01-01T00:00:00Z``) or the scheduled-events form (``21 Jan 2019 09:00:43 GMT``)."""
    if not isinstance(text, str) or not text:
        raise _Malformed(f"{field} is missing or not a string")
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            when = datetime.strptime(text.replace(" UTC", " GMT"), "%d %b %Y %H:%M:%S GMT")
        except ValueError:
            raise _Malformed(f"{field} {text!r} is not a time") from None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


def _spot(doc: object) -> list[Event]:
    if not isinstance(doc, dict):
        raise _Malformed("expected a JSON object")
    action = doc.get("action")
    if not isinstance(action, str) or not action:
        raise _Malformed("action is missing")
    if action not in SPOT_ACTIONS:
        log.warning("spot_notice_unknown_action", path=SPOT_PATH, action=action)
    return [SpotNotice(action, parse_time(doc.get("time"), "time"))]


def _rebalance(doc: object) -> list[Event]:
    if not isinstance(doc, dict):
        raise _Malformed("expected a JSON object")
    return [Rebalance(parse_time(doc.get("noticeTime"), "noticeTime"))]


def _maintenance(doc: object) -> list[Event]:
    """Every listed event, with its state (active, canceled, completed)."""
    if not isinstance(doc, list):
        raise _Malformed("expected a JSON list")
    events: list[Event] = []
    for entry in doc:
        if not isinstance(entry, dict):
            raise _Malformed("expected a list of objects")
        event_id = entry.get("EventId")
        if not isinstance(event_id, str) or not event_id:
            raise _Malformed("EventId is missing")
        description = str(entry.get("Description", ""))
        state = str(entry.get("State", "active")).lower()
        for prefix, ended in _ENDED_PREFIXES.items():
            if description.startswith(prefix):
                state = ended
        not_after = parse_time(entry["NotAfter"], "NotAfter") if entry.get("NotAfter") else None
        events.append(Maintenance(event_id, str(entry.get("Code", "")),
                                  parse_time(entry.get("NotBefore"), "NotBefore"),
                                  not_after, description, state))
    return events


_PARSERS: dict[str, Callable[[object], list[Event]]] = {
    SPOT_PATH: _spot, REBALANCE_PATH: _rebalance, MAINTENANCE_PATH: _maintenance}


def _key(event: Event) -> tuple:
    return (type(event).__name__, *vars(event).values())


class InterruptionMonitor:
    """Watches the three paths; :meth:`poll_once` reads each once and returns what is new."""

    def __init__(self, client: "MetadataClient", *, poll_interval_s: float = REBALANCE_INTERVAL_S,
                 notice_interval_s: float | None = None, maintenance_interval_s: float | None = None,
                 on_event: Callable[[Event], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """``poll_interval_s``: rebalance; the notice is read at least as often (by default
        every 0.25 s), maintenance by default as often as rebalance."""
        notice = min(NOTICE_INTERVAL_S, poll_interval_s) if notice_interval_s is None else notice_interval_s
        maintenance = poll_interval_s if maintenance_interval_s is None else maintenance_interval_s
        self.intervals = {SPOT_PATH: notice, REBALANCE_PATH: poll_interval_s, MAINTENANCE_PATH: maintenance}
        for path, interval in self.intervals.items():
            if interval <= 0:
                raise ValueError(f"the poll interval of {path} must be greater than zero")
        self.client = client
        self.poll_interval_s = poll_interval_s
        self._on_event = on_event or (lambda event: None)
        self._clock = clock
        self._locks = {path: threading.Lock() for path in _PARSERS}
        self._state_lock = threading.Lock()
        self._seen: set[tuple] = set()
        self._announced: dict[str, Maintenance] = {}  # active scheduled events, by EventId
        self._warned: set[tuple[str, str]] = set()
        self._down: set[str] = set()
        self._outage_since: float | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.polls = 0

    @classmethod
    def from_config(cls, client: "MetadataClient", cfg, **kwargs) -> "InterruptionMonitor":
        """From the ``[metadata]`` section (:class:`spotrun.config.MetadataConfig`)."""
        return cls(client, poll_interval_s=cfg.poll_interval_s,
                   notice_interval_s=cfg.notice_poll_interval_s,
                   maintenance_interval_s=cfg.maintenance_poll_interval_s, **kwargs)

    @property
    def in_outage(self) -> bool:
        return self._outage_since is not None

    def poll_once(self) -> list[Event]:
        """Each path once, in turn (the notice first); stops at the first path without an answer."""
        self.polls += 1
        new: list[Event] = []
        for path in _PARSERS:
            events, answered = self.poll_path(path)
            new.extend(events)
            if not answered:
                break  # the service is down: the other paths would only wait for it too
        return new

    def poll_path(self, path: str) -> tuple[list[Event], bool]:
        """One read of ``path``: (the events not handed on before, whether it answered)."""
        with self._locks[path]:
            # A read never runs past a couple of its intervals (nor a few seconds, so that
            # stop() is prompt): the next read asks again.
            deadline = min(max(2 * self.intervals[path], 1.0), 4.0)
            try:
                text = self.client.get(path, deadline_s=deadline)
            except MetadataUnavailable as exc:
                self._path_down(path, exc)
                return [], False
            except MetadataError as exc:
                self._path_up(path)
                self._warn_once(path, str(exc), "metadata_error")
                return [], True
            self._path_up(path)
            try:
                events = _PARSERS[path](json.loads(text)) if text and text.strip() else []
            except (ValueError, KeyError) as exc:
                self._warn_once(path, text, "metadata_malformed", error=str(exc)[:200])
                return [], True
            # Scheduled events are followed by state (one may end, then come back); the
            # notice and the recommendation are handed on once per distinct content.
            maintenance = path == MAINTENANCE_PATH
            new = []
            for event in self._maintenance_changes(events) if maintenance else events:
                key = _key(event)
                with self._state_lock:
                    if key in self._seen and not maintenance:
                        continue
                    self._seen.add(key)
                new.append(event)
                log.warning("interruption_event", kind=type(event).__name__, path=path,
                            **{k: (v.isoformat() if isinstance(v, datetime) else v)
                               for k, v in vars(event).items()})
            return new, True

    def _maintenance_changes(self, listed: list[Event]) -> list[Event]:
        """New or rescheduled active events, and the end of each one announced before."""
        changes: list[Event] = []
        ids = set()
        for event in listed:
            assert isinstance(event, Maintenance)
            ids.add(event.event_id)
            before = self._announced.get(event.event_id)
            if event.active:
                if before != event:
                    self._announced[event.event_id] = event
                    changes.append(event)
            elif before is not None:
                del self._announced[event.event_id]
                changes.append(event)
        for event_id in [i for i in self._announced if i not in ids]:
            # Moved to the history (canceled or completed): no longer ours to prepare for.
            changes.append(replace(self._announced.pop(event_id), state="gone"))
        return changes

    def _path_down(self, path: str, exc: Exception) -> None:
        with self._state_lock:
            self._down.add(path)
            if self._outage_since is None:
                self._outage_since = self._clock()
                log.warning("metadata_outage_started", path=path, error=str(exc)[:300])

    def _path_up(self, path: str) -> None:
        with self._state_lock:
            self._down.discard(path)
            if self._outage_since is not None and not self._down:
                log.info("metadata_outage_ended", duration_s=round(self._clock() - self._outage_since, 3))
                self._outage_since = None

    def _warn_once(self, path: str, text: str, event: str, **fields) -> None:
        with self._state_lock:
            if (path, text) in self._warned:
                return
            self._warned.add((path, text))
        log.warning(event, path=path, **fields, **({} if "error" in fields else {"error": text[:300]}))

    # -- the threads, one per path --------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("the monitor is already running")
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._run, args=(path,), daemon=True,
                                          name=f"monitor-{path.rsplit('/', 1)[-1]}")
                         for path in _PARSERS]
        for thread in self._threads:
            thread.start()
        log.info("monitor_started", poll_interval_s=self.poll_interval_s,
                 intervals_s={path.rsplit("/", 1)[-1]: value for path, value in self.intervals.items()})

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        threads, self._threads = self._threads, []
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if threads:
            log.info("monitor_stopped", polls=self.polls)

    def _run(self, path: str) -> None:
        interval = self.intervals[path]
        next_read = self._clock()
        while not self._stopping.is_set():
            if path == SPOT_PATH:
                self.polls += 1
            try:
                events, _ = self.poll_path(path)
            except Exception:  # a bug must not silently end the watch for notices
                log.exception("monitor_poll_failed", path=path)
                events = []
            for event in events:  # at once: nothing else is waited for
                try:
                    self._on_event(event)
                except Exception:
                    log.exception("monitor_on_event_failed", kind=type(event).__name__)
            now = self._clock()
            # After a read that overran (an outage), the next one starts at once.
            next_read = max(next_read + interval, now)
            self._stopping.wait(next_read - now)

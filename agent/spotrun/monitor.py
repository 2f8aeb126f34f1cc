"""Watches instance metadata for spot interruption notices, rebalance recommendations and
scheduled maintenance, and hands each new one to a callback exactly once.

Polled every second by default: AWS suggests 5 s, but a notice gives only two minutes and
the drain needs most of them; three small GETs a second are far inside the metadata
service's per-instance rate limit. The notice path is asked first in every round.

Outages (refused, 5xx, timeouts) are expected — the service can hiccup while the instance is
being reclaimed. They are logged once when they begin and once when they end, and a round
that ran long is followed at once by the next, so a notice published during or just after
an outage is acted on within one poll interval of metadata coming back. A malformed answer
is a warning naming the path (once per distinct answer), never the end of monitoring.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
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
    """A scheduled event (system-reboot, instance-stop, instance-retirement, ...)."""

    event_id: str
    code: str
    not_before: datetime
    not_after: datetime | None
    description: str


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
    if not isinstance(doc, list):
        raise _Malformed("expected a JSON list")
    events: list[Event] = []
    for entry in doc:
        if not isinstance(entry, dict):
            raise _Malformed("expected a list of objects")
        if entry.get("State", "active") != "active":
            continue  # completed / canceled events stay listed for a while
        event_id = entry.get("EventId")
        if not isinstance(event_id, str) or not event_id:
            raise _Malformed("EventId is missing")
        not_after = parse_time(entry["NotAfter"], "NotAfter") if entry.get("NotAfter") else None
        events.append(Maintenance(event_id, str(entry.get("Code", "")), parse_time(entry.get("NotBefore"), "NotBefore"),
                                  not_after, str(entry.get("Description", ""))))
    return events


_SOURCES: tuple[tuple[str, Callable[[object], list[Event]]], ...] = (
    (SPOT_PATH, _spot), (REBALANCE_PATH, _rebalance), (MAINTENANCE_PATH, _maintenance))


def _key(event: Event) -> tuple:
    if isinstance(event, Maintenance):
        return ("maintenance", event.event_id, event.not_before)
    return (type(event).__name__, *vars(event).values())


class InterruptionMonitor:
    """Polls the three paths; :meth:`poll_once` returns the events not seen before."""

    def __init__(self, client: "MetadataClient", *, poll_interval_s: float = 1.0,
                 on_event: Callable[[Event], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be greater than zero")
        self.client = client
        self.poll_interval_s = poll_interval_s
        self._on_event = on_event or (lambda event: None)
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: set[tuple] = set()
        self._warned: set[tuple[str, str]] = set()
        self._outage_since: float | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0

    @property
    def in_outage(self) -> bool:
        return self._outage_since is not None

    def poll_once(self) -> list[Event]:
        with self._lock:
            self.polls += 1
            new: list[Event] = []
            for path, parse in _SOURCES:
                try:
                    # Never let one round wait past the poll interval: the next round asks again.
                    text = self.client.get(path, deadline_s=max(self.poll_interval_s, 0.2))
                except MetadataUnavailable as exc:
                    self._outage(exc, path)
                    return new  # the service is down: skip the other paths this round
                except MetadataError as exc:
                    self._outage_over()
                    self._warn_once(path, str(exc), "metadata_error")
                    continue
                self._outage_over()
                if text is None or not text.strip():
                    continue  # 404: nothing pending
                try:
                    events = parse(json.loads(text))
                except (ValueError, KeyError) as exc:
                    self._warn_once(path, text, "metadata_malformed", error=str(exc)[:200])
                    continue
                for event in events:
                    key = _key(event)
                    if key not in self._seen:
                        self._seen.add(key)
                        new.append(event)
                        log.warning("interruption_event", kind=type(event).__name__, path=path,
                                    **{k: (v.isoformat() if isinstance(v, datetime) else v)
                                       for k, v in vars(event).items()})
            return new

    def _outage(self, exc: Exception, path: str) -> None:
        if self._outage_since is None:
            self._outage_since = self._clock()
            log.warning("metadata_outage_started", path=path, error=str(exc)[:300])

    def _outage_over(self) -> None:
        if self._outage_since is not None:
            log.info("metadata_outage_ended", duration_s=round(self._clock() - self._outage_since, 3))
            self._outage_since = None

    def _warn_once(self, path: str, text: str, event: str, **fields) -> None:
        if (path, text) not in self._warned:
            self._warned.add((path, text))
            log.warning(event, path=path, **fields, **({} if "error" in fields else {"error": text[:300]}))

    # -- the thread -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the monitor is already running")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="interruption-monitor", daemon=True)
        self._thread.start()
        log.info("monitor_started", poll_interval_s=self.poll_interval_s)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            log.info("monitor_stopped", polls=self.polls)

    def _run(self) -> None:
        next_round = self._clock()
        while not self._stopping.is_set():
            try:
                events = self.poll_once()
            except Exception:  # a bug must not silently end the watch for notices
                log.exception("monitor_poll_failed")
                events = []
            for event in events:
                try:
                    self._on_event(event)
                except Exception:
                    log.exception("monitor_on_event_failed", kind=type(event).__name__)
            now = self._clock()
            # After a round that overran (an outage), the next one starts at once.
            next_round = max(next_round + self.poll_interval_s, now)
            self._stopping.wait(next_round - now)

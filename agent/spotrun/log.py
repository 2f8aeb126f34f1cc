"""Structured logging for journald: one JSON object per line, prefixed with ``<N>``.

systemd reads the ``<N>`` syslog priority prefix (SyslogLevelPrefix=yes, the default),
so ``journalctl -u spotrun-agent -p warning`` filters on it, and the JSON body keeps
stable keys (``event``, ``job``, ``instance_id``, ``volume_id``, ``phase``, ...).
Configured once per process by :func:`configure`; modules call :func:`get_logger`.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any, TextIO


def _import_structlog_without_rich():
    """structlog's package imports its console renderer, and that imports ``rich`` when it is
    installed (a development tool; the agent's .deb has none). This process only writes JSON
    lines, so rich (~5 MB resident, in every agent) is kept out as on an instance: a None in
    sys.modules makes structlog's ``import rich`` fail as if it were not installed. Only while
    structlog is first imported: a later ``import rich`` elsewhere works as usual."""
    if "structlog" in sys.modules or "rich" in sys.modules:
        import structlog
        return structlog
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog
    finally:
        del sys.modules["rich"]
    return structlog


structlog = _import_structlog_without_rich()

# syslog(3) priorities.
PRIORITY = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "warn": 4, "error": 3,
            "exception": 3, "critical": 2}
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

# Keys whose values are never written, whatever a caller passes.
_SECRET_KEY = re.compile(r"token|secret|password|passwd|credential|authorization|private_key|"
                         r"access_key|session_key", re.I)
# Values that look like AWS keys or bearer material, wherever they appear.
_SECRET_VALUE = re.compile(r"(AKIA|ASIA)[A-Z0-9]{16}|aws_secret_access_key\s*=\s*\S+", re.I)
REDACTED = "[redacted]"


def _redact(_logger: Any, _name: str, event_dict: dict) -> dict:
    for key in list(event_dict):
        if key != "event" and _SECRET_KEY.search(key):
            event_dict[key] = REDACTED
        elif isinstance(event_dict[key], str) and _SECRET_VALUE.search(event_dict[key]):
            event_dict[key] = _SECRET_VALUE.sub(REDACTED, event_dict[key])
    return event_dict


class _SyslogJSONRenderer:
    def __call__(self, _logger: Any, name: str, event_dict: dict) -> str:
        level = event_dict.get("level", name)
        prio = PRIORITY.get(level, 6)
        return f"<{prio}>" + json.dumps(event_dict, default=str, separators=(",", ":"))


class _Standard:
    """sys.stdout / sys.stderr as they are at each write (pytest and tools swap them)."""

    def __init__(self, name: str):
        self.name = name

    def write(self, text: str) -> int:
        return getattr(sys, self.name).write(text)

    def flush(self) -> None:
        getattr(sys, self.name).flush()


class _TrainerLibraryBridge(logging.Handler):
    """The trainer library's stdlib-logging events (the agent reads checkpoints with it) as
    this process's structured events, ``component`` ``trainer.<its component>``."""

    def emit(self, record: logging.LogRecord) -> None:
        fields = dict(getattr(record, "spotrun_fields", {}) or {})
        component = "trainer." + record.name.split(".", 1)[-1] if "." in record.name else "trainer"
        level = logging.getLevelName(record.levelno).lower()
        logger = structlog.get_logger(component=component)
        getattr(logger, level if level in _LEVELS else "info")(record.getMessage(), **fields)


def _route_trainer_library() -> None:
    library = logging.getLogger("spotrun_trainer")
    if not any(isinstance(h, _TrainerLibraryBridge) for h in library.handlers):
        library.handlers = [_TrainerLibraryBridge()]
    library.propagate = False
    library.setLevel(logging.INFO)


_configured = False


def configure(level: str = "info", stream: TextIO | None = None, **context: Any) -> None:
    """Set up structlog for this process; ``context`` is bound to every event (e.g. job=...)."""
    global _configured
    if stream is sys.stdout or stream is sys.stderr:
        stream = _Standard("stdout" if stream is sys.stdout else "stderr")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            _redact,
            _SyslogJSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        # No stream: sys.stdout as it is when each event is written (not when configured).
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    _route_trainer_library()
    structlog.contextvars.clear_contextvars()
    if context:
        structlog.contextvars.bind_contextvars(**context)
    _configured = True


def bind(**context: Any) -> None:
    """Add keys (instance_id, volume_id, phase, ...) to every later event of this process."""
    structlog.contextvars.bind_contextvars(**context)


def get_logger(component: str | None = None) -> structlog.typing.FilteringBoundLogger:
    if not _configured:
        configure()
    # Initial values keep structlog's proxy lazy: a module-level logger made at import time
    # still follows a later configure() (the CLI's --json, a test's captured stream).
    return structlog.get_logger(**({"component": component} if component else {}))

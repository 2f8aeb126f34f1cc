"""The trainer library's events, through the standard ``logging`` module with structured fields.

Every event is a record of the ``spotrun_trainer.<component>`` logger whose message is the
event name and whose ``spotrun_fields`` attribute holds the fields, so a user's own logging
configuration sees them like any other library's. Where they end up:

- **under the agent** (``$SPOTRUN_JOB_ID`` set): one JSON object per line on stderr, prefixed
  with the syslog priority (``<4>{"event":"checkpoint_corrupt",...}``), the agent's own format.
  The agent hands the trainer's output to journald with level prefixes honoured, so
  ``journalctl -u spotrun-agent -p warning`` shows the trainer's warnings too;
- **in the agent's own process** (it reads checkpoints): :mod:`spotrun.log` routes them into
  its structured log;
- **anywhere else**, when the application has configured no logging at all: one readable line
  per event on stderr (``spotrun_trainer: training_resumed epoch=3 ...``).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

ROOT = "spotrun_trainer"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
# syslog(3) priorities, as the agent writes them.
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
            logging.CRITICAL: 2}


def fields_of(record: logging.LogRecord) -> dict:
    return dict(getattr(record, "spotrun_fields", {}) or {})


class JournalLineFormatter(logging.Formatter):
    """``<prio>{"event": ..., "level": ..., "component": ..., fields...}``."""

    def format(self, record: logging.LogRecord) -> str:
        body = {"event": record.getMessage(), "level": record.levelname.lower(),
                "component": record.name.removeprefix(ROOT + ".") or "trainer",
                "pid": record.process, **fields_of(record)}
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        prio = PRIORITY.get(record.levelno, 6)
        return f"<{prio}>" + json.dumps(body, default=str, separators=(",", ":"))


class ReadableFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in fields_of(record).items())
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{ROOT}: {level}{record.getMessage()}" + (f" {fields}" if fields else "")


class _Stderr(logging.StreamHandler):
    """stderr as it is at each write (tests and notebooks swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


_installed: logging.Handler | None = None


def _ensure_output() -> None:
    """Give the library's events somewhere to go unless the application already decided."""
    global _installed
    root = logging.getLogger(ROOT)
    if _installed is not None or root.handlers:
        return
    if os.environ.get("SPOTRUN_JOB_ID"):
        handler: logging.Handler = _Stderr()
        handler.setFormatter(JournalLineFormatter())
        root.propagate = False  # one line per event, even if the script configured logging
    elif not logging.getLogger().handlers:
        handler = _Stderr()
        handler.setFormatter(ReadableFormatter())
    else:
        return  # the application configured logging: our records go to its handlers
    root.addHandler(handler)
    if root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    _installed = handler


def log_event(level: str, event: str, component: str = "trainer", **fields: Any) -> None:
    """Emit ``event`` with ``fields`` at ``level`` ("info", "warning", ...)."""
    _ensure_output()
    logging.getLogger(f"{ROOT}.{component}").log(
        LEVELS.get(level, logging.INFO), event, extra={"spotrun_fields": fields})

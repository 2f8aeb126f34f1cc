"""sd_notify(3): tell systemd we are ready, what we are doing, and that we are alive.

The protocol is a datagram of ``KEY=value`` lines to the socket named in
$NOTIFY_SOCKET (an abstract socket when it starts with '@'). No maintained pure-Python
library covers it (sdnotify is unmaintained since 2017; systemd-python needs
libsystemd headers to build), so the few lines live here. Outside systemd it is a no-op.

The watchdog (``WatchdogSec=`` in the unit, handed to us as $WATCHDOG_USEC) is kicked by the
agent's main thread from every loop and long wait (:meth:`Notifier.kick`), never by a timer
thread of its own: a timer would keep pinging while the main thread hangs, and a hung agent
holding the job's volume is what the watchdog is for. A step that blocks longer than the
watchdog allows, with a deadline of its own (a git clone), runs under
:meth:`Notifier.watchdog_stretched`.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Callable, Iterator


def _watchdog_s(environ) -> float | None:
    """$WATCHDOG_USEC in seconds, when it is meant for this process ($WATCHDOG_PID)."""
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


class Notifier:
    def __init__(self, address: str | None = None, *, watchdog_s: float | None = None,
                 environ=None, clock: Callable[[], float] = time.monotonic):
        environ = os.environ if environ is None else environ
        address = address if address is not None else environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        self._socket: socket.socket | None = None
        if self._address:
            # Made here, not on first send: send() runs in signal handlers too (STOPPING=1),
            # and a lazily made socket could then be made twice.
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_s = watchdog_s if watchdog_s is not None else _watchdog_s(environ)
        if not self._address:
            self.watchdog_s = None
        self._clock = clock
        self._last_kick = float("-inf")
        self._stretch_depth = 0
        self._stretch_lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str) -> bool:
        if not self._address or self._socket is None:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._socket.sendto(payload, self._address)
            return True
        except OSError:
            return False  # systemd gone (shutdown); never let this stop a drain

    def ready(self, status: str = "") -> bool:
        return self.send(READY="1", **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        return self.send(STATUS=text.replace("\n", " "))

    def stopping(self, status: str = "") -> bool:
        return self.send(STOPPING="1", **({"STATUS": status} if status else {}))

    # -- watchdog ---------------------------------------------------------------------------

    @property
    def kick_every_s(self) -> float | None:
        """How long a wait may block between two kicks (None: no watchdog). Half the
        interval, as sd_watchdog_enabled(3) advises: a kick may be skipped by the rate limit
        below, and the next one must still come in time."""
        return self.watchdog_s / 2 if self.watchdog_s else None

    def kick(self) -> bool:
        """WATCHDOG=1, at most once per quarter interval (callers kick from tight loops).
        A kick that arrives after a skipped one is at most a quarter + the caller's own gap
        late, so callers that kick at least every :attr:`kick_every_s` stay inside it."""
        if not self.watchdog_s:
            return False
        now = self._clock()
        if now - self._last_kick < self.watchdog_s / 4:
            return False
        self._last_kick = now
        return self.send(WATCHDOG="1")

    @contextlib.contextmanager
    def watchdog_stretched(self, seconds: float) -> Iterator[None]:
        """Run one bounded blocking step (its own deadline: ``seconds``) that cannot kick:
        the watchdog interval becomes ``seconds`` for it (WATCHDOG_USEC=, systemd >= 236),
        then goes back. A hang inside it is still caught, ``seconds`` later."""
        if not self.watchdog_s or seconds <= self.watchdog_s:
            yield
            return
        with self._stretch_lock:
            self._stretch_depth += 1
            outer = self._stretch_depth == 1
        if outer:
            self.send(WATCHDOG_USEC=str(int(seconds * 1_000_000)))
        try:
            yield
        finally:
            with self._stretch_lock:
                self._stretch_depth -= 1
                last = self._stretch_depth == 0
            if last:
                self.send(WATCHDOG_USEC=str(int(self.watchdog_s * 1_000_000)))
                self._last_kick = self._clock()
                self.send(WATCHDOG="1")


_process: Notifier | None = None
_process_lock = threading.Lock()


def process_notifier() -> Notifier:
    """The process's one notifier (from $NOTIFY_SOCKET / $WATCHDOG_USEC), shared by the
    lifecycle and the AWS clients' per-request kick."""
    global _process
    with _process_lock:
        if _process is None:
            _process = Notifier()
        return _process


def kick_from_main_thread(**_: object) -> None:
    """A botocore event handler: every AWS request (each retry too) the main thread makes
    proves it alive. Other threads' calls prove nothing about the main thread."""
    if threading.current_thread() is threading.main_thread():
        process_notifier().kick()

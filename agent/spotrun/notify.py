"""sd_notify(3): tell systemd we are ready, what we are doing, and that we are alive.

The protocol is a datagram of ``KEY=value`` lines to the socket named in
$NOTIFY_SOCKET (an abstract socket when it starts with '@'). No maintained pure-Python
library covers it (sdnotify is unmaintained since 2017; systemd-python needs
libsystemd headers to build), so the few lines live here. Outside systemd it is a no-op.
"""
from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None):
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str) -> bool:
        if not self._address:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
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

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    def extend_timeout(self, seconds: float) -> bool:
        return self.send(EXTEND_TIMEOUT_USEC=str(int(seconds * 1_000_000)))

"""The local cloud's HTTP servers (metadata, EC2 proxy, control API) share one base."""
from __future__ import annotations

import sys
from http.server import ThreadingHTTPServer


class LocalHTTPServer(ThreadingHTTPServer):
    """A threading server that treats a client hanging up as normal.

    Instances are killed mid-request all the time here (that is the point of a spot cloud);
    socketserver would print a traceback to stderr for each reset connection."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, TimeoutError)):
            return
        super().handle_error(request, client_address)

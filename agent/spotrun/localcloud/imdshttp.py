"""The metadata service's wire protocol: IMDSv2 token PUTs, token-checked GETs, the status
codes, headers and error pages EC2's IMDS answers with, and where injected faults bite
(see :mod:`spotrun.localcloud.imds` for the state behind it)."""
from __future__ import annotations

import re
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spotrun.localcloud.imds import MetadataServer

TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MIN_TTL, MAX_TTL = 1, 21600
# "/latest/..." or a dated API version "/2021-07-15/...".
VERSIONED = re.compile(r"^/(latest|\d{4}-\d{2}-\d{2})(/.*)?$")


def _html_error(status: int, reason: str) -> bytes:
    # EC2's IMDS answers errors with a small XHTML page, not JSON.
    return (f'<?xml version="1.0" encoding="iso-8859-1"?>\n'
            f'<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
            f'\t"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
            f'<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
            f' <head>\n  <title>{status} - {reason}</title>\n </head>\n'
            f' <body>\n  <h1>{status} - {reason}</h1>\n </body>\n</html>\n').encode()


class MetadataHandler(BaseHTTPRequestHandler):
    imds: MetadataServer

    def version_string(self) -> str:
        return "EC2ws"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # every request is not an event; injections and notable answers are

    def _send(self, status: int, body: bytes | str = b"", headers: dict[str, str] | None = None,
              content_type: str = "text/plain") -> None:
        if isinstance(body, str):
            body = body.encode()
        if status >= 400 and not body:
            body = _html_error(status, self.responses.get(status, ("Error",))[0])
            content_type = "text/html"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _faulted(self) -> bool:
        imds = self.imds
        imds.requests += 1
        path = self.path.split("?", 1)[0]
        # A fault aimed at one path bites only there (a GET's path; never the token PUT).
        aimed = self.command in ("GET", "HEAD")
        slow = imds._fault("slow") or (aimed and imds._path_fault("slow", path))
        if slow:
            imds._stopping.wait(slow[1])
        if imds._fault("5xx") or (aimed and imds._path_fault("5xx", path)):
            self._send(500)
            return True
        return False

    def do_PUT(self) -> None:
        if self._faulted():
            return
        path = self.path.split("?", 1)[0]
        if not re.match(r"^/(latest|\d{4}-\d{2}-\d{2})/api/token/?$", path):
            self._send(405 if VERSIONED.match(path) else 404)
            return
        imds = self.imds
        imds.token_puts += 1
        if not imds.token_endpoint:  # an IMDSv1-only service has no token endpoint
            self._send(404)
            return
        if self.headers.get("X-Forwarded-For") is not None:
            # Documented: IMDS refuses token PUTs that went through a proxy.
            self._send(403)
            return
        raw = (self.headers.get(TTL_HEADER) or "").strip()
        ttl = int(raw) if re.fullmatch(r"[0-9]{1,9}", raw) else None
        if ttl is None or not MIN_TTL <= ttl <= MAX_TTL:
            self._send(400)
            return
        if imds.token_ttl_cap is not None:  # the service may grant less than asked
            ttl = min(ttl, imds.token_ttl_cap)
        self._send(200, imds.issue_token(ttl), {TTL_HEADER: str(ttl)})

    def do_GET(self) -> None:
        if self._faulted():
            return
        imds = self.imds
        token = self.headers.get(TOKEN_HEADER)
        left = imds.token_ttl_left(token) if token is not None else None
        if imds._fault("401") or (token is not None and left is None) or (
                token is None and imds.require_token):
            self._send(401)
            return
        path = self.path.split("?", 1)[0]
        match = VERSIONED.match(path)
        imds.gets[(match.group(2) or "").strip("/") if match else path] += 1
        status, body = imds.resolve(path)
        headers = {TTL_HEADER: str(left)} if left is not None else {}
        self._send(status, body, headers)

    do_HEAD = do_GET

    def _not_allowed(self) -> None:
        if not self._faulted():
            self._send(405, headers={"Allow": "OPTIONS, GET, HEAD, PUT"})

    do_POST = do_DELETE = do_PATCH = _not_allowed

"""The local cloud's AWS endpoint: an HTTP proxy in front of moto's server.

Every request (EC2, DynamoDB, IAM, SSM, ... everything moto serves on its one port) is
forwarded to moto with the cloud's account header. EC2 requests (the query protocol:
a form body with ``Action=...``, signed for service ``ec2``) additionally pass through
the fault injector (faults.py) and the EBS overlay (overlay.py), which adds what EC2 does
and moto does not. A proxy built with ``faults=None`` never injects faults: checkers use it
to see the same (timed) state without the noise. Every answered request, of any service, is
written to the cloud's call ledger (ledger.py), the checker proxy's marked ``checker``.
"""
from __future__ import annotations

import http.client
import re
import threading
import time
from http.server import BaseHTTPRequestHandler

from spotrun.localcloud.httpserver import LocalHTTPServer
from typing import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit

from spotrun.localcloud.ec2xml import Ec2Response, error_response
from spotrun.localcloud.faults import FaultInjector
from spotrun.localcloud.ledger import Ledger
from spotrun.localcloud.motoserver import ACCOUNT_HEADER
from spotrun.localcloud.overlay import Ec2Overlay
from spotrun.localcloud.visibility import Visibility
from spotrun.log import get_logger

log = get_logger("localcloud.proxy")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
               "expect"}  # the proxy answered any 100-continue itself
_SERVICE = re.compile(r"Credential=[^/]*/[^/]*/[^/]*/([^/]+)/")
# What the overlay signs its own EC2 calls to moto with: moto routes on the service name
# and picks the region from the credential scope (it does not check signatures).
_EC2_AUTH = ("AWS4-HMAC-SHA256 Credential=testing/20260101/{region}/ec2/aws4_request, "
             "SignedHeaders=host, Signature=0")


class ConnectionDropped(Exception):
    """The fault plan says: close the client's connection without an answer."""


class MotoUpstream:
    """Plain HTTP to moto's server, with this cloud's account header."""

    def __init__(self, endpoint: str, account_id: str, region: str = "us-east-1"):
        parts = urlsplit(endpoint)
        self.host, self.port = parts.hostname, parts.port
        self.account_id = account_id
        self.region = region

    def send(self, method: str, path: str, headers: list[tuple[str, str]],
             body: bytes) -> Ec2Response:
        sent = [(k, v) for k, v in headers
                if k.lower() not in _HOP_BY_HOP and k.lower() != ACCOUNT_HEADER]
        sent += [(ACCOUNT_HEADER, self.account_id), ("Content-Length", str(len(body)))]
        connection = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            connection.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
            for key, value in sent:
                connection.putheader(key, value)
            connection.endheaders(body)
            answer = connection.getresponse()
            data = answer.read()
            headers = [(k, v) for k, v in answer.getheaders() if k.lower() not in _HOP_BY_HOP]
            return Ec2Response(answer.status, headers + [("Content-Length", str(len(data)))], data)
        finally:
            connection.close()

    def ec2(self, params: dict) -> Ec2Response:
        """One EC2 call straight to moto (no faults, no overlay)."""
        params = {"Version": "2016-11-15", **params}
        return self.send("POST", "/", [("Content-Type", "application/x-www-form-urlencoded"),
                                       ("Authorization", _EC2_AUTH.format(region=self.region))],
                         urlencode(params).encode())


class Ec2Proxy:
    def __init__(self, upstream: MotoUpstream, overlay: Ec2Overlay,
                 faults: FaultInjector | None, record_event: Callable[..., None],
                 host: str = "127.0.0.1", port: int = 0, ledger: Ledger | None = None):
        self.upstream, self.overlay, self.faults = upstream, overlay, faults
        self.ledger = ledger
        self.visibility = Visibility()
        self._record = record_event
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = LocalHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,),
                                        name="localcloud-proxy", daemon=True)
        address = self._server.server_address
        self.endpoint = f"http://{address[0]}:{address[1]}"

    def start(self) -> str:
        self._thread.start()
        log.info("proxy_started", endpoint=self.endpoint, faults=self.faults is not None)
        return self.endpoint

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def answer(self, method: str, path: str, headers: list[tuple[str, str]],
               body: bytes) -> Ec2Response:
        t0 = time.time()
        # What the ledger needs beyond the answer: the fault, and moto's answer if performed.
        outcome: dict = {"injected": None, "performed_answer": None}
        try:
            response = self._answer(method, path, headers, body, outcome)
        except ConnectionDropped:
            # Status 0: no answer reached the client; the ledger still says what was performed.
            self._write_ledger(method, path, headers, body, t0, outcome, Ec2Response(0, [], b""))
            raise
        except Exception as exc:
            self._write_ledger(method, path, headers, body, t0, outcome,
                               error_response(502, "InternalError", str(exc)))
            raise
        self._write_ledger(method, path, headers, body, t0, outcome, response)
        return response

    def _write_ledger(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes,
                      t0: float, outcome: dict, response: Ec2Response) -> None:
        if self.ledger is None:
            return
        try:
            self.ledger.record(method, path, headers, body, status=response.status,
                               answer=response.body, t0=t0, checker=self.faults is None,
                               **outcome)
        except Exception as exc:  # noqa: BLE001 - the client still gets its answer
            log.exception("ledger_write_failed", path=path)
            self._record("ledger_write_failed", error=str(exc))

    def _answer(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes,
                outcome: dict) -> Ec2Response:
        params = _ec2_params(headers, body)
        if params is None:
            return self.upstream.send(method, path, headers, body)
        action = params.get("Action", "")
        if self.faults is not None:
            fault = self.faults.before(action, params)
            if fault is not None:
                self._record("ec2_fault_injected", kind=fault.kind, action=action,
                             code=fault.code, http_status=fault.http_status)
                outcome["injected"] = {"kind": fault.kind, "performed": False}
                if fault.dropped:
                    raise ConnectionDropped(fault.message)
                return error_response(fault.http_status, fault.code, fault.message)
            refusal = self.visibility.refusal(action, params, headers)
            if refusal is not None:
                self._record("ec2_fault_injected", kind="not_found_after_create", action=action,
                             code="NotFound", http_status=400)
                outcome["injected"] = {"kind": "not_found_after_create", "performed": False}
                return refusal

        def forward(changed: dict) -> Ec2Response:
            if changed == params:
                return self.upstream.send(method, path, headers, body)
            return self.upstream.send(method, path, headers, urlencode(changed).encode())

        response = self.overlay.handle(action, params, forward)
        if self.faults is not None and response.status == 200:
            self.visibility.created(action, response, self.faults.plan.not_found_after_create_s)
            response = self.visibility.filtered(action, response)
            fault = self.faults.after(action)
            if fault is not None:
                self._record("ec2_fault_injected", kind=fault.kind, action=action,
                             code=fault.code, http_status=fault.http_status)
                outcome["injected"] = {"kind": fault.kind, "performed": True}
                outcome["performed_answer"] = response.body
                if fault.dropped:
                    raise ConnectionDropped(fault.message)
                return error_response(fault.http_status, fault.code, fault.message)
        return response


def _ec2_params(headers: list[tuple[str, str]], body: bytes) -> dict | None:
    lowered = {k.lower(): v for k, v in headers}
    if "x-www-form-urlencoded" not in lowered.get("content-type", ""):
        return None
    service = _SERVICE.search(lowered.get("authorization", ""))
    if service is None or service.group(1) != "ec2":
        return None
    params = dict(parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))
    return params if "Action" in params else None


class _Handler(BaseHTTPRequestHandler):
    owner: Ec2Proxy
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle and the client's
    # delayed ACK add ~40 ms to every answer.
    disable_nagle_algorithm = True

    def _relay(self) -> None:
        try:
            body = self._read_body()
            response = self.owner.answer(self.command, self.path, list(self.headers.items()), body)
        except ConnectionDropped:
            self.close_connection = True  # nothing written: the client sees the connection close
            return
        except Exception as exc:  # noqa: BLE001 - answer 502 rather than drop the connection
            log.exception("proxy_error", path=self.path)
            response = error_response(502, "InternalError", f"local cloud proxy: {exc}")
        self.send_response(response.status)
        for key, value in response.headers:
            if key.lower() not in _HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _relay

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass  # every request would flood the log; faults and transitions are logged instead

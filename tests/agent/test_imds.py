"""spotrun.imds over real HTTP against the local cloud's metadata emulator."""
from __future__ import annotations

import io
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from spotrun import log as spotrun_log
from spotrun.imds import MetadataClient, MetadataError, MetadataUnavailable


class RecordingSession(requests.Session):
    """A real session that remembers the tokens it was given (to look for them in logs)."""

    def __init__(self):
        super().__init__()
        self.tokens: list[str] = []
        self.puts = 0

    def put(self, url, *args, **kwargs):
        self.puts += 1
        response = super().put(url, *args, **kwargs)
        if response.status_code == 200:
            self.tokens.append(response.text)
        return response


class ManualClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed on exit: nothing listens there


def test_reads_metadata_documents_and_user_data(metadata_server):
    server = metadata_server(user_data=b"\x00binary\xff")
    client = MetadataClient(server.endpoint)
    assert client.get("meta-data/instance-id") == "i-0123456789abcdef0"
    assert client.get("/latest/meta-data/placement/availability-zone-id") == "use1-az2"
    assert client.get("meta-data/no-such-thing") is None
    document = client.get_json("dynamic/instance-identity/document")
    assert document["instanceId"] == "i-0123456789abcdef0" and document["region"] == "us-east-1"
    assert client.user_data() == b"\x00binary\xff"


def test_no_user_data_is_none(metadata_server):
    client = MetadataClient(metadata_server(user_data=None).endpoint)
    assert client.user_data() is None


def test_the_token_is_cached_for_its_ttl_and_refreshed_before_expiry(metadata_server):
    server = metadata_server()
    session, clock = RecordingSession(), ManualClock()
    client = MetadataClient(server.endpoint, token_ttl_s=100, session=session, clock=clock)
    for _ in range(3):
        client.get("meta-data/instance-id")
    assert session.puts == 1
    clock.now += 85  # still valid, but within the refresh margin (a tenth of the TTL)
    client.get("meta-data/instance-id")
    assert session.puts == 1
    clock.now += 6
    client.get("meta-data/instance-id")
    assert session.puts == 2


def test_an_expired_token_is_replaced_after_a_401(metadata_server):
    server_clock = ManualClock()
    server = metadata_server(clock=server_clock)
    session = RecordingSession()
    client = MetadataClient(server.endpoint, token_ttl_s=60, session=session)
    assert client.get("meta-data/instance-id") == "i-0123456789abcdef0"
    server_clock.now += 61  # the service says the token expired; the client does not know
    assert client.get("meta-data/instance-id") == "i-0123456789abcdef0"
    assert session.puts == 2
    assert session.tokens[0] != session.tokens[1]


def test_a_401_storm_ends_in_unavailable_at_the_deadline(metadata_server):
    server = metadata_server()
    server.fault("401")
    started = time.monotonic()
    with pytest.raises(MetadataUnavailable, match="meta-data/instance-id.*401"):
        MetadataClient(server.endpoint, deadline_s=0.6).get("meta-data/instance-id")
    assert 0.6 <= time.monotonic() - started < 3


@pytest.mark.parametrize("kind", ["5xx", "refused"])
def test_outages_are_retried_until_the_service_is_back(metadata_server, kind):
    server = metadata_server()
    server.fault(kind, duration_s=0.8)
    started = time.monotonic()
    client = MetadataClient(server.endpoint, connect_timeout_s=0.2, deadline_s=20)
    assert client.get("meta-data/instance-type") == "p3.2xlarge"
    assert time.monotonic() - started >= 0.7


def test_a_slow_service_is_cut_off_by_the_read_timeout_and_retried(metadata_server):
    server = metadata_server()
    server.fault("slow", duration_s=1.0, delay_s=2.0)
    client = MetadataClient(server.endpoint, read_timeout_s=0.2, deadline_s=0.5)
    started = time.monotonic()
    with pytest.raises(MetadataUnavailable, match="ReadTimeout"):
        client.get("meta-data/instance-id")
    assert time.monotonic() - started < 1.5  # the 2 s answers were not waited for
    # Once the fault has ended the same client answers.
    assert client.get("meta-data/instance-id", deadline_s=20) == "i-0123456789abcdef0"


def test_nothing_listening_fails_at_the_deadline_naming_path_and_endpoint():
    endpoint = f"http://127.0.0.1:{_dead_port()}"
    client = MetadataClient(endpoint, deadline_s=0.5)
    started = time.monotonic()
    with pytest.raises(MetadataUnavailable) as error:
        client.get("meta-data/instance-id")
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 2.5
    assert endpoint in str(error.value) and "meta-data/instance-id" in str(error.value)
    assert error.value.path == "meta-data/instance-id"


def test_a_token_request_through_a_proxy_is_refused_at_once(metadata_server):
    server = metadata_server()
    session = requests.Session()
    session.headers["X-Forwarded-For"] = "203.0.113.7"  # what a forwarding proxy adds
    client = MetadataClient(server.endpoint, session=session, deadline_s=30)
    started = time.monotonic()
    with pytest.raises(MetadataError, match="403.*X-Forwarded-For") as error:
        client.get("meta-data/instance-id")
    assert not isinstance(error.value, MetadataUnavailable)
    assert time.monotonic() - started < 2  # a configuration error is not retried


def test_malformed_json_names_the_path(metadata_server):
    server = metadata_server()
    server.fault("malformed")
    with pytest.raises(MetadataError, match="dynamic/instance-identity/document: malformed JSON"):
        MetadataClient(server.endpoint).get_json("dynamic/instance-identity/document")


def test_proxy_environment_variables_never_route_metadata(metadata_server, monkeypatch):
    server = metadata_server()
    dead_proxy = f"http://127.0.0.1:{_dead_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    # The environment does route an ordinary session into the dead proxy...
    with pytest.raises(requests.exceptions.ProxyError):
        requests.Session().get(server.endpoint + "/latest/meta-data/", timeout=2)
    # ...but not the metadata client, even when handed an ordinary session.
    client = MetadataClient(server.endpoint, session=requests.Session(), deadline_s=2)
    assert client.get("meta-data/instance-id") == "i-0123456789abcdef0"


def test_tokens_never_appear_in_logs_or_errors(metadata_server):
    server_clock = ManualClock()
    server = metadata_server(clock=server_clock)
    out = io.StringIO()
    spotrun_log.configure("debug", stream=out)
    try:
        session = RecordingSession()
        client = MetadataClient(server.endpoint, session=session, token_ttl_s=60, deadline_s=0.5)
        client.get("meta-data/instance-id")
        server_clock.now += 61  # a 401 and a refresh
        client.get("meta-data/instance-id")
        server.fault("401")
        with pytest.raises(MetadataUnavailable) as error:
            client.get("meta-data/instance-id")
    finally:
        spotrun_log.configure("info")
    logged = out.getvalue()
    assert "imds_token_acquired" in logged and "imds_retry" in logged  # the log was captured
    assert len(session.tokens) >= 2
    for token in session.tokens:
        assert token not in logged
        assert token not in str(error.value) and token not in repr(client)


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _TinyIMDSv2(BaseHTTPRequestHandler):
    # The emulator listens on IPv4 only; this stands in for the [fd00:ec2::254] endpoint.
    def do_PUT(self):
        self._answer(200, "tiny-token")

    def do_GET(self):
        ok = self.headers.get("X-aws-ec2-metadata-token") == "tiny-token"
        self._answer(200, "i-0ipv6") if ok else self._answer(401, "")

    def _answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def test_an_ipv6_endpoint_works():
    try:
        httpd = _IPv6Server(("::1", 0), _TinyIMDSv2)
    except OSError:
        pytest.skip("no IPv6 loopback")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        client = MetadataClient(f"http://[::1]:{httpd.server_address[1]}")
        assert client.get("meta-data/instance-id") == "i-0ipv6"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()

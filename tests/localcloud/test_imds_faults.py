"""Faults injected into one instance's metadata service, over real HTTP."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import pytest
import requests

from spotrun.localcloud.imds import TOKEN_HEADER, TTL_HEADER, InstanceMetadata, MetadataServer


def make_md() -> InstanceMetadata:
    return InstanceMetadata("i-0123456789abcdef0", "p3.2xlarge", "us-east-1b", "use1-az2",
                            "us-east-1", "123456789012", "ami-0abcdef1234567890", "10.0.1.17",
                            {"Name": "worker"}, None)


@pytest.fixture
def http():
    with requests.Session() as session:
        session.trust_env = False
        yield session


@pytest.fixture
def server():
    srv = MetadataServer(make_md()).start()
    try:
        yield srv
    finally:
        srv.stop()


def token(http, srv) -> str:
    return http.put(srv.endpoint + "/latest/api/token", headers={TTL_HEADER: "600"}, timeout=5).text


def get(http, srv, path, tok, timeout=5.0):
    return http.get(srv.endpoint + path, headers={TOKEN_HEADER: tok}, timeout=timeout)


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)  # polling the real condition, with a deadline
    return False


def status_or_error(http, srv, tok):
    try:
        return get(http, srv, "/latest/meta-data/instance-id", tok, timeout=2).status_code
    except requests.ConnectionError:
        return "refused"


def test_5xx_for_a_while_then_healthy(http, server):
    tok = token(http, server)
    server.fault("5xx", duration_s=0.5)
    assert get(http, server, "/latest/meta-data/instance-id", tok).status_code == 500
    put = http.put(server.endpoint + "/latest/api/token", headers={TTL_HEADER: "60"}, timeout=5)
    assert put.status_code == 500
    assert wait_until(lambda: status_or_error(http, server, tok) == 200)
    assert [e["event"] for e in server.events][-2:] == ["imds_fault_started", "imds_fault_ended"]


def test_slow_answers(http, server):
    tok = token(http, server)
    server.fault("slow", duration_s=None, delay_s=0.4)
    started = time.monotonic()
    answer = get(http, server, "/latest/meta-data/instance-id", tok)
    assert answer.status_code == 200 and time.monotonic() - started >= 0.4
    with pytest.raises(requests.Timeout):
        get(http, server, "/latest/meta-data/instance-id", tok, timeout=0.1)
    server.clear_faults()
    started = time.monotonic()
    assert get(http, server, "/latest/meta-data/instance-id", tok).status_code == 200
    assert time.monotonic() - started < 0.4


def test_refused_then_listening_again_on_the_same_port(http, server):
    tok = token(http, server)
    endpoint = server.endpoint
    server.fault("refused", duration_s=0.6)
    assert status_or_error(http, server, tok) == "refused"
    assert not server.listening
    assert wait_until(lambda: status_or_error(http, server, tok) == 200)
    assert server.endpoint == endpoint
    # The token survives the outage: it belongs to the instance, not to the connection.
    assert get(http, server, "/latest/meta-data/instance-id", tok).text == "i-0123456789abcdef0"


def test_refused_until_cleared(http, server):
    tok = token(http, server)
    server.fault("refused")
    assert status_or_error(http, server, tok) == "refused"
    server.clear_faults()
    assert status_or_error(http, server, tok) == 200


def test_401_storm_rejects_good_tokens(http, server):
    tok = token(http, server)
    server.fault("401", duration_s=None)
    assert get(http, server, "/latest/meta-data/instance-id", tok).status_code == 401
    fresh = token(http, server)  # a new token does not help either
    assert get(http, server, "/latest/meta-data/instance-id", fresh).status_code == 401
    server.clear_faults()
    assert get(http, server, "/latest/meta-data/instance-id", tok).status_code == 200


def test_malformed_json_on_json_paths_only(http, server):
    tok = token(http, server)
    server.notice("terminate", datetime(2026, 11, 27, 8, 22, tzinfo=timezone.utc))
    server.rebalance()
    server.fault("malformed")
    for path in ("/latest/meta-data/spot/instance-action",
                 "/latest/meta-data/events/recommendations/rebalance",
                 "/latest/dynamic/instance-identity/document"):
        answer = get(http, server, path, tok)
        assert answer.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(answer.text)
    assert get(http, server, "/latest/meta-data/instance-id", tok).text == "i-0123456789abcdef0"
    server.clear_faults()
    action = get(http, server, "/latest/meta-data/spot/instance-action", tok)
    assert json.loads(action.text)["action"] == "terminate"


def test_a_newer_fault_is_not_ended_by_an_older_timer(http, server):
    tok = token(http, server)
    server.fault("5xx", duration_s=0.2)
    server.fault("5xx", duration_s=None)  # replaces the timed one
    first_timer = server._timers[0]
    assert first_timer.finished.wait(5)  # the first fault's timer fired: it must not end the second
    assert get(http, server, "/latest/meta-data/instance-id", tok).status_code == 500
    assert server.active_faults() == ["5xx"]


def test_bad_fault_arguments(server):
    with pytest.raises(ValueError, match="fault kind"):
        server.fault("meltdown")
    with pytest.raises(ValueError, match="duration_s"):
        server.fault("5xx", duration_s=0)
    assert server.active_faults() == []

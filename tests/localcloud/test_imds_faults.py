"""Faults injected into one instance's metadata service, over real HTTP."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import pytest
import requests
from testkit import wait_until

from spotrun.localcloud.imds import TOKEN_HEADER, TTL_HEADER


@pytest.fixture
def http():
    with requests.Session() as session:
        session.trust_env = False
        yield session


def token(http, srv) -> str:
    return http.put(srv.endpoint + "/latest/api/token", headers={TTL_HEADER: "600"}, timeout=5).text


def get(http, srv, path, tok, timeout=5.0):
    return http.get(srv.endpoint + path, headers={TOKEN_HEADER: tok}, timeout=timeout)


def status_or_error(http, srv, tok):
    try:
        return get(http, srv, "/latest/meta-data/instance-id", tok, timeout=2).status_code
    except requests.ConnectionError:
        return "refused"


def test_5xx_for_a_while_then_healthy(http, imds):
    tok = token(http, imds)
    imds.fault("5xx", duration_s=0.5)
    assert get(http, imds, "/latest/meta-data/instance-id", tok).status_code == 500
    put = http.put(imds.endpoint + "/latest/api/token", headers={TTL_HEADER: "60"}, timeout=5)
    assert put.status_code == 500
    wait_until(lambda: status_or_error(http, imds, tok) == 200, 5.0, "the service to answer again")
    assert [e["event"] for e in imds.events][-2:] == ["imds_fault_started", "imds_fault_ended"]


def test_slow_answers(http, imds):
    tok = token(http, imds)
    imds.fault("slow", duration_s=None, delay_s=0.4)
    started = time.monotonic()
    answer = get(http, imds, "/latest/meta-data/instance-id", tok)
    assert answer.status_code == 200 and time.monotonic() - started >= 0.4
    with pytest.raises(requests.Timeout):
        get(http, imds, "/latest/meta-data/instance-id", tok, timeout=0.1)
    imds.clear_faults()
    started = time.monotonic()
    assert get(http, imds, "/latest/meta-data/instance-id", tok).status_code == 200
    assert time.monotonic() - started < 0.4


def test_refused_then_listening_again_on_the_same_port(http, imds):
    tok = token(http, imds)
    endpoint = imds.endpoint
    imds.fault("refused", duration_s=0.6)
    assert status_or_error(http, imds, tok) == "refused"
    assert not imds.listening
    wait_until(lambda: status_or_error(http, imds, tok) == 200, 5.0, "the service to answer again")
    assert imds.endpoint == endpoint
    # The token survives the outage: it belongs to the instance, not to the connection.
    assert get(http, imds, "/latest/meta-data/instance-id", tok).text == "i-0123456789abcdef0"


def test_refused_until_cleared(http, imds):
    tok = token(http, imds)
    imds.fault("refused")
    assert status_or_error(http, imds, tok) == "refused"
    imds.clear_faults()
    assert status_or_error(http, imds, tok) == 200


def test_401_storm_rejects_good_tokens(http, imds):
    tok = token(http, imds)
    imds.fault("401", duration_s=None)
    assert get(http, imds, "/latest/meta-data/instance-id", tok).status_code == 401
    fresh = token(http, imds)  # a new token does not help either
    assert get(http, imds, "/latest/meta-data/instance-id", fresh).status_code == 401
    imds.clear_faults()
    assert get(http, imds, "/latest/meta-data/instance-id", tok).status_code == 200


def test_malformed_json_on_json_paths_only(http, imds):
    tok = token(http, imds)
    imds.notice("terminate", datetime(2026, 11, 27, 8, 22, tzinfo=timezone.utc))
    imds.rebalance()
    imds.fault("malformed")
    for path in ("/latest/meta-data/spot/instance-action",
                 "/latest/meta-data/events/recommendations/rebalance",
                 "/latest/dynamic/instance-identity/document"):
        answer = get(http, imds, path, tok)
        assert answer.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(answer.text)
    assert get(http, imds, "/latest/meta-data/instance-id", tok).text == "i-0123456789abcdef0"
    imds.clear_faults()
    action = get(http, imds, "/latest/meta-data/spot/instance-action", tok)
    assert json.loads(action.text)["action"] == "terminate"


def test_a_newer_fault_is_not_ended_by_an_older_timer(http, imds):
    tok = token(http, imds)
    imds.fault("5xx", duration_s=0.2)
    imds.fault("5xx", duration_s=None)  # replaces the timed one
    first_timer = imds._timers[0]
    assert first_timer.finished.wait(5)  # the first fault's timer fired: it must not end the second
    assert get(http, imds, "/latest/meta-data/instance-id", tok).status_code == 500
    assert imds.active_faults() == ["5xx"]


def test_bad_fault_arguments(imds):
    with pytest.raises(ValueError, match="fault kind"):
        imds.fault("meltdown")
    with pytest.raises(ValueError, match="duration_s"):
        imds.fault("5xx", duration_s=0)
    assert imds.active_faults() == []

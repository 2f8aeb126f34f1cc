"""The metadata emulator's scheduled events as AWS documents them (every code; canceled,
completed and rescheduled events), per-path slow answers, a shorter granted token TTL and an
IMDSv1-only service, over real HTTP; and the control API that exposes them."""
from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
import requests

from spotrun.localcloud.control import KEY_HEADER, ControlServer
from spotrun.localcloud.imds import (EVENT_CODES, TOKEN_HEADER, TTL_HEADER, InstanceMetadata,
                                     MetadataServer)

SCHEDULED = "/latest/meta-data/events/maintenance/scheduled"
HISTORY = "/latest/meta-data/events/maintenance/history"
SPOT = "/latest/meta-data/spot/instance-action"
START = datetime(2026, 11, 28, 9, 0, 43, tzinfo=timezone.utc)


def make_md() -> InstanceMetadata:
    return InstanceMetadata("i-0123456789abcdef0", "p3.2xlarge", "us-east-1b", "use1-az2",
                            "us-east-1", "123456789012", "ami-0abcdef1234567890", "10.0.1.17",
                            {}, None)


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


def read(http, srv, path, ttl="600"):
    tok = http.put(srv.endpoint + "/latest/api/token", headers={TTL_HEADER: ttl}, timeout=5).text
    answer = http.get(srv.endpoint + path, headers={TOKEN_HEADER: tok}, timeout=10)
    return answer.status_code, answer.text


def listed(http, srv, path=SCHEDULED):
    status, text = read(http, srv, path)
    assert status == 200
    return json.loads(text)


def test_every_documented_code_can_be_scheduled_and_others_are_refused(http, server):
    ids = [server.schedule_maintenance(code, START + timedelta(hours=i)) for i, code in enumerate(EVENT_CODES)]
    events = listed(http, server)
    assert [e["Code"] for e in events] == list(EVENT_CODES)
    assert [e["EventId"] for e in events] == ids
    assert all(e["State"] == "active" and e["Description"] for e in events)
    with pytest.raises(ValueError, match="code must be one of .*'instance-explode'"):
        server.schedule_maintenance("instance-explode")


@pytest.mark.parametrize("end,state,prefix", [("cancel", "canceled", "[Canceled] "),
                                              ("complete", "completed", "[Completed] ")])
def test_an_ended_event_moves_to_the_history_with_its_state_and_prefix(http, server, end, state, prefix):
    event_id = server.schedule_maintenance("system-reboot", START, description="scheduled reboot")
    getattr(server, f"{end}_maintenance")(event_id)
    assert listed(http, server) == []
    [old] = listed(http, server, HISTORY)
    assert old["EventId"] == event_id and old["State"] == state
    assert old["Description"] == prefix + "scheduled reboot"
    assert server.describe()["maintenance"] == []
    with pytest.raises(KeyError, match=event_id):  # ended once
        server.cancel_maintenance(event_id)


def test_an_ended_event_can_stay_listed_with_its_new_state(http, server):
    """Some services keep an ended event in the scheduled list for a while."""
    event_id = server.schedule_maintenance("instance-stop", START, description="retiring")
    server.cancel_maintenance(event_id, listed=True)
    [entry] = listed(http, server)
    assert entry["State"] == "canceled" and entry["Description"] == "[Canceled] retiring"


def test_a_rescheduled_event_keeps_its_id_and_moves(http, server):
    event_id = server.schedule_maintenance("instance-reboot", START, START + timedelta(minutes=10))
    later = START + timedelta(days=2)
    server.reschedule_maintenance(event_id, later, later + timedelta(minutes=30))
    [entry] = listed(http, server)
    assert entry["EventId"] == event_id and entry["State"] == "active"
    assert (entry["NotBefore"], entry["NotAfter"]) == ("30 Nov 2026 09:00:43 GMT", "30 Nov 2026 09:30:43 GMT")
    assert [e["event"] for e in server.events if e["event"].startswith("maintenance")] == [
        "maintenance_scheduled", "maintenance_rescheduled"]


def test_a_slow_answer_aimed_at_one_path_leaves_the_others_fast(http, server):
    server.fault("slow", delay_s=1.5, path="meta-data/events/maintenance/scheduled")
    server.notice("terminate")
    began = time.monotonic()
    assert read(http, server, SPOT)[0] == 200
    assert time.monotonic() - began < 1.0
    began = time.monotonic()
    assert read(http, server, SCHEDULED)[0] == 200
    assert time.monotonic() - began >= 1.5
    assert server.active_faults() == ["slow@meta-data/events/maintenance/scheduled"]
    with pytest.raises(ValueError, match="only 5xx, slow faults can be aimed at a path"):
        server.fault("refused", path="meta-data/spot/instance-action")


def test_a_5xx_aimed_at_one_path(http, server):
    server.fault("5xx", path="meta-data/spot/instance-action", duration_s=30)
    assert read(http, server, SPOT)[0] == 500
    assert read(http, server, SCHEDULED)[0] == 200
    server.clear_faults()
    assert read(http, server, SPOT)[0] == 404


def test_the_service_may_grant_a_shorter_ttl_and_may_have_no_token_endpoint(http, server):
    server.token_ttl_cap = 30
    answer = http.put(server.endpoint + "/latest/api/token", headers={TTL_HEADER: "21600"}, timeout=5)
    assert answer.status_code == 200 and answer.headers[TTL_HEADER] == "30"
    server.token_endpoint = False
    answer = http.put(server.endpoint + "/latest/api/token", headers={TTL_HEADER: "60"}, timeout=5)
    assert answer.status_code == 404
    assert server.token_puts == 2


def test_the_control_api_cancels_and_reschedules_an_event(http, server):
    cloud = SimpleNamespace(instances={server.md.instance_id: SimpleNamespace(state="running", metadata=server)})
    control = ControlServer(cloud, on_down=lambda: None).start()
    try:
        def post(path, body):
            return http.post(control.endpoint + path, json=body, headers={KEY_HEADER: control.key}, timeout=10)

        base = f"/instances/{server.md.instance_id}/maintenance"
        first = server.schedule_maintenance("system-reboot", START)
        second = server.schedule_maintenance("instance-stop", START)
        answer = post(f"{base}/{first}", {"action": "reschedule", "in_seconds": 7200, "duration_s": 60})
        assert answer.status_code == 200, answer.text
        assert post(f"{base}/{second}", {"action": "cancel", "listed": True}).status_code == 200
        by_id = {e["EventId"]: e for e in listed(http, server)}
        assert by_id[second]["State"] == "canceled"
        moved = datetime.strptime(by_id[first]["NotBefore"], "%d %b %Y %H:%M:%S GMT").replace(tzinfo=timezone.utc)
        assert abs((moved - datetime.now(timezone.utc)).total_seconds() - 7200) < 60
        refused = post(f"{base}/{second}", {"action": "cancel"})
        assert refused.status_code == 404 and second in refused.json()["error"]
        refused = post(f"{base}/{first}", {"action": "postpone"})
        assert refused.status_code == 400 and "action" in refused.json()["error"]
    finally:
        control.stop()

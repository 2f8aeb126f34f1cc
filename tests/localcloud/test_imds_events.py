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
from spotrun.localcloud.imds import EVENT_CODES, TOKEN_HEADER, TTL_HEADER

SCHEDULED = "/latest/meta-data/events/maintenance/scheduled"
HISTORY = "/latest/meta-data/events/maintenance/history"
SPOT = "/latest/meta-data/spot/instance-action"
START = datetime(2026, 11, 28, 9, 0, 43, tzinfo=timezone.utc)


@pytest.fixture
def http():
    with requests.Session() as session:
        session.trust_env = False
        yield session


def read(http, srv, path, ttl="600"):
    tok = http.put(srv.endpoint + "/latest/api/token", headers={TTL_HEADER: ttl}, timeout=5).text
    answer = http.get(srv.endpoint + path, headers={TOKEN_HEADER: tok}, timeout=10)
    return answer.status_code, answer.text


def listed(http, srv, path=SCHEDULED):
    status, text = read(http, srv, path)
    assert status == 200
    return json.loads(text)


def test_every_documented_code_can_be_scheduled_and_others_are_refused(http, imds):
    ids = [imds.schedule_maintenance(code, START + timedelta(hours=i)) for i, code in enumerate(EVENT_CODES)]
    events = listed(http, imds)
    assert [e["Code"] for e in events] == list(EVENT_CODES)
    assert [e["EventId"] for e in events] == ids
    assert all(e["State"] == "active" and e["Description"] for e in events)
    with pytest.raises(ValueError, match="code must be one of .*'instance-explode'"):
        imds.schedule_maintenance("instance-explode")


@pytest.mark.parametrize("end,state,prefix", [("cancel", "canceled", "[Canceled] "),
                                              ("complete", "completed", "[Completed] ")])
def test_an_ended_event_moves_to_the_history_with_its_state_and_prefix(http, imds, end, state, prefix):
    event_id = imds.schedule_maintenance("system-reboot", START, description="scheduled reboot")
    getattr(imds, f"{end}_maintenance")(event_id)
    assert listed(http, imds) == []
    [old] = listed(http, imds, HISTORY)
    assert old["EventId"] == event_id and old["State"] == state
    assert old["Description"] == prefix + "scheduled reboot"
    assert imds.describe()["maintenance"] == []
    with pytest.raises(KeyError, match=event_id):  # ended once
        imds.cancel_maintenance(event_id)


def test_an_ended_event_can_stay_listed_with_its_new_state(http, imds):
    """Some services keep an ended event in the scheduled list for a while."""
    event_id = imds.schedule_maintenance("instance-stop", START, description="retiring")
    imds.cancel_maintenance(event_id, listed=True)
    [entry] = listed(http, imds)
    assert entry["State"] == "canceled" and entry["Description"] == "[Canceled] retiring"


def test_a_rescheduled_event_keeps_its_id_and_moves(http, imds):
    event_id = imds.schedule_maintenance("instance-reboot", START, START + timedelta(minutes=10))
    later = START + timedelta(days=2)
    imds.reschedule_maintenance(event_id, later, later + timedelta(minutes=30))
    [entry] = listed(http, imds)
    assert entry["EventId"] == event_id and entry["State"] == "active"
    assert (entry["NotBefore"], entry["NotAfter"]) == ("30 Nov 2026 09:00:43 GMT", "30 Nov 2026 09:30:43 GMT")
    assert [e["event"] for e in imds.events if e["event"].startswith("maintenance")] == [
        "maintenance_scheduled", "maintenance_rescheduled"]


def test_a_slow_answer_aimed_at_one_path_leaves_the_others_fast(http, imds):
    imds.fault("slow", delay_s=1.5, path="meta-data/events/maintenance/scheduled")
    imds.notice("terminate")
    began = time.monotonic()
    assert read(http, imds, SPOT)[0] == 200
    spot_s = time.monotonic() - began
    began = time.monotonic()
    assert read(http, imds, SCHEDULED)[0] == 200
    scheduled_s = time.monotonic() - began
    # The delay lands on its path alone: a floor (never flaky) and a comparison of the two
    # reads made alike, not a bound a loaded machine can miss.
    assert scheduled_s >= 1.5 and spot_s < scheduled_s - 1.0, (spot_s, scheduled_s)
    assert imds.active_faults() == ["slow@meta-data/events/maintenance/scheduled"]
    with pytest.raises(ValueError, match="only 5xx, slow faults can be aimed at a path"):
        imds.fault("refused", path="meta-data/spot/instance-action")


def test_a_5xx_aimed_at_one_path(http, imds):
    imds.fault("5xx", path="meta-data/spot/instance-action", duration_s=30)
    assert read(http, imds, SPOT)[0] == 500
    assert read(http, imds, SCHEDULED)[0] == 200
    imds.clear_faults()
    assert read(http, imds, SPOT)[0] == 404


def test_the_service_may_grant_a_shorter_ttl_and_may_have_no_token_endpoint(http, imds):
    imds.token_ttl_cap = 30
    answer = http.put(imds.endpoint + "/latest/api/token", headers={TTL_HEADER: "21600"}, timeout=5)
    assert answer.status_code == 200 and answer.headers[TTL_HEADER] == "30"
    imds.token_endpoint = False
    answer = http.put(imds.endpoint + "/latest/api/token", headers={TTL_HEADER: "60"}, timeout=5)
    assert answer.status_code == 404
    assert imds.token_puts == 2


def test_the_control_api_cancels_and_reschedules_an_event(http, imds):
    cloud = SimpleNamespace(instances={imds.md.instance_id: SimpleNamespace(state="running", metadata=imds)})
    control = ControlServer(cloud, on_down=lambda: None).start()
    try:
        def post(path, body):
            return http.post(control.endpoint + path, json=body, headers={KEY_HEADER: control.key}, timeout=10)

        base = f"/instances/{imds.md.instance_id}/maintenance"
        first = imds.schedule_maintenance("system-reboot", START)
        second = imds.schedule_maintenance("instance-stop", START)
        answer = post(f"{base}/{first}", {"action": "reschedule", "in_seconds": 7200, "duration_s": 60})
        assert answer.status_code == 200, answer.text
        assert post(f"{base}/{second}", {"action": "cancel", "listed": True}).status_code == 200
        by_id = {e["EventId"]: e for e in listed(http, imds)}
        assert by_id[second]["State"] == "canceled"
        moved = datetime.strptime(by_id[first]["NotBefore"], "%d %b %Y %H:%M:%S GMT").replace(tzinfo=timezone.utc)
        assert abs((moved - datetime.now(timezone.utc)).total_seconds() - 7200) < 60
        refused = post(f"{base}/{second}", {"action": "cancel"})
        assert refused.status_code == 404 and second in refused.json()["error"]
        refused = post(f"{base}/{first}", {"action": "postpone"})
        assert refused.status_code == 400 and "action" in refused.json()["error"]
    finally:
        control.stop()

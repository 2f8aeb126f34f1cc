"""The metadata emulator's IMDSv2 rules and paths, over real HTTP."""
from __future__ import annotations

import json
import re
import time
from datetime import datetime, timedelta, timezone

import pytest
import requests

from spotrun.localcloud.imds import TOKEN_HEADER, TTL_HEADER, InstanceMetadata, MetadataServer


def make_md(**overrides) -> InstanceMetadata:
    fields = dict(instance_id="i-0123456789abcdef0", instance_type="p3.2xlarge",
                  availability_zone="us-east-1b", availability_zone_id="use1-az2",
                  region="us-east-1", account_id="123456789012", ami_id="ami-0abcdef1234567890",
                  private_ip="10.0.1.17",
                  tags={"Name": "worker", "aws:ec2spot:fleet-request-id": "sfr-1234"},
                  user_data=b"#!/bin/bash\necho hi\n")
    fields.update(overrides)
    return InstanceMetadata(**fields)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def http():
    with requests.Session() as session:
        session.trust_env = False  # never via a proxy from the environment
        yield session


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def server(clock):
    srv = MetadataServer(make_md(), clock=clock)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def put_token(http, srv, ttl="60", **headers):
    hdrs = {} if ttl is None else {TTL_HEADER: ttl}
    hdrs.update(headers)
    return http.put(srv.endpoint + "/latest/api/token", headers=hdrs, timeout=5)


def token(http, srv, ttl="60") -> str:
    answer = put_token(http, srv, ttl)
    assert answer.status_code == 200
    return answer.text


def get(http, srv, path, tok=None):
    headers = {TOKEN_HEADER: tok} if tok is not None else {}
    return http.get(srv.endpoint + path, headers=headers, timeout=5)


@pytest.mark.parametrize("ttl", [None, "0", "21601", "-1", "abc", "1.5", ""])
def test_token_ttl_out_of_bounds_or_missing_is_400(http, server, ttl):
    assert put_token(http, server, ttl).status_code == 400


@pytest.mark.parametrize("ttl", ["1", "21600"])
def test_token_ttl_bounds_are_accepted_and_echoed(http, server, ttl):
    answer = put_token(http, server, ttl)
    assert answer.status_code == 200
    assert answer.headers[TTL_HEADER] == ttl
    assert len(answer.text) > 20


def test_token_put_through_a_proxy_is_forbidden(http, server):
    answer = put_token(http, server, "60", **{"X-Forwarded-For": "203.0.113.9"})
    assert answer.status_code == 403


def test_get_requires_a_valid_token_by_default(http, server):
    assert get(http, server, "/latest/meta-data/instance-id").status_code == 401
    assert get(http, server, "/latest/meta-data/instance-id", "AQAEAnot-a-token").status_code == 401
    answer = get(http, server, "/latest/meta-data/instance-id", token(http, server, "300"))
    assert answer.status_code == 200
    assert answer.text == "i-0123456789abcdef0"
    assert answer.headers[TTL_HEADER] == "300"


def test_token_is_bound_to_its_instance(http, server):
    other = MetadataServer(make_md(instance_id="i-0fedcba9876543210")).start()
    try:
        foreign = token(http, other)
        assert get(http, server, "/latest/meta-data/instance-id", foreign).status_code == 401
        assert get(http, other, "/latest/meta-data/instance-id", foreign).text == "i-0fedcba9876543210"
    finally:
        other.stop()


def test_token_expires_at_its_ttl(http, server, clock):
    tok = token(http, server, "10")
    clock.now += 4.2
    answer = get(http, server, "/latest/meta-data/instance-id", tok)
    assert answer.status_code == 200
    assert answer.headers[TTL_HEADER] == "6"  # remaining seconds, rounded up
    clock.now += 5.8
    assert get(http, server, "/latest/meta-data/instance-id", tok).status_code == 401


def test_token_expires_on_the_real_clock(http):
    srv = MetadataServer(make_md()).start()
    try:
        tok = token(http, srv, "1")
        assert get(http, srv, "/latest/meta-data/instance-id", tok).status_code == 200
        deadline = time.monotonic() + 5
        status = 200
        while status == 200 and time.monotonic() < deadline:
            status = get(http, srv, "/latest/meta-data/instance-id", tok).status_code
        assert status == 401
    finally:
        srv.stop()


def test_imdsv1_mode_serves_without_token_but_checks_one_that_is_sent(http):
    srv = MetadataServer(make_md(), require_token=False).start()
    try:
        answer = get(http, srv, "/latest/meta-data/instance-id")
        assert answer.status_code == 200 and TTL_HEADER not in answer.headers
        assert get(http, srv, "/latest/meta-data/instance-id", "AQAEAbogus").status_code == 401
        assert get(http, srv, "/latest/meta-data/instance-id", token(http, srv)).status_code == 200
    finally:
        srv.stop()


def test_identity_paths_match_the_instance(http, server):
    tok = token(http, server)
    expected = {
        "/latest/meta-data/instance-id": "i-0123456789abcdef0",
        "/latest/meta-data/instance-type": "p3.2xlarge",
        "/latest/meta-data/ami-id": "ami-0abcdef1234567890",
        "/latest/meta-data/local-ipv4": "10.0.1.17",
        "/latest/meta-data/placement/availability-zone": "us-east-1b",
        "/latest/meta-data/placement/availability-zone-id": "use1-az2",
        "/latest/meta-data/placement/region": "us-east-1",
        "/latest/meta-data/tags/instance/aws:ec2spot:fleet-request-id": "sfr-1234",
        "/latest/user-data": "#!/bin/bash\necho hi\n",
        "/2021-07-15/meta-data/instance-id": "i-0123456789abcdef0",
    }
    for path, body in expected.items():
        answer = get(http, server, path, tok)
        assert (answer.status_code, answer.text) == (200, body), path
        assert answer.headers["Content-Type"] == "text/plain"
    assert get(http, server, "/latest/meta-data/tags/instance", tok).text.split("\n") == [
        "Name", "aws:ec2spot:fleet-request-id"]
    doc = json.loads(get(http, server, "/latest/dynamic/instance-identity/document", tok).text)
    assert doc["instanceId"] == "i-0123456789abcdef0"
    assert doc["availabilityZone"] == "us-east-1b" and doc["region"] == "us-east-1"
    assert doc["accountId"] == "123456789012" and doc["imageId"] == "ami-0abcdef1234567890"
    assert doc["version"] == "2017-09-30" and doc["kernelId"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["pendingTime"])


def test_directory_listings(http, server):
    tok = token(http, server)
    listing = get(http, server, "/latest/meta-data/", tok).text.split("\n")
    assert {"instance-id", "instance-type", "placement/", "events/", "tags/"} <= set(listing)
    assert "spot/" not in listing  # only once there is a notice
    assert get(http, server, "/latest/meta-data", tok).text.split("\n") == listing
    assert set(get(http, server, "/latest/", tok).text.split("\n")) == {
        "dynamic/", "meta-data/", "user-data"}
    assert get(http, server, "/latest/meta-data/placement/", tok).text.split("\n") == [
        "availability-zone", "availability-zone-id", "region"]


def test_tags_hidden_unless_enabled_and_user_data_404_when_none(http):
    srv = MetadataServer(make_md(tags_in_metadata=False, user_data=None)).start()
    try:
        tok = token(http, srv)
        assert get(http, srv, "/latest/meta-data/tags/instance", tok).status_code == 404
        assert get(http, srv, "/latest/meta-data/tags/instance/Name", tok).status_code == 404
        assert get(http, srv, "/latest/user-data", tok).status_code == 404
    finally:
        srv.stop()


def test_unknown_paths_and_methods(http, server):
    tok = token(http, server)
    assert get(http, server, "/latest/meta-data/nope", tok).status_code == 404
    assert get(http, server, "/latest/meta-data/instance-id/deeper", tok).status_code == 404
    answer = http.post(server.endpoint + "/latest/api/token", headers={TTL_HEADER: "60"}, timeout=5)
    assert answer.status_code == 405


def test_spot_notice_404_until_injected(http, server):
    tok = token(http, server)
    assert get(http, server, "/latest/meta-data/spot/instance-action", tok).status_code == 404
    assert get(http, server, "/latest/meta-data/spot/termination-time", tok).status_code == 404
    when = datetime(2026, 11, 27, 8, 22, 0, 400000, tzinfo=timezone.utc)
    server.notice("terminate", when)
    answer = get(http, server, "/latest/meta-data/spot/instance-action", tok)
    assert answer.status_code == 200
    assert json.loads(answer.text) == {"action": "terminate", "time": "2026-11-27T08:22:00Z"}
    assert get(http, server, "/latest/meta-data/spot/termination-time", tok).text == (
        "2026-11-27T08:22:00Z")
    served = [e for e in server.events if e["event"] == "notice_served"]
    assert len(served) == 1 and served[0]["what"] == "spot"


def test_stop_notice_has_no_termination_time(http, server):
    tok = token(http, server)
    server.notice("stop", datetime(2026, 11, 27, 8, 22, tzinfo=timezone.utc))
    action = json.loads(get(http, server, "/latest/meta-data/spot/instance-action", tok).text)
    assert action["action"] == "stop"
    assert get(http, server, "/latest/meta-data/spot/termination-time", tok).status_code == 404
    with pytest.raises(ValueError, match="action"):
        server.notice("explode")


def test_rebalance_recommendation(http, server):
    tok = token(http, server)
    path = "/latest/meta-data/events/recommendations/rebalance"
    assert get(http, server, path, tok).status_code == 404
    server.rebalance(datetime(2026, 11, 27, 8, 20, 5, tzinfo=timezone.utc))
    assert json.loads(get(http, server, path, tok).text) == {"noticeTime": "2026-11-27T08:20:05Z"}


def test_scheduled_maintenance_as_aws_formats_it(http, server):
    tok = token(http, server)
    path = "/latest/meta-data/events/maintenance/scheduled"
    assert json.loads(get(http, server, path, tok).text) == []
    start = datetime(2026, 11, 28, 9, 0, 43, tzinfo=timezone.utc)
    event_id = server.schedule_maintenance("system-reboot", start, start + timedelta(minutes=17),
                                           description="scheduled reboot")
    events = json.loads(get(http, server, path, tok).text)
    assert events == [{"NotBefore": "28 Nov 2026 09:00:43 GMT", "Code": "system-reboot",
                       "Description": "scheduled reboot", "EventId": event_id,
                       "NotAfter": "28 Nov 2026 09:17:43 GMT", "State": "active"}]
    assert re.fullmatch(r"instance-event-[0-9a-f]{17}", event_id)
    server.clear_notices()
    assert json.loads(get(http, server, path, tok).text) == []
    history = json.loads(get(http, server, "/latest/meta-data/events/maintenance/history", tok).text)
    assert [e["State"] for e in history] == ["canceled"]


def test_injections_are_recorded_in_order(server):
    server.notice("hibernate")
    server.rebalance()
    server.schedule_maintenance()
    server.clear_notices()
    names = [e["event"] for e in server.events]
    assert names == ["imds_started", "spot_notice", "rebalance_recommendation",
                     "maintenance_scheduled", "notices_cleared"]
    assert all(e["instance_id"] == "i-0123456789abcdef0" for e in server.events)


def test_botocore_own_metadata_client_reads_the_region(server):
    """botocore's IMDS fetcher (token PUT, then GET) works against the emulator unchanged."""
    from botocore.utils import InstanceMetadataRegionFetcher

    fetcher = InstanceMetadataRegionFetcher(timeout=2, num_attempts=1,
                                            base_url=server.endpoint + "/", env={})
    assert fetcher.retrieve_region() == "us-east-1"


def test_events_are_forwarded_to_a_listener(http):
    seen: list[dict] = []
    srv = MetadataServer(make_md(), on_event=seen.append).start()
    try:
        srv.notice("terminate")
        get(http, srv, "/latest/meta-data/spot/instance-action", token(http, srv))
    finally:
        srv.stop()
    assert [e["event"] for e in seen] == ["imds_started", "spot_notice", "notice_served"]

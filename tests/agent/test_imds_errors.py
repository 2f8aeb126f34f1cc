"""Narrow error-path unit tests for spotrun.imds (HTTP answers the emulator does not give)."""
from __future__ import annotations

import pytest
import requests
import responses

from spotrun import imds
from spotrun.config import MetadataConfig
from spotrun.imds import MetadataClient, MetadataError, MetadataUnavailable

EP = "http://169.254.169.254"
TOKEN_URL = EP + "/latest/api/token"
ID_URL = EP + "/latest/meta-data/instance-id"


class FakeTime:
    """A clock that moves only when the client sleeps, so backoff can be checked exactly."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@responses.activate
@pytest.mark.parametrize("status,hint", [(403, "hop limit"), (400, "TTL"), (404, "allow_imdsv1")])
def test_a_4xx_on_the_token_is_a_clear_error_without_retries(status, hint):
    responses.put(TOKEN_URL, status=status)
    with pytest.raises(MetadataError, match=hint) as error:
        MetadataClient().get("meta-data/instance-id")
    assert not isinstance(error.value, MetadataUnavailable)
    assert str(status) in str(error.value) and "meta-data/instance-id" in str(error.value)
    assert len(responses.calls) == 1


@responses.activate
def test_imdsv1_is_used_only_when_allowed_and_the_token_endpoint_is_absent():
    responses.put(TOKEN_URL, status=404)
    responses.get(ID_URL, body="i-0v1")
    client = MetadataClient(allow_imdsv1=True)
    assert client.get("meta-data/instance-id") == "i-0v1"
    assert client.get("meta-data/instance-id") == "i-0v1"
    gets = [c for c in responses.calls if c.request.method == "GET"]
    assert all(imds.TOKEN_HEADER not in c.request.headers for c in gets)
    assert sum(c.request.method == "PUT" for c in responses.calls) == 1  # decided once


@responses.activate
def test_the_token_is_sent_and_its_ttl_asked_for():
    responses.put(TOKEN_URL, body="tok-1")
    responses.get(ID_URL, body="i-0abc")
    assert MetadataClient(token_ttl_s=300).get("meta-data/instance-id") == "i-0abc"
    put, get = responses.calls
    assert put.request.headers[imds.TOKEN_TTL_HEADER] == "300"
    assert get.request.headers[imds.TOKEN_HEADER] == "tok-1"


@responses.activate
def test_a_shorter_ttl_granted_by_the_service_is_respected():
    fake = FakeTime()
    responses.put(TOKEN_URL, body="tok", headers={imds.TOKEN_TTL_HEADER: "10"})
    responses.get(ID_URL, body="i-0abc")
    client = MetadataClient(token_ttl_s=21600, clock=fake.clock, sleep=fake.sleep)
    client.get("meta-data/instance-id")
    fake.now += 9.5  # past 10 s minus the margin, far before the 6 h asked for
    client.get("meta-data/instance-id")
    assert sum(c.request.method == "PUT" for c in responses.calls) == 2


@responses.activate
def test_5xx_is_retried_then_succeeds():
    responses.put(TOKEN_URL, body="tok")
    responses.get(ID_URL, status=503)
    responses.get(ID_URL, status=500)
    responses.get(ID_URL, body="i-0abc")
    fake = FakeTime()
    client = MetadataClient(clock=fake.clock, sleep=fake.sleep)
    assert client.get("meta-data/instance-id") == "i-0abc"
    assert len(fake.sleeps) == 2


@responses.activate
def test_backoff_is_jittered_exponential_capped_and_stops_at_the_deadline():
    responses.put(TOKEN_URL, body=requests.ConnectionError("refused"))
    fake = FakeTime()
    client = MetadataClient(deadline_s=60, clock=fake.clock, sleep=fake.sleep)
    with pytest.raises(MetadataUnavailable, match="within 60 s.*ConnectionError"):
        client.get("meta-data/instance-id")
    sleeps = fake.sleeps
    assert fake.now == pytest.approx(60)
    assert all(s <= imds.BACKOFF_CAP_S for s in sleeps)
    assert sleeps[0] <= imds.BACKOFF_BASE_S
    assert max(sleeps) > 2  # it grew
    assert len(set(sleeps)) > len(sleeps) // 2  # and it is jittered, not lockstep


@responses.activate
def test_a_4xx_on_a_get_names_the_path_and_is_not_retried():
    responses.put(TOKEN_URL, body="tok")
    responses.get(ID_URL, status=403)
    with pytest.raises(MetadataError, match="meta-data/instance-id: HTTP 403") as error:
        MetadataClient().get("meta-data/instance-id")
    assert error.value.path == "meta-data/instance-id"
    assert len(responses.calls) == 2


@responses.activate
def test_the_ipv6_endpoint_is_accepted():
    v6 = "http://[fd00:ec2::254]"
    responses.put(v6 + "/latest/api/token", body="tok")
    responses.get(v6 + "/latest/meta-data/instance-id", body="i-0v6")
    assert MetadataClient(v6).get("meta-data/instance-id") == "i-0v6"


@pytest.mark.parametrize("endpoint", ["169.254.169.254", "ftp://x", "http://x/latest", "http://"])
def test_a_bad_endpoint_is_refused(endpoint):
    with pytest.raises(MetadataError, match="endpoint"):
        MetadataClient(endpoint)


@pytest.mark.parametrize("path", ["", "/", "meta-data/../../etc"])
def test_a_bad_path_is_refused(path):
    with pytest.raises(MetadataError, match="not a path under /latest/"):
        MetadataClient().get(path)


def test_from_config_carries_every_setting():
    cfg = MetadataConfig(endpoint="http://[fd00:ec2::254]", allow_imdsv1=True, token_ttl_s=60,
                         connect_timeout_s=0.5, read_timeout_s=0.7, deadline_s=9)
    client = MetadataClient.from_config(cfg)
    assert (client.endpoint, client.allow_imdsv1, client.token_ttl_s, client.connect_timeout_s,
            client.read_timeout_s, client.deadline_s) == ("http://[fd00:ec2::254]", True, 60, 0.5, 0.7, 9)


def test_a_session_passed_in_is_made_to_ignore_the_environment():
    session = requests.Session()
    MetadataClient(session=session)
    assert session.trust_env is False

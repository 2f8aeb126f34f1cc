"""IMDSv1 fallback is not for good, and the token is refreshed by the TTL the service granted
(issue 15, item 11), over real HTTP against the local cloud's metadata emulator."""
from __future__ import annotations

import time

import pytest

from spotrun import imds
from spotrun.imds import MetadataClient
from spotrun.localcloud.imds import InstanceMetadata, MetadataServer

ID = "meta-data/instance-id"


class ShiftedClock:
    """The real monotonic clock, plus whatever the test moves it by."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
def server():
    md = InstanceMetadata("i-0123456789abcdef0", "p3.2xlarge", "us-east-1a", "use1-az1", "us-east-1",
                          "123456789012", "ami-12345678", "10.0.0.5", {}, None)
    srv = MetadataServer(md).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_the_refresh_margin_follows_the_ttl_granted_not_the_one_asked_for(server):
    """Asked 6 h, granted 30 s: the margin was a tenth of 6 h capped at 60 s, longer than the
    whole token, so every request fetched a new token."""
    server.token_ttl_cap = 30
    client = MetadataClient(server.endpoint, token_ttl_s=21600, deadline_s=5)
    for _ in range(5):
        assert client.get(ID) == "i-0123456789abcdef0"
    assert server.token_puts == 1


def test_a_granted_ttl_is_still_refreshed_before_it_runs_out(server):
    server.token_ttl_cap = 30
    clock = ShiftedClock()
    client = MetadataClient(server.endpoint, token_ttl_s=21600, deadline_s=5, clock=clock)
    client.get(ID)
    clock.offset += 27.5  # inside the last tenth of the 30 s granted
    client.get(ID)
    assert server.token_puts == 2


def test_imdsv1_fallback_goes_back_to_imdsv2_when_tokens_become_required(server):
    """The instance's metadata options were changed to "tokens required": the first 401
    sends the client back to IMDSv2 at once, instead of failing until the deadline."""
    server.token_endpoint, server.require_token = False, False
    client = MetadataClient(server.endpoint, allow_imdsv1=True, deadline_s=3)
    assert client.get(ID) == "i-0123456789abcdef0"
    assert "imdsv1=on" in repr(client)
    server.token_endpoint, server.require_token = True, True
    assert client.get(ID) == "i-0123456789abcdef0"
    assert "imdsv1=off" in repr(client)
    puts = server.token_puts
    assert client.get(ID) == "i-0123456789abcdef0"
    assert server.token_puts == puts  # the token is cached again


def test_imdsv1_fallback_tries_the_token_again_after_a_while(server):
    server.token_endpoint, server.require_token = False, False
    clock = ShiftedClock()
    client = MetadataClient(server.endpoint, allow_imdsv1=True, deadline_s=3, clock=clock)
    client.get(ID)
    client.get(ID)
    assert server.token_puts == 1  # not once per request
    server.token_endpoint = True  # tokens are optional still: nothing would ever say 401
    clock.offset += imds.V1_RECHECK_S
    assert client.get(ID) == "i-0123456789abcdef0"
    assert server.token_puts == 2 and "imdsv1=off" in repr(client)


def test_a_token_endpoint_still_absent_keeps_imdsv1_working(server):
    server.token_endpoint, server.require_token = False, False
    clock = ShiftedClock()
    client = MetadataClient(server.endpoint, allow_imdsv1=True, deadline_s=3, clock=clock)
    client.get(ID)
    clock.offset += imds.V1_RECHECK_S
    assert client.get(ID) == "i-0123456789abcdef0"
    assert server.token_puts == 2 and "imdsv1=on" in repr(client)

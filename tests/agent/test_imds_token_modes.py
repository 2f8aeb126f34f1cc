"""IMDSv1 fallback is not for good, and the token is refreshed by the TTL the service granted
(issue 15, item 11), over real HTTP against the local cloud's metadata emulator."""
from __future__ import annotations

import time

from spotrun.imds import V1_RECHECK_S

ID = "meta-data/instance-id"


class ShiftedClock:
    """The real monotonic clock, plus whatever the test moves it by."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def test_the_refresh_margin_follows_the_ttl_granted_not_the_one_asked_for(imds, metadata_client):
    """Asked 6 h, granted 30 s: the margin was a tenth of 6 h capped at 60 s, longer than the
    whole token, so every request fetched a new token."""
    imds.token_ttl_cap = 30
    client = metadata_client(token_ttl_s=21600, deadline_s=5)
    for _ in range(5):
        assert client.get(ID) == "i-0123456789abcdef0"
    assert imds.token_puts == 1


def test_a_granted_ttl_is_still_refreshed_before_it_runs_out(imds, metadata_client):
    imds.token_ttl_cap = 30
    clock = ShiftedClock()
    client = metadata_client(token_ttl_s=21600, deadline_s=5, clock=clock)
    client.get(ID)
    clock.offset += 27.5  # inside the last tenth of the 30 s granted
    client.get(ID)
    assert imds.token_puts == 2


def test_imdsv1_fallback_goes_back_to_imdsv2_when_tokens_become_required(imds, metadata_client):
    """The instance's metadata options were changed to "tokens required": the first 401
    sends the client back to IMDSv2 at once, instead of failing until the deadline."""
    imds.token_endpoint, imds.require_token = False, False
    client = metadata_client(allow_imdsv1=True, deadline_s=3)
    assert client.get(ID) == "i-0123456789abcdef0"
    assert "imdsv1=on" in repr(client)
    imds.token_endpoint, imds.require_token = True, True
    assert client.get(ID) == "i-0123456789abcdef0"
    assert "imdsv1=off" in repr(client)
    puts = imds.token_puts
    assert client.get(ID) == "i-0123456789abcdef0"
    assert imds.token_puts == puts  # the token is cached again


def test_imdsv1_fallback_tries_the_token_again_after_a_while(imds, metadata_client):
    imds.token_endpoint, imds.require_token = False, False
    clock = ShiftedClock()
    client = metadata_client(allow_imdsv1=True, deadline_s=3, clock=clock)
    client.get(ID)
    client.get(ID)
    assert imds.token_puts == 1  # not once per request
    imds.token_endpoint = True  # tokens are optional still: nothing would ever say 401
    clock.offset += V1_RECHECK_S
    assert client.get(ID) == "i-0123456789abcdef0"
    assert imds.token_puts == 2 and "imdsv1=off" in repr(client)


def test_a_token_endpoint_still_absent_keeps_imdsv1_working(imds, metadata_client):
    imds.token_endpoint, imds.require_token = False, False
    clock = ShiftedClock()
    client = metadata_client(allow_imdsv1=True, deadline_s=3, clock=clock)
    client.get(ID)
    clock.offset += V1_RECHECK_S
    assert client.get(ID) == "i-0123456789abcdef0"
    assert imds.token_puts == 2 and "imdsv1=on" in repr(client)

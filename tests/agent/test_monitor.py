"""spotrun.monitor over real HTTP against the local cloud's metadata emulator."""
from __future__ import annotations

import queue
import time
from datetime import datetime, timedelta, timezone

import pytest
from testkit import wait_until

from spotrun.monitor import InterruptionMonitor, Maintenance, Rebalance, SpotNotice, parse_time

POLL = 0.1


@pytest.fixture
def client(metadata_client):
    return metadata_client(connect_timeout_s=0.2, read_timeout_s=0.5, deadline_s=2.0)


@pytest.fixture
def running(client):
    """A started monitor delivering into a queue; always stopped."""
    events: queue.Queue = queue.Queue()
    monitor = InterruptionMonitor(client, poll_interval_s=POLL, on_event=events.put)
    monitor.start()
    try:
        yield monitor, events
    finally:
        monitor.stop()


def when(seconds: int) -> datetime:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).replace(microsecond=0)


def test_nothing_pending_means_no_events(imds, client):
    monitor = InterruptionMonitor(client, poll_interval_s=POLL)
    assert monitor.poll_once() == [] and monitor.poll_once() == []


def test_notice_rebalance_and_maintenance_are_each_reported_once(imds, client):
    monitor = InterruptionMonitor(client, poll_interval_s=POLL)
    now, t120, t200, not_before = when(0), when(120), when(200), when(600)
    imds.rebalance(now)
    assert monitor.poll_once() == [Rebalance(now)]
    imds.notice("terminate", t120)
    event_id = imds.schedule_maintenance("system-reboot", not_before, not_before + timedelta(hours=2),
                                         description="scheduled reboot")
    events = monitor.poll_once()
    assert events == [SpotNotice("terminate", t120),
                      Maintenance(event_id, "system-reboot", not_before, not_before + timedelta(hours=2),
                                  "scheduled reboot")]
    assert monitor.poll_once() == []  # de-duplicated
    # A changed notice (stop instead of terminate, a new time) is a new event.
    imds.notice("stop", t200)
    assert monitor.poll_once() == [SpotNotice("stop", t200)]


SPOT_READS = "meta-data/spot/instance-action"


def _counting_reads_at_delivery(client, imds):
    """A started monitor whose deliveries also note how many notice-path reads the metadata
    server had answered by then: "handed on by the first read that saw it" is counted by
    the server, not timed (the latency is a figure of `make bench`)."""
    events: queue.Queue = queue.Queue()

    def deliver(event):
        events.put((event, imds.gets[SPOT_READS]))
    monitor = InterruptionMonitor(client, poll_interval_s=POLL, on_event=deliver)
    monitor.start()
    return monitor, events


def test_the_thread_hands_a_notice_on_at_the_first_read_that_sees_it(imds, client):
    monitor, events = _counting_reads_at_delivery(client, imds)
    try:
        t120 = when(120)
        # Counted before the notice is posted: a read counted after the post may be the one
        # that sees it before this line runs (a busy machine did that once).
        reads_before = imds.gets[SPOT_READS]
        imds.notice("terminate", t120)
        event, reads_at_delivery = events.get(timeout=5)
        assert event == SpotNotice("terminate", t120)
        # The read that saw it, and at most one more (already on its way without it while the
        # notice was being posted): a notice seen and not handed on is read again.
        assert reads_at_delivery - reads_before <= 2, (reads_before, reads_at_delivery)
        imds.rebalance()
        assert isinstance(events.get(timeout=5)[0], Rebalance)
        assert events.empty()
    finally:
        monitor.stop()


def test_outage_then_notice_is_acted_on_at_the_first_read_after_it(imds, client, capsys):
    monitor, events = _counting_reads_at_delivery(client, imds)
    try:
        _outage_then_notice(imds, monitor, events, capsys)
    finally:
        monitor.stop()


def _outage_then_notice(imds, monitor, events, capsys):
    imds.fault("refused", duration_s=2.0)
    wait_until(lambda: monitor.in_outage, 10, "the monitor to see the outage", interval=0.01)
    imds.notice("terminate", when(120))  # published while metadata is down
    reads_in_outage = imds.gets[SPOT_READS]  # a refused connection is never answered
    wait_until(lambda: not imds.active_faults(), 10, "the emulator's outage to end", interval=0.01)
    event, reads_at_delivery = events.get(timeout=5)
    assert event.action == "terminate"
    # Handed on by the first notice-path read metadata answered once it was back.
    assert reads_at_delivery - reads_in_outage == 1, (reads_in_outage, reads_at_delivery)
    # Over once every path (each on its own schedule) has answered.
    wait_until(lambda: not monitor.in_outage, 10, "the monitor to see the outage end", interval=0.01)
    logged = capsys.readouterr().out
    assert logged.count('"metadata_outage_started"') == 1  # once per outage, not per poll
    assert logged.count('"metadata_outage_ended"') == 1


def test_5xx_outage_is_survived(imds, running):
    monitor, events = running
    imds.fault("5xx", duration_s=1.0)
    imds.rebalance()
    assert isinstance(events.get(timeout=10), Rebalance)
    assert not imds.active_faults()


def test_malformed_json_is_a_warning_naming_the_path_and_polling_goes_on(imds, client, capsys):
    monitor = InterruptionMonitor(client, poll_interval_s=POLL)
    t120 = when(120)
    imds.notice("terminate", t120)
    imds.fault("malformed")
    assert monitor.poll_once() == [] and monitor.poll_once() == []
    logged = capsys.readouterr().out
    malformed = [line for line in logged.splitlines() if '"metadata_malformed"' in line]
    spot = [line for line in malformed if '"path":"meta-data/spot/instance-action"' in line]
    assert len(spot) == 1  # named, and once per distinct bad answer, not once per poll
    assert len(malformed) <= 3  # (the emulator truncates every JSON document)
    imds.clear_faults()
    assert monitor.poll_once() == [SpotNotice("terminate", t120)]


def test_on_event_failure_does_not_stop_the_monitor(imds, client):
    delivered = queue.Queue()

    def flaky(event):
        delivered.put(event)
        if isinstance(event, Rebalance):
            raise RuntimeError("callback bug")

    monitor = InterruptionMonitor(client, poll_interval_s=POLL, on_event=flaky)
    monitor.start()
    try:
        imds.rebalance()
        assert isinstance(delivered.get(timeout=5), Rebalance)
        imds.notice("terminate", when(120))
        assert isinstance(delivered.get(timeout=5), SpotNotice)
    finally:
        monitor.stop()


def test_time_formats():
    utc = timezone.utc
    assert parse_time("2017-09-18T08:22:00Z", "time") == datetime(2017, 9, 18, 8, 22, tzinfo=utc)
    assert parse_time("21 Jan 2019 09:00:43 GMT", "NotBefore") == datetime(2019, 1, 21, 9, 0, 43, tzinfo=utc)
    with pytest.raises(ValueError, match="NotBefore 'soon' is not a time"):
        parse_time("soon", "NotBefore")

"""The lifecycle watches metadata from boot (issue 15, item 10): the real monitor on the local
cloud's metadata emulator over HTTP, the lifecycle's own run(); the volume edge is a recorder
whose acquire stands for a long step with a safe point in it. The e2e module
(tests/e2e/test_notice_in_every_phase_e2e.py) does the same with real agents and volumes."""
from __future__ import annotations

import getpass
import queue
import signal
import sys
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from spotrun import config
from spotrun.boot import Interrupted, StopRequested, Watch
from spotrun.imds import MetadataClient
from spotrun.lifecycle import Lifecycle, Phase
from spotrun.localcloud.imds import InstanceMetadata, MetadataServer
from spotrun.maintenance import MaintenancePlan
from spotrun.monitor import InterruptionMonitor, Rebalance, SpotNotice
from spotrun.notify import Notifier

IID = "i-0123456789abcdef0"


class Quiet(Notifier):
    """The real notifier outside systemd (no socket): every message is a no-op."""

    def __init__(self):
        super().__init__("")


class RecordingVolumes:
    """Acquire = a long step: waits until the notice is in the lifecycle's queue (the monitor
    must be running already), then reaches its safe point."""

    def __init__(self, lc_ref, imds, action):
        self.lc_ref, self.imds, self.action = lc_ref, imds, action
        self.calls: list[str] = []
        self.safe_point = lambda where: None

    def job_volumes(self):
        return []

    def acquire(self):
        self.calls.append("acquire")
        self.imds.notice(self.action, datetime.now(timezone.utc) + timedelta(seconds=60))
        lc = self.lc_ref()
        deadline = time.monotonic() + 20
        while lc.events.empty():
            assert time.monotonic() < deadline, "the monitor did not see the notice during acquire"
            time.sleep(0.02)  # polling the queue with a deadline
        self.safe_point("acquire.test")
        self.calls.append("acquired")
        return SimpleNamespace(volume_id="vol-1")

    def release(self, snapshot=None, final_tags=None, finished=False):
        self.calls.append(f"release(snapshot={snapshot})")

    def unmount_in_place(self):
        self.calls.append("unmount_in_place")

    def record(self, **values):
        self.calls.append("record")


@pytest.fixture
def imds():
    md = InstanceMetadata(IID, "p3.2xlarge", "us-east-1a", "use1-az1", "us-east-1",
                          "123456789012", "ami-12345678", "10.0.0.5", {}, None)
    server = MetadataServer(md).start()
    try:
        yield server
    finally:
        server.stop()


def _lifecycle(tmp_path, imds, action):
    cfg = config.from_mapping({
        "agent": {"state_dir": str(tmp_path / "state")},
        "volume": {"mount_point": str(tmp_path / "mnt")},
        "code": {"workspace": str(tmp_path)},
        "trainer": {"command": [sys.executable, "-c", "pass"], "user": getpass.getuser()}})
    client = MetadataClient(imds.endpoint, read_timeout_s=2.0, deadline_s=5.0)
    checkouts: list = []
    lc = None
    volumes = RecordingVolumes(lambda: lc, imds, action)
    lc = Lifecycle(cfg, metadata=client, notifier=Quiet(),
                   identify=lambda: SimpleNamespace(instance_id=IID, availability_zone="us-east-1a",
                                                    launched_by=None, log_context=lambda: {}),
                   volume_manager=lambda ident: volumes, checkout=lambda ident: checkouts.append(1),
                   cancel_fleet=lambda launched_by: pytest.fail("the fleet was cancelled"),
                   monitor=lambda put: InterruptionMonitor(client, poll_interval_s=0.1, on_event=put))
    return lc, volumes, checkouts


@pytest.mark.parametrize("action, end, held", [
    ("terminate", Phase.RELEASED, "release(snapshot=False)"),
    ("stop", Phase.STOPPED, "unmount_in_place"),
])
def test_a_notice_during_acquire_stops_it_at_its_safe_point(tmp_path, imds, action, end, held):
    lc, volumes, checkouts = _lifecycle(tmp_path, imds, action)
    assert lc.run() == 0
    assert lc.phase is end
    # Stopped inside acquire: the step after the safe point never ran, nor did the checkout;
    # what acquire held was given back (unfinished: no drain snapshot).
    assert volumes.calls == ["acquire", held]
    assert checkouts == [] and lc.supervisor is None
    assert lc.state.read()["phase"] == end.value
    assert lc._monitor is None  # the one monitor ended with the run


def test_the_watch_stops_for_notices_and_stops_not_for_a_rebalance():
    events: queue.Queue = queue.Queue()
    plan = MaintenancePlan(events.put, 120.0)
    watch = Watch(events, plan)
    now = datetime.now(timezone.utc)
    events.put(Rebalance(now))
    watch.check("a")  # logged, nothing to checkpoint before training
    events.put(SpotNotice("hibernate", now))
    with pytest.raises(Interrupted) as stop:
        watch.check("b")
    assert stop.value.where == "b" and stop.value.reason.keep_volume
    with pytest.raises(Interrupted) as again:  # once pending, every later safe point stops
        watch.check("c")
    assert again.value.where == "c"
    fresh = Watch(events, plan)
    events.put(StopRequested(signal.SIGTERM))
    with pytest.raises(Interrupted) as stopped:
        fresh.check("d")
    assert stopped.value.reason.action == "stop-request" and not stopped.value.reason.keep_volume
    plan.close()

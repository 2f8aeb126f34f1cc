"""Scheduled maintenance drains only when, and as, the event says (issue 15, item 7).

The lifecycle's training loop with its real edges where they matter: the local cloud's
metadata emulator over HTTP, the real monitor, a real trainer process (SIGTERM ends it).
The volume edge keeps count of what was asked of it. Each event is due ``LEAD`` seconds
before its NotBefore plus a couple of seconds, so the drain the old code armed would fire
within the test. The lifecycle's own steps (a drain armed, moved, disarmed or declined) are
awaited as they happen; where what is checked is that no drain comes, the phase is watched
only until the moment the armed drain was due, and what the volume was told.
"""
from __future__ import annotations

import getpass
import json
import queue
import signal
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from testkit import wait_until

from spotrun import config
from spotrun.lifecycle import Lifecycle, Phase, StopRequested
from spotrun.maintenance import MaintenanceDue, MaintenancePlan, drain_kind
from spotrun.monitor import InterruptionMonitor, Maintenance
from spotrun.notify import Notifier

LEAD = 120.0
DUE_IN = 2.5  # seconds from scheduling until the old code's timer would drain
DRAIN_STARTS_S = 1.0  # ample for a due drain to show in the phase (a queue hand-off)
TRAINER = ("import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
           "time.sleep(600)\n")


class Quiet(Notifier):
    """The real notifier outside systemd (no socket): every message is a no-op."""

    def __init__(self):
        super().__init__("")


class CountingVolume:
    def __init__(self):
        self.released = 0
        self.unmounted = 0
        self.acquired = 0
        self.held = True  # the fixture's lifecycle starts with the volume acquired
        self.writes_not_held: list[dict] = []

    def acquire(self):
        self.acquired += 1
        self.held = True
        return SimpleNamespace(volume_id="vol-1")

    def record(self, **values):
        if not self.held:
            self.writes_not_held.append(values)

    def release(self, snapshot=True, final_tags=None, finished=False):
        self.released += 1
        self.held = False

    def unmount_in_place(self):
        self.unmounted += 1

    def job_volumes(self):
        return []


@pytest.fixture
def training(metadata_client, tmp_path):
    """A lifecycle training in a thread; yields (lifecycle, volume, outcome); always ended."""
    cfg = config.from_mapping({
        "agent": {"state_dir": str(tmp_path / "state"), "maintenance_lead_s": LEAD},
        "volume": {"mount_point": str(tmp_path / "mnt")},
        "code": {"workspace": str(tmp_path)},
        "trainer": {"command": [sys.executable, "-c", TRAINER], "user": getpass.getuser(),
                    "protocol": "none", "max_restarts": 0, "drain_reserve_s": 1.0}})
    client = metadata_client(read_timeout_s=2.0, deadline_s=5.0)
    lc = Lifecycle(cfg, metadata=client, notifier=Quiet(), identify=None, volume_manager=None,
                   checkout=None, cancel_fleet=None,
                   monitor=lambda put: InterruptionMonitor(client, poll_interval_s=0.1, on_event=put))
    volume = CountingVolume()
    lc.identity = SimpleNamespace(instance_id="i-0123456789abcdef0", availability_zone="us-east-1a",
                                  launched_by=None)
    lc.volumes, lc.volume_id, lc.commit = volume, "vol-1", "abc123"
    cfg.checkpoints_path.mkdir(parents=True)
    for phase in (Phase.IDENTIFYING, Phase.ACQUIRING, Phase.CHECKING_OUT):
        lc.transition(phase)
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("rc", lc.train()), daemon=True)
    thread.start()
    wait_until(lambda: lc.phase is Phase.TRAINING and lc.supervisor.current is not None, 30, "training")
    try:
        yield lc, volume, outcome
    finally:
        if thread.is_alive():
            lc.events.put(StopRequested(signal.SIGTERM))
            thread.join(60)
        assert not thread.is_alive(), "the lifecycle did not end"


def stays_training_past_the_drain(lc, not_before: datetime) -> None:
    """Still training once the drain armed for ``not_before`` would have started.

    "No drain" is the property: no event marks it, only the passing of the moment the timer
    was set for (``LEAD`` before ``not_before``) and of a drain's start after it. So the
    window is only that long; the step that makes it so (the drain disarmed or moved) was
    awaited as an event before it."""
    due_in = (not_before - timedelta(seconds=LEAD) - datetime.now(timezone.utc)).total_seconds()
    until = time.monotonic() + max(0.0, due_in) + DRAIN_STARTS_S
    while time.monotonic() < until:
        assert lc.phase is Phase.TRAINING, f"drained: {lc.phase}"
        time.sleep(0.02)  # watching for a drain that must not come
    assert lc.phase is Phase.TRAINING, f"drained: {lc.phase}"


def due_soon() -> datetime:
    return datetime.now(timezone.utc) + timedelta(seconds=LEAD + DUE_IN)


def served(imds) -> bool:
    """The monitor has read the scheduled list since it last changed."""
    return any(e["event"] == "notice_served" and e.get("what") == "maintenance" for e in imds.events)


class Logged:
    """The maintenance plan's log lines (the test's captured stdout), as they come, by event.
    (The emulator logs events of the same names for what it is told: those are not these.)"""

    def __init__(self, capsys):
        self._capsys = capsys
        self._entries: list[dict] = []

    def __call__(self, event: str, **fields) -> bool:
        """Whether the plan logged ``event`` (with ``fields``) so far."""
        fields["component"] = "maintenance"
        for line in self._capsys.readouterr().out.splitlines():
            try:
                entry = json.loads(line[line.index("{"):])
            except ValueError:
                continue
            if isinstance(entry, dict):
                self._entries.append(entry)
        return any(e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
                   for e in self._entries)


@pytest.fixture
def logged(capsys):
    return Logged(capsys)


def test_a_canceled_event_does_not_drain(imds, training, logged):
    lc, volume, _ = training
    not_before = due_soon()
    event_id = imds.schedule_maintenance("instance-stop", not_before)
    wait_until(lambda: logged("maintenance_scheduled", event_id=event_id), 10, "the drain to be armed")
    imds.cancel_maintenance(event_id)
    wait_until(lambda: logged("maintenance_disarmed", event_id=event_id), 10, "the drain to be disarmed")
    stays_training_past_the_drain(lc, not_before)
    assert volume.released == 0 and volume.unmounted == 0


def test_a_canceled_event_still_listed_does_not_drain(imds, training, logged):
    lc, volume, _ = training
    not_before = due_soon()
    event_id = imds.schedule_maintenance("instance-retirement", not_before)
    wait_until(lambda: logged("maintenance_scheduled", event_id=event_id), 10, "the drain to be armed")
    imds.cancel_maintenance(event_id, listed=True)
    wait_until(lambda: logged("maintenance_disarmed", event_id=event_id, state="canceled"), 10,
               "the drain to be disarmed")
    stays_training_past_the_drain(lc, not_before)
    assert volume.released == 0


def test_a_rescheduled_event_moves_its_drain(imds, training, logged):
    lc, volume, _ = training
    not_before = due_soon()
    event_id = imds.schedule_maintenance("instance-stop", not_before)
    wait_until(lambda: logged("maintenance_scheduled", event_id=event_id), 10, "the drain to be armed")
    imds.reschedule_maintenance(event_id, datetime.now(timezone.utc) + timedelta(days=3))
    wait_until(lambda: logged("maintenance_rescheduled", event_id=event_id), 10, "the drain to be moved")
    stays_training_past_the_drain(lc, not_before)  # the first time, not the new one
    assert lc.maintenance.armed() == [event_id]  # still prepared for, at the new time
    assert volume.released == 0


def test_a_reboot_event_drains_and_keeps_the_volume_attached(imds, training):
    lc, volume, _ = training
    imds.schedule_maintenance("system-reboot", due_soon())
    wait_until(lambda: lc.state.read().get("phase") == "stopped", 30, "the drain, in the state file")
    assert (volume.unmounted, volume.released) == (1, 0) and lc.phase is Phase.STOPPED


def test_network_maintenance_needs_no_drain(imds, training, logged):
    lc, volume, _ = training
    event_id = imds.schedule_maintenance("system-maintenance", due_soon(),
                                         description="scheduled network maintenance")
    wait_until(lambda: served(imds), 10, "the monitor to read the event")
    # The lifecycle's decision, as it takes the event in: no drain armed (the old code armed one).
    wait_until(lambda: logged("maintenance_no_drain", event_id=event_id), 10, "the event to be taken in")
    assert lc.maintenance.armed() == [] and lc.phase is Phase.TRAINING
    assert volume.released == 0 and volume.unmounted == 0


def test_maintenance_that_stops_the_instance_drains_and_releases(imds, training):
    lc, volume, _ = training
    imds.schedule_maintenance("system-maintenance", due_soon(),
                              description="The instance will be stopped for power maintenance")
    wait_until(lambda: lc.phase is Phase.RELEASED, 30, "the drain")
    assert (volume.released, volume.unmounted) == (1, 0)


@pytest.mark.parametrize("code,drained", [("instance-stop", Phase.RELEASED), ("system-reboot", Phase.STOPPED)])
def test_a_drain_for_an_event_then_canceled_takes_the_volume_back_and_trains_on(imds, training, code, drained):
    """The old agent sat in released/stopped waiting for a termination that never came."""
    lc, volume, outcome = training
    event_id = imds.schedule_maintenance(code, due_soon())
    wait_until(lambda: lc.phase is drained, 30, "the drain")
    first = lc.supervisor
    imds.cancel_maintenance(event_id)
    wait_until(lambda: lc.phase is Phase.TRAINING and lc.supervisor is not first
             and lc.supervisor.current is not None, 30, "training again")
    assert volume.acquired == 1 and "rc" not in outcome
    assert lc.state.read()["phase"] == "training" and lc.interruptions == 1
    # Released, the volume was the next holder's until acquired again: the long soak's ledger
    # caught the "acquiring-volume" phase tag written to it before the lease was taken back.
    assert volume.writes_not_held == []


def test_a_notice_after_a_maintenance_drain_leaves_it_drained(imds, training):
    lc, volume, outcome = training
    imds.schedule_maintenance("instance-stop", due_soon())
    wait_until(lambda: lc.phase is Phase.RELEASED, 30, "the drain")
    imds.notice("terminate", datetime.now(timezone.utc) + timedelta(seconds=120))
    wait_until(lambda: "rc" in outcome, 10, "the lifecycle to settle for the termination")
    assert lc.phase is Phase.RELEASED and volume.acquired == 0 and volume.released == 1


def event(code: str, seconds: float, description: str = "", state: str = "active", event_id="ev-1"):
    not_before = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    return Maintenance(event_id, code, not_before, None, description, state)


@pytest.mark.parametrize("code,description,kind", [
    ("instance-reboot", "", ("instance-reboot", True)),
    ("system-reboot", "", ("system-reboot", True)),
    ("instance-stop", "", ("instance-stop", False)),
    ("instance-retirement", "", ("instance-retirement", False)),
    ("system-maintenance", "scheduled network maintenance", None),
    ("system-maintenance", "power maintenance: the instance will be rebooted", ("system-maintenance", True)),
    ("system-maintenance", "the instance will be stopped", ("system-maintenance", False)),
    ("instance-explode", "", ("instance-explode", False)),  # unknown: the safe drain
])
def test_each_code_gets_its_drain(code, description, kind):
    assert drain_kind(event(code, 600, description)) == kind


def test_a_drain_that_fired_before_the_cancel_is_not_current():
    due: queue.Queue = queue.Queue()
    plan = MaintenancePlan(due.put, lead_s=0.0)
    try:
        plan.update(event("instance-stop", 0.0))
        fired = due.get(timeout=5)
        assert isinstance(fired, MaintenanceDue) and plan.is_current(fired)
        plan.update(event("instance-stop", 0.0, state="canceled"))
        assert not plan.is_current(fired) and plan.armed() == []
        plan.update(event("instance-stop", 0.0))  # announced again: a new generation
        again = due.get(timeout=5)
        assert plan.is_current(again) and not plan.is_current(fired)
        plan.update(event("instance-stop", 3600.0))  # rescheduled: the fired one is stale
        assert not plan.is_current(again) and plan.armed() == ["ev-1"]
        with pytest.raises(queue.Empty):
            due.get(timeout=0.3)
    finally:
        plan.close()

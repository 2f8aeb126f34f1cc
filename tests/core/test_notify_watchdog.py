"""systemd's view of the agent: READY, STOPPING and the watchdog, read from a real
AF_UNIX datagram socket standing in for $NOTIFY_SOCKET.

The lifecycle runs for real (trainer process, supervisor, signal handler); only the cloud
edges (volume manager, monitor) are fakes. A hung agent must miss its WATCHDOG=1 pings and a
busy one must not: the pings have to come from the training loop, the drain's wait for the
trainer and the wait for termination, each of which may last minutes.
"""
from __future__ import annotations

import getpass
import os
import signal
import socket
import sys
import threading
from types import SimpleNamespace

import pytest

from spotrun import config
from spotrun.lifecycle import Lifecycle, Phase
from spotrun.notify import Notifier

from tests.helpers.testkit import wait_until

WATCHDOG_S = 0.4  # pings at most every 0.1 s, waits sliced at 0.2 s

# Takes a while to checkpoint after SIGTERM, as a real trainer does.
TRAINER = ("import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1.5), sys.exit(0)))\n"
           "time.sleep(120)\n")


class Listener:
    """Every datagram systemd would have received, in order."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue

    def count(self, line: str, messages=None) -> int:
        return sum(line in m.split("\n") for m in (self.messages if messages is None else messages))

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listener(tmp_path):
    made = Listener(tmp_path / "notify.sock")
    yield made
    made.close()


class Volumes:
    def record(self, **values):
        pass

    def release(self, snapshot=True, final_tags=None, finished=False):
        pass

    def unmount_in_place(self):
        pass

    def job_volumes(self):
        return []


class NoMonitor:
    def start(self):
        pass

    def stop(self):
        pass


def _lifecycle(tmp_path, notifier, **edges):
    cfg = config.from_mapping({
        "agent": {"state_dir": str(tmp_path / "state")},
        "volume": {"mount_point": str(tmp_path / "mnt")},
        "code": {"workspace": str(tmp_path)},
        "trainer": {"command": [sys.executable, "-c", TRAINER], "user": getpass.getuser(),
                    "protocol": "none", "max_restarts": 0, "drain_reserve_s": 1.0}})
    defaults = dict(identify=None, volume_manager=None, checkout=None, cancel_fleet=None,
                    monitor=lambda put: NoMonitor())
    return Lifecycle(cfg, metadata=None, notifier=notifier, **{**defaults, **edges})


def test_notifier_watchdog_follows_the_environment(tmp_path, listener):
    address = str(tmp_path / "notify.sock")
    assert Notifier(address, environ={}).kick() is False  # no WatchdogSec: no ping
    assert Notifier("", environ={"WATCHDOG_USEC": "1000000"}).kick() is False  # outside systemd
    other = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(address, environ=other).watchdog_s is None  # meant for another process
    now = [100.0]
    mine = Notifier(address, environ={"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())},
                    clock=lambda: now[0])
    assert mine.watchdog_s == 60 and mine.kick_every_s == 30
    assert mine.kick() is True
    assert mine.kick() is False  # rate-limited: callers kick from tight loops
    now[0] += 15
    assert mine.kick() is True
    with mine.watchdog_stretched(900):
        pass
    wait_until(lambda: listener.count("WATCHDOG=1") == 3, 5, "three pings")
    assert listener.messages == ["WATCHDOG=1", "WATCHDOG=1", "WATCHDOG_USEC=900000000",
                                 "WATCHDOG_USEC=60000000", "WATCHDOG=1"]


def test_ready_comes_before_the_first_step(tmp_path, listener):
    seen_at_identify: list[str] = []

    class Stop(Exception):
        pass

    def identify():
        wait_until(lambda: listener.count("READY=1"), 5, "READY=1")
        seen_at_identify.extend(listener.messages)
        raise Stop()

    lc = _lifecycle(tmp_path, Notifier(str(tmp_path / "notify.sock"), watchdog_s=WATCHDOG_S),
                    identify=identify)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(Stop):
            lc.run()
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    [ready] = [m for m in seen_at_identify if "READY=1" in m.split("\n")]
    assert "STATUS=identifying" in ready


def test_training_and_the_drain_kick_the_watchdog_and_a_stop_signal_says_stopping(tmp_path, listener):
    lc = _lifecycle(tmp_path, Notifier(str(tmp_path / "notify.sock"), watchdog_s=WATCHDOG_S))
    lc.identity = SimpleNamespace(instance_id="i-0123", availability_zone="az-1", launched_by=None)
    lc.volumes, lc.volume_id, lc.commit = Volumes(), "vol-1", "abc123"
    lc.config.checkpoints_path.mkdir(parents=True)
    for phase in (Phase.IDENTIFYING, Phase.ACQUIRING, Phase.CHECKING_OUT):
        lc.transition(phase)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    lc._install_signal_handlers()  # the test runs in the main thread, as the agent does
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("rc", lc.train()), daemon=True)
    try:
        thread.start()
        wait_until(lambda: lc.phase is Phase.TRAINING and lc.supervisor.current is not None
                   and lc.supervisor.current.pid, 30, "training")
        # A training agent keeps pinging: wait for pings that came after training began.
        start = len(listener.messages)
        wait_until(lambda: listener.count("WATCHDOG=1", listener.messages[start:]) >= 3, 30,
                   "watchdog pings while training")
        assert listener.count("STOPPING=1") == 0
        os.kill(os.getpid(), signal.SIGTERM)  # what `systemctl stop` sends
        thread.join(60)
        assert not thread.is_alive() and outcome["rc"] == 0 and lc.phase is Phase.RELEASED
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
        if thread.is_alive() and lc.supervisor is not None:
            lc.supervisor.request_stop()
    messages = list(listener.messages)
    stopping = [i for i, m in enumerate(messages) if "STOPPING=1" in m.split("\n")]
    draining = [i for i, m in enumerate(messages) if m.startswith("STATUS=draining")]
    released = [i for i, m in enumerate(messages) if m.startswith("STATUS=released")]
    assert len(stopping) == 1 and draining and released
    assert stopping[0] < draining[0] < released[0]
    # The trainer took 1.5 s to checkpoint: the drain's wait for it kept pinging.
    assert listener.count("WATCHDOG=1", messages[draining[0]:released[0]]) >= 2, messages


def test_waiting_for_termination_keeps_pinging(tmp_path, listener):
    lc = _lifecycle(tmp_path, Notifier(str(tmp_path / "notify.sock"), watchdog_s=WATCHDOG_S))
    assert lc.wait_for_termination(timeout=2.0) is False
    wait_until(lambda: listener.count("WATCHDOG=1") >= 3, 5, "pings while waiting to be terminated")

import os
import signal
import socket
import subprocess
import sys

from spotrun.notify import Notifier
from spotrun.state import StateFile, kill_leftover_trainer, process_start_ticks


def test_notifier_sends_datagrams(tmp_path):
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    try:
        notifier = Notifier(str(path))
        assert notifier.ready("acquiring-volume")
        assert server.recv(4096) == b"READY=1\nSTATUS=acquiring-volume"
        assert notifier.status("training epoch 2/5\nstep 3")
        assert server.recv(4096) == b"STATUS=training epoch 2/5 step 3"
    finally:
        server.close()


def test_notifier_is_a_no_op_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert Notifier().ready() is False


def test_state_file_round_trip_and_corruption(tmp_path):
    state = StateFile(tmp_path / "state.json")
    assert state.read() == {}
    state.write({"phase": "training", "trainer": None})
    assert state.read()["phase"] == "training"
    (tmp_path / "state.json").write_text("{torn")
    assert state.read() == {}


def test_leftover_trainer_of_a_dead_agent_is_stopped(tmp_path):
    # A "trainer" in its own process group that records SIGTERM before exiting.
    marker = tmp_path / "got-term"
    code = ("import signal, sys, time, pathlib\n"
            f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(marker)!r}).write_text('x'), sys.exit(0)))\n"
            "print('ready', flush=True)\n"
            "while True: time.sleep(1)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        previous = {"trainer": {"pid": proc.pid, "start_ticks": process_start_ticks(proc.pid)}}
        assert kill_leftover_trainer(previous, grace_s=10) is True
        assert proc.wait(10) == 0
        assert marker.read_text() == "x"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_reused_pid_is_not_killed():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        stale = {"trainer": {"pid": proc.pid, "start_ticks": process_start_ticks(proc.pid) - 1}}
        assert kill_leftover_trainer(stale, grace_s=1) is False
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()

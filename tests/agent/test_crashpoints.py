"""Crash points: SIGKILL exactly at the named point (a real subprocess), nowhere else; every
point is passed by the code, in the listed order (the kill test enumerates CRASHPOINTS)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spotrun import crashpoints

AGENT = Path(__file__).resolve().parents[2] / "agent" / "spotrun"

SCRIPT = """
import sys
from spotrun.crashpoints import crashpoint
crashpoint("migration.snapshot_requested")
print("passed", flush=True)
crashpoint("migration.volume_created")
print("after", flush=True)
"""


def run(env_value):
    env = {"PATH": "/usr/bin:/bin"}
    if env_value:
        env[crashpoints.ENV] = env_value
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=60)


def test_kills_with_sigkill_at_the_named_point():
    result = run("migration.volume_created")
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.split() == ["passed"]


def test_no_effect_when_unset():
    result = run(None)
    assert result.returncode == 0 and result.stdout.split() == ["passed", "after"]


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="unknown crash point"):
        crashpoints.crashpoint("migration.nope")


def test_every_listed_point_is_in_the_code_once():
    source = "\n".join(p.read_text() for p in AGENT.glob("*.py") if p.name != "crashpoints.py")
    used = re.findall(r'crashpoint\("([^"]+)"\)', source)
    assert sorted(used) == sorted(crashpoints.CRASHPOINTS)
    assert len(used) == len(set(used))


def test_a_pause_point_stops_the_process_there_until_it_is_continued():
    script = ("from spotrun.crashpoints import pausepoint\n"
              "print('before', flush=True)\n"
              "pausepoint('checkout.started')\n"
              "print('after', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={"PATH": "/usr/bin:/bin", crashpoints.PAUSE_ENV: "checkout.started"})
    assert proc.stdout.readline().strip() == "before"
    # waitid(WSTOPPED) returns once the child has stopped itself: no polling, no sleep.
    stopped = os.waitid(os.P_PID, proc.pid, os.WSTOPPED | os.WNOWAIT)
    assert stopped.si_code == os.CLD_STOPPED and stopped.si_status == signal.SIGSTOP
    os.kill(proc.pid, signal.SIGCONT)
    assert proc.stdout.readline().strip() == "after"
    assert proc.wait(30) == 0
    with pytest.raises(ValueError, match="unknown pause point"):
        crashpoints.pausepoint("checkout.nope")


def test_every_pause_point_is_in_the_code_once():
    source = "\n".join(p.read_text() for p in AGENT.glob("*.py") if p.name != "crashpoints.py")
    used = re.findall(r'pausepoint\("([^"]+)"\)', source)
    assert sorted(used) == sorted(crashpoints.PAUSEPOINTS) and len(used) == len(set(used))

"""Fault points: in the agent as shipped, every point is passed as if it were not there, whatever
the environment says; the test launcher (spotrun.localcloud.faultagent) installs hooks that
SIGKILL exactly at the named crash point or SIGSTOP at the named pause point (a real
subprocess), and records the AWS calls made; every point is passed by the code, in the listed
order (the kill test enumerates CRASHPOINTS)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spotrun import awsclients, crashpoints
from spotrun.localcloud import faultagent

AGENT = Path(__file__).resolve().parents[2] / "agent" / "spotrun"
FAULTS = {faultagent.CRASH_ENV: "migration.volume_created",
          faultagent.PAUSE_ENV: "checkout.started"}

POINTS = """
from spotrun.crashpoints import crashpoint, pausepoint
crashpoint("migration.snapshot_requested")
print("passed", flush=True)
pausepoint("checkout.started")
crashpoint("migration.volume_created")
print("after", flush=True)
"""
# What the launcher does before it hands over to spotrun's CLI.
LAUNCHED = "from spotrun.localcloud import faultagent\nfaultagent.install_from_env()\n" + POINTS


def run(script: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **(env or {})}, timeout=60)


def test_the_shipped_agent_ignores_the_fault_variables():
    """Issue 14: the variables that stop or kill an agent under the launcher do nothing to a
    process that is only spotrun (the installed agent: `spotrun agent run`)."""
    result = run("import spotrun.cli\n" + POINTS, FAULTS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["passed", "after"]
    assert type(crashpoints.HOOKS) is crashpoints.NoFaults


def test_the_launcher_kills_with_sigkill_at_the_named_point():
    result = run(LAUNCHED, {faultagent.CRASH_ENV: "migration.volume_created"})
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.split() == ["passed"]


def test_the_launcher_without_fault_variables_changes_nothing():
    result = run(LAUNCHED)
    assert result.returncode == 0 and result.stdout.split() == ["passed", "after"]


def test_the_launcher_refuses_an_unknown_point_rather_than_never_firing():
    result = run(LAUNCHED, {faultagent.CRASH_ENV: "migration.nope"})
    assert result.returncode == 1 and "SPOTRUN_CRASH_AT='migration.nope'" in result.stderr
    result = run(LAUNCHED, {faultagent.PAUSE_ENV: "migration.volume_created"})
    assert result.returncode == 1 and "SPOTRUN_PAUSE_AT=" in result.stderr


def test_the_launcher_is_spotrun_with_the_same_arguments():
    help_text = subprocess.run([sys.executable, "-m", "spotrun.localcloud.faultagent", "agent",
                                "run", "--help"], capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0, help_text.stderr
    assert help_text.stdout.startswith("usage: spotrun agent run") and "--no-user-data" in help_text.stdout
    from spotrun.localcloud.agents import agent_argv
    assert agent_argv("agent", "run") == [sys.executable, "-m", "spotrun.localcloud.faultagent",
                                          "agent", "run"]


def test_installed_hooks_see_every_point_and_none_restores_the_no_op():
    seen = []

    class Hooks(crashpoints.NoFaults):
        def crash(self, name):
            seen.append(("crash", name))

        def pause(self, name):
            seen.append(("pause", name))

    previous = crashpoints.install(Hooks())
    try:
        assert type(previous) is crashpoints.NoFaults
        crashpoints.crashpoint("migration.attached")
        crashpoints.pausepoint("identify.started")
        with pytest.raises(ValueError, match="unknown crash point"):
            crashpoints.crashpoint("migration.nope")
    finally:
        crashpoints.install(None)
    crashpoints.crashpoint("migration.attached")
    assert seen == [("crash", "migration.attached"), ("pause", "identify.started")]
    assert type(crashpoints.HOOKS) is crashpoints.NoFaults


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="unknown crash point"):
        crashpoints.crashpoint("migration.nope")
    with pytest.raises(ValueError, match="unknown pause point"):
        crashpoints.pausepoint("checkout.nope")


def test_every_listed_point_is_in_the_code_once():
    source = "\n".join(p.read_text() for p in AGENT.glob("*.py") if p.name != "crashpoints.py")
    used = re.findall(r'crashpoint\("([^"]+)"\)', source)
    assert sorted(used) == sorted(crashpoints.CRASHPOINTS)
    assert len(used) == len(set(used))


def test_the_launchers_pause_point_stops_the_process_there_until_it_is_continued():
    script = ("from spotrun.localcloud import faultagent\n"
              "faultagent.install_from_env()\n"
              "from spotrun.crashpoints import pausepoint\n"
              "print('before', flush=True)\n"
              "pausepoint('checkout.started')\n"
              "print('after', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={"PATH": "/usr/bin:/bin", faultagent.PAUSE_ENV: "checkout.started"})
    assert proc.stdout.readline().strip() == "before"
    # waitid(WSTOPPED) returns once the child has stopped itself: no polling, no sleep.
    stopped = os.waitid(os.P_PID, proc.pid, os.WSTOPPED | os.WNOWAIT)
    assert stopped.si_code == os.CLD_STOPPED and stopped.si_status == signal.SIGSTOP
    os.kill(proc.pid, signal.SIGCONT)
    assert proc.stdout.readline().strip() == "after"
    assert proc.wait(30) == 0


def test_every_pause_point_is_in_the_code_once():
    source = "\n".join(p.read_text() for p in AGENT.glob("*.py") if p.name != "crashpoints.py")
    used = re.findall(r'pausepoint\("([^"]+)"\)', source)
    assert sorted(used) == sorted(crashpoints.PAUSEPOINTS) and len(used) == len(set(used))


class _Raw:
    def stream(self, **_):
        yield b"<DescribeVolumesResponse><volumeSet/></DescribeVolumesResponse>"


def _answer(request=None, **_):
    """A before-send handler: EC2's answer without a network."""
    from botocore.awsrequest import AWSResponse
    return AWSResponse(request.url, 200, {}, _Raw())


def test_recording_reaches_clients_made_before_and_after_and_stops_when_done(tmp_path,
                                                                           monkeypatch):
    """The recording hook goes through spotrun.awsclients.register: on every client of the
    process, however old; none is left behind."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")

    def described(made):
        made.meta.events.register("before-send", _answer)
        assert made.describe_volumes()["Volumes"] == []

    def new_client(tag: str):
        return awsclients.client("ec2", region="us-east-1",
                                 endpoint_url=f"http://127.0.0.1:9/{tag}-{tmp_path.name}")

    record = tmp_path / "calls.jsonl"
    before = new_client("before")
    with faultagent.recording_aws_calls(record):
        after = new_client("after")
        described(before)
        described(after)
    described(before)
    described(after)
    actions = [json.loads(line)["action"] for line in record.read_text().splitlines()]
    assert actions == ["ec2:DescribeVolumes", "ec2:DescribeVolumes"]
    assert not awsclients._handlers

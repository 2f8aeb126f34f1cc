"""The installed agent under systemd, on the local spot cloud running on the host.

The container shares the host's network, so the emulated EC2 API (moto behind the
fault proxy) and each instance's metadata server on 127.0.0.1 are reachable from it; the
host's loop devices and the cloud's directory (device links, mount points, the git
repository) are bound in at the same paths. The machine-level settings the local cloud
needs go in /etc/spotrun/agent.toml; the job comes, as on EC2, in the instance's user
data through the metadata service. There is no cloud-init in the container, so the
test writes the copy of the user data that cloud-init keeps, which is what the unit's
start condition looks at.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from unitjob import UNIT  # noqa: E402

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.loopdev]


def test_agent_trains_as_ubuntu_reports_to_systemd_and_systemctl_stop_drains(job):
    j = job(steps=100000)
    j.start()
    j.await_event(event="phase_changed", phase="training")
    j.await_step(10)
    # The job's volume is mounted for the whole system, not in a private namespace.
    source, fstype = j.mounted().split()
    assert source.startswith("/dev/loop") and fstype == "ext4"
    state = json.loads((j.inst.state_dir / "state.json").read_text())
    user = j.container.run(["ps", "-o", "user=", "-p", str(state["trainer"]["pid"])]).stdout
    assert user.strip() == "ubuntu"
    unit = j.unit("ActiveState", "StatusText")
    assert unit["ActiveState"] == "active" and unit["StatusText"].startswith("training"), unit
    status = j.container.run(["systemctl", "status", "--no-pager", UNIT], check=False).stdout
    assert f"Status: \"{unit['StatusText'][:20]}" in status
    # The trainer's own output, under its own identifier.
    trainer_log = j.container.run(["journalctl", "--no-pager", "-t", "spotrun-trainer",
                                   "-o", "cat"]).stdout
    assert '"event": "trainer_start"' in trainer_log
    # Structured fields, and -p warning keeps only warnings and worse.
    started = j.events(event="agent_starting")[0]
    assert {"ts", "level", "component", "job"} <= set(started)
    for entry in json.loads("[" + ",".join(j.container.run(
            ["journalctl", "--no-pager", "-u", UNIT, "-p", "warning", "-o", "json"]
    ).stdout.splitlines()) + "]"):
        assert int(entry["PRIORITY"]) <= 4, entry

    reached = j.progress_step()
    j.container.run(["systemctl", "stop", UNIT], timeout=150)

    drained = j.events(event="trainer_drained")[-1]
    assert drained["checkpoint_step"] >= reached
    assert j.events(event="phase_changed", phase="released")
    assert j.unit("ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
    assert j.mounted() == ""
    assert j.volume()["State"] == "available"  # released for the next instance
    assert not j.fleet.state.startswith("cancelled")  # a stop is not a completion


def test_a_spot_notice_drains_and_releases_the_volume(job):
    j = job(steps=100000)
    j.start()
    j.await_step(10)
    j.cloud.interrupt(j.inst.instance_id, "terminate", in_seconds=20)
    j.await_event(event="interruption_notice")
    drained = j.await_event(event="trainer_drained")
    assert drained["checkpoint_step"] >= 10
    j.await_event(event="phase_changed", phase="released")
    assert j.mounted() == ""
    j.container.wait_for(lambda: j.volume()["State"] == "available", "the volume released")
    assert not j.events(event="fleet_cancelled")
    # Released, the agent waits to be terminated; a stop then must not need systemd's SIGKILL.
    started = time.monotonic()
    j.container.run(["systemctl", "stop", UNIT], timeout=150)
    stop_s = time.monotonic() - started
    result = j.unit("Result")["Result"]
    # (It once sent STOPPING=1 after the drain: systemd then sent no SIGTERM and killed it
    # at TimeoutStopSec.)
    assert result == "success" and stop_s < 30, (result, stop_s)


def test_a_completed_job_cancels_its_fleet(job):
    j = job(steps=40)
    j.start()
    done = j.await_event(event="completion_recorded", timeout=120)
    assert done["metrics"]["sum"] == 40 * 41 // 2
    j.container.wait_for(lambda: j.fleet.state.startswith("cancelled"), "the fleet cancelled",
                         timeout=60)
    assert j.mounted() == ""


def test_systemctl_kill_signals_the_whole_unit_and_never_completes_the_job(job):
    """`systemctl kill` sends SIGTERM to every process of the unit at once, as a shutdown may:
    the trainer's own exit races the agent's drain (issue 16). Nothing completes, the fleet
    stays; the next start resumes from the drain's checkpoint and finishes with every step
    counted once (the counting trainer's sum)."""
    from spotrun import tags as T

    steps = 300
    j = job(steps=steps)
    j.start()
    j.await_step(20)
    j.container.run(["systemctl", "kill", UNIT])  # --kill-whom=all, SIGTERM
    j.container.wait_for(lambda: j.unit("ActiveState")["ActiveState"] in ("inactive", "failed"),
                         "the unit to stop after systemctl kill", timeout=150)
    assert not j.events(event="completion_recorded"), j.journal()
    assert not j.fleet.state.startswith("cancelled")
    assert T.COMPLETED not in T.as_dict(j.volume().get("Tags"))
    assert j.mounted() == ""
    drained = j.events(event="trainer_drained")
    assert drained and drained[-1]["checkpoint_step"] >= 20, j.journal()

    j.container.run(["systemctl", "reset-failed", UNIT], check=False)
    j.container.run(["systemctl", "start", "--no-block", UNIT])
    done = j.await_event(event="completion_recorded", timeout=150)
    assert done["metrics"]["sum"] == steps * (steps + 1) // 2, done
    assert done["metrics"]["runs"] == 2, done  # resumed once, from the drain's checkpoint
    j.container.wait_for(lambda: j.fleet.state.startswith("cancelled"), "the fleet cancelled",
                         timeout=60)

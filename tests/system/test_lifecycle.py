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
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from nspawn import Container, apt_install  # noqa: E402

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.loopdev]

REPO = Path(__file__).resolve().parents[2]
COUNTING_TRAINER = REPO / "agent/spotrun/soak_trainer.py"
UNIT = "spotrun-agent"


@pytest.fixture(scope="module")
def world(system_ready, deb):
    """The local spot cloud, a git repository of training code, and the booted system."""
    tomli_w = pytest.importorskip("tomli_w")
    from spotrun.localcloud import LocalCloud, TimingModel
    from spotrun.rehearsal import commit_repository

    # Bound into the container and traversed by the training user: not pytest's 0700 tmp.
    shared = Path(tempfile.mkdtemp(prefix="spotrun-systest-"))
    shared.chmod(0o755)
    try:
        repo = shared / "repo"
        commit_repository(repo, {"train.py": COUNTING_TRAINER}, "counting trainer")
        with LocalCloud(shared / "cloud", TimingModel.fast()) as cloud:
            if not cloud.uses_loop_devices:
                pytest.skip("the local cloud has no loop devices here")
            workdir = shared / "container"
            workdir.mkdir()
            with Container(workdir, binds=[str(shared)]) as container:
                apt_install(container, deb)
                yield SimpleNamespace(cloud=cloud, container=container, tomli_w=tomli_w,
                                      repository=f"file://{repo}")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


class Job:
    """One job on its own Spot Fleet, its agent run by systemd in the container."""

    def __init__(self, world, job_id: str, steps: int, ckpt_every: int = 100000):
        from spotrun import userdata
        from spotrun.localcloud.fleet import LaunchSpec

        self.world, self.job_id = world, job_id
        self.container, self.cloud = world.container, world.cloud
        # One agent per job (the container's): the operator's promise of a single instance
        # lets the agent run without a lease table.
        job = {"job": {"id": job_id}, "aws": {"single_instance": True},
               "code": {"repository": world.repository, "ref": "main"},
               "trainer": {"command": ["/usr/bin/python3", "train.py"],
                           "env": {"STEPS": str(steps), "STEP_S": "0.05",
                                   "CKPT_EVERY": str(ckpt_every)}}}
        # (The system python3 imports spotrun_trainer through trainer.library_path, the
        # .deb's /usr/lib/spotrun/trainer-lib, as a DLAMI's conda env would.)
        self.user_data = userdata.render(job)
        booted: list = []
        self.fleet_id = self.cloud.request_spot_fleet(
            1, launch=LaunchSpec(user_data=self.user_data), az_policy=f"fixed:{self.cloud.azs[0]}",
            boot=lambda cloud, inst: booted.append(inst))  # the "boot" is systemd's, below
        self.fleet = self.cloud.fleets[self.fleet_id]
        self.inst = self.container.wait_for(lambda: booted and booted[0], "the fleet's instance")

    def start(self) -> None:
        machine = self.inst.agent_overrides()
        machine["metadata"]["poll_interval_s"] = 0.5
        machine["volume"].update(size_gib=1, create_timeout_s=120.0)
        machine["trainer"] = {"user": "ubuntu", "drain_reserve_s": 5.0, "restart_backoff_s": 1.0}
        self.container.path("/etc/spotrun/agent.toml").write_text(self.world.tomli_w.dumps(machine))
        cloud_init = self.container.path("/var/lib/cloud/instance")
        cloud_init.mkdir(parents=True, exist_ok=True)
        (cloud_init / "user-data.txt").write_bytes(self.user_data)
        # On EC2 the credentials come from the instance profile; the local cloud's are
        # dummy ones in the environment (Instance.env()), given to the unit by a drop-in.
        env = {k: v for k, v in self.inst.env(base={}).items()
               if k.startswith(("AWS_", "SPOTRUN_")) or k.lower() == "no_proxy"}
        dropin = self.container.path(f"/etc/systemd/system/{UNIT}.service.d")
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "50-localcloud.conf").write_text(
            "[Service]\n" + "".join(f'Environment="{k}={v}"\n' for k, v in sorted(env.items())))
        self.container.run(["systemctl", "daemon-reload"])
        # Type=notify: `start` would wait for READY=1 (sent once the config is valid).
        self.container.run(["systemctl", "start", "--no-block", UNIT])

    def events(self, **match) -> list[dict]:
        out = self.container.run(["journalctl", "--no-pager", "-u", UNIT, "-o", "json"],
                                 check=False).stdout
        found = []
        for line in out.splitlines():
            entry = json.loads(line)
            try:
                body = json.loads(entry.get("MESSAGE") or "")
            except (TypeError, ValueError):
                continue
            if isinstance(body, dict) and body.get("job") == self.job_id and all(
                    body.get(k) == v for k, v in match.items()):
                found.append({**body, "_PRIORITY": entry.get("PRIORITY")})
        return found

    def await_event(self, timeout: float = 90.0, **match) -> dict:
        try:
            return self.container.wait_for(lambda: (self.events(**match) or [None])[-1],
                                           f"{self.job_id}: event {match}", timeout=timeout)
        except Exception as exc:
            raise AssertionError(f"{exc}\n--- the unit's journal ---\n{self.journal()}") from None

    def journal(self, lines: int = 60) -> str:
        # (-u and -t together would mean both at once: one call each.)
        return "".join(self.container.run(["journalctl", "--no-pager", "-n", str(lines), "-o", "cat",
                                           *match], check=False).stdout
                       for match in (["-u", UNIT], ["-t", "spotrun-trainer"]))

    def progress_step(self) -> int:
        try:
            state = json.loads((self.inst.state_dir / "state.json").read_text())
        except (OSError, ValueError):
            return 0
        return int((state.get("progress") or {}).get("global_step") or 0)

    def await_step(self, step: int, timeout: float = 90.0) -> None:
        self.container.wait_for(lambda: self.progress_step() >= step, f"training step {step}",
                                timeout=timeout)

    def unit(self, *props: str) -> dict[str, str]:
        out = self.container.run(["systemctl", "show", UNIT,
                                  *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def mounted(self) -> str:
        return self.container.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE",
                                   str(self.inst.mount_point)], check=False).stdout.strip()

    def volume(self) -> dict:
        from spotrun import tags as T

        volumes = self.cloud.moto_client("ec2").describe_volumes(
            Filters=T.job_filters(self.job_id))["Volumes"]
        assert len(volumes) == 1, volumes
        return volumes[0]

    def close(self) -> None:
        self.container.run(["systemctl", "stop", UNIT], check=False, timeout=150)
        self.container.run(["systemctl", "reset-failed", UNIT], check=False)
        if not self.fleet.state.startswith("cancelled"):
            self.fleet.cancel()


@pytest.fixture
def job(world, request):
    made = []

    def make(steps: int, **kw) -> Job:
        made.append(Job(world, f"sys-{request.node.name[5:25]}-{len(made)}".replace("_", "-"),
                        steps, **kw))
        return made[-1]

    yield make
    for j in made:
        j.close()


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

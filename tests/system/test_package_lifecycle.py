"""The package's life cycle around a running agent, and the Pythons it must start on.

An upgrade must not interrupt training but must make systemd load the new unit; a remove
must stop (drain) the agent instead of leaving it running from deleted files. Both are
judged with a real agent training under systemd on the local spot cloud (the
fixtures in conftest.py, shared with test_lifecycle), by systemd's own view of the unit, the
container's process table, and the cloud's record of the job's volume.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from nspawn import apt_install  # noqa: E402
from unitjob import Job  # noqa: E402

pytestmark = [pytest.mark.system]

UNIT_PATH = "lib/systemd/system/spotrun-agent.service"
# What a process runs from when it belongs to the package.
PACKAGE_PATHS = ("/usr/bin/spotrun", "/usr/lib/spotrun", "/usr/libexec/spotrun")
# The supported Pythons besides Debian 12's own 3.11 (debian/control, build-deb.sh): 3.10 is
# Ubuntu 22.04's, the default of the AMI recipe. Interpreters built by pyenv on this machine.
PYENV = Path("/root/.pyenv/versions")
OTHER_PYTHONS = ("3.10", "3.12", "3.13")


def _rebuilt_with_a_changed_unit(deb: Path, workdir: Path) -> tuple[Path, str, str]:
    """The same package under a higher version, its unit's Description changed."""
    tree = workdir / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True, timeout=120)
    control = tree / "DEBIAN/control"
    version = re.search(r"^Version: (\S+)$", control.read_text(), re.M).group(1)
    new_version = f"{version}+unitchange1"
    control.write_text(control.read_text().replace(f"Version: {version}\n",
                                                   f"Version: {new_version}\n"))
    unit = tree / UNIT_PATH
    description = "spotrun agent, upgraded unit"
    unit.write_text(re.sub(r"^Description=.*$", f"Description={description}", unit.read_text(),
                           count=1, flags=re.M))
    md5sums = tree / "DEBIAN/md5sums"
    md5sums.write_text(re.sub(rf"^\S+(  {re.escape(UNIT_PATH)})$",
                              lambda m: hashlib.md5(unit.read_bytes()).hexdigest() + m.group(1),
                              md5sums.read_text(), flags=re.M))
    out = workdir / f"spotrun_{new_version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "--build", str(tree),
                    str(out)], check=True, capture_output=True, timeout=300)
    return out, new_version, description


def _package_processes(container) -> list[str]:
    """Processes in the container that run the package's files."""
    out = container.run(["ps", "-e", "-o", "pid=,args="]).stdout
    return [line for line in out.splitlines() if any(p in line for p in PACKAGE_PATHS)]


def _training(j: Job) -> tuple[dict, int]:
    """Start the job and wait until its trainer has made steps; the unit's state then."""
    j.start()
    j.await_event(event="phase_changed", phase="training")
    j.await_step(5)
    unit = j.unit("ActiveState", "MainPID", "NRestarts")
    assert unit["ActiveState"] == "active" and unit["MainPID"] != "0", unit
    return unit, j.progress_step()


@pytest.mark.slow
@pytest.mark.loopdev
def test_an_upgrade_reloads_the_unit_and_leaves_training_running(job, deb, tmp_path):
    j = job(steps=100000)
    before, reached = _training(j)
    new_deb, new_version, description = _rebuilt_with_a_changed_unit(deb, tmp_path)

    apt_install(j.container, new_deb)

    assert j.container.run(["dpkg-query", "-W", "-f=${Version}", "spotrun"]).stdout == new_version
    # postinst reloaded systemd: it knows the new unit (not "run daemon-reload" on every
    # systemctl call until someone does) ...
    after = j.unit("Description", "NeedDaemonReload", "ActiveState", "MainPID", "NRestarts")
    assert after["Description"] == description, after
    assert after["NeedDaemonReload"] == "no", after
    # ... and neither stopped nor restarted the agent: the same process trains on.
    assert (after["ActiveState"], after["MainPID"], after["NRestarts"]) == (
        "active", before["MainPID"], before["NRestarts"]), (before, after)
    j.await_step(reached + 5)
    assert not j.events(event="trainer_drained")


@pytest.mark.slow
@pytest.mark.loopdev
def test_apt_get_remove_stops_the_running_agent_which_drains_and_releases_the_volume(job):
    # (Last in this module: the package is gone afterwards.)
    j = job(steps=100000)
    _, reached = _training(j)
    trainer_pid = json.loads((j.inst.state_dir / "state.json").read_text())["trainer"]["pid"]
    assert _package_processes(j.container)

    j.container.run(["apt-get", "remove", "-y", "spotrun"], timeout=300)

    assert j.container.run(["dpkg-query", "-W", "-f=${Status}", "spotrun"]).stdout == \
        "deinstall ok config-files"
    # Stopped, not left running from deleted files (and a purge would delete its state dir).
    assert j.unit("ActiveState")["ActiveState"] == "inactive"
    assert _package_processes(j.container) == []
    assert j.container.run(["test", "-e", f"/proc/{trainer_pid}"], check=False).returncode != 0
    # A stop is a drain: checkpointed, unmounted, and the volume released in the cloud's
    # own record; not a completion, so the fleet stays.
    assert j.volume()["State"] == "available"
    assert j.mounted() == ""
    assert j.events(event="trainer_drained")[-1]["checkpoint_step"] >= reached
    assert not j.fleet.state.startswith("cancelled")


def test_the_package_vendors_what_every_supported_python_needs(deb):
    files = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                           check=True, timeout=60).stdout
    # Python 3.10 (Ubuntu 22.04): structlog needs typing_extensions, the config needs tomli.
    for path in ("./usr/lib/spotrun/typing_extensions.py", "./usr/lib/spotrun/tomli/__init__.py"):
        assert re.search(rf"\s{re.escape(path)}$", files, re.M), path


def _other_pythons() -> dict[str, str]:
    found = {}
    for minor in OTHER_PYTHONS:
        builds = sorted(PYENV.glob(f"{minor}.*/bin/python{minor}"),
                        key=lambda p: tuple(int(n) for n in p.parts[-3].split(".")))
        if builds:
            found[minor] = str(builds[-1])
    return found


@pytest.mark.slow
def test_the_installed_command_starts_on_every_supported_python(container_factory, deb):
    """Debian 12's python3 is 3.11 (test_installed); here the installed launcher, has-job and
    check-config run as the unit runs them (-ISB: no site-packages) by CPython 3.10, 3.12 and
    3.13 builds bound into the booted container. `spotrun agent ...` loads the agent alone
    (spotrun.cli.SUBCOMMANDS), as the unit's `spotrun agent run` does; `spotrun --help` loads
    every subcommand."""
    pythons = _other_pythons()
    if "3.10" not in pythons:
        pytest.skip(f"no CPython 3.10 under {PYENV} (the machine's pyenv builds)")
    container = container_factory(binds=[str(PYENV)])
    apt_install(container, deb)
    container.path("/root/job.toml").write_text(
        '[code]\nrepository = "https://git.example.org/train.git"\n'
        '[aws]\nsingle_instance = true\n')
    for minor, python in pythons.items():
        version = container.run([python, "-ISB", "-c", "import sys; print(sys.version)"]).stdout
        assert version.startswith(minor + "."), (python, version)
        help_text = container.run([python, "-ISB", "/usr/bin/spotrun", "agent", "run", "--help"],
                                  check=False)
        assert help_text.returncode == 0 and "--no-user-data" in help_text.stdout, (minor,
                                                                                   help_text)
        check = container.run([python, "-ISB", "/usr/bin/spotrun", "agent", "check-config",
                               "--no-user-data", "--config", "/root/job.toml"], check=False)
        assert check.returncode == 0 and check.stdout.startswith("ok: job"), (minor, check)
        has_job = container.run([python, "-ISB", "/usr/libexec/spotrun/has-job"], check=False,
                                env={"SPOTRUN_CONFIG": "/root/job.toml"})
        assert has_job.returncode == 0 and "sets code.repository" in has_job.stdout, (minor,
                                                                                       has_job)
    # On 3.10 the vendored copies are the ones imported (-S hides every other).
    probe = container.run([pythons["3.10"], "-ISB", "-c",
                           "import sys; sys.path.insert(0, '/usr/lib/spotrun'); "
                           "import structlog, tomli, typing_extensions; "
                           "print(tomli.__file__, typing_extensions.__file__)"]).stdout
    assert all(path.startswith("/usr/lib/spotrun/") for path in probe.split()), probe
    for minor, python in sorted(pythons.items()):
        # Every subcommand's module is loaded for the help (the soak's imported tomllib,
        # 3.11+, and failed here on 3.10).
        help_text = container.run([python, "-ISB", "/usr/bin/spotrun", "--help"], check=False)
        assert help_text.returncode == 0 and "agent" in help_text.stdout, (minor, help_text)

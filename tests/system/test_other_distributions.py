"""The .deb on another distribution than Debian 12, booted with systemd-nspawn: Debian 13
(Python 3.13), made by debootstrap from the host's Debian mirror and cached like the Debian 12
root (tests/system/nspawn.py: Distribution); Debian 12 itself is test_installed.py's. (Ubuntu
22.04/24.04, the AMIs' own, cannot be fetched here: only Debian's archive is reachable; their
Pythons, 3.10 and 3.12, run the installed package in test_package_lifecycle.py.) There: apt
installs the package (its Depends come with the root: no download), its own python3 runs it, `spotrun
--help` and `spotrun agent check-config` work as the AMI recipe's own check runs them, the
unit is enabled and its start condition decides as it should, `spotrun agent run` starts under
the unit, and `apt-get remove` stops it and takes the unit away.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from nspawn import DEBIAN13, Container, apt_install  # noqa: E402

pytestmark = [pytest.mark.system, pytest.mark.slow]

UNIT = "spotrun-agent"
DISTRIBUTIONS = (DEBIAN13,)
# What a process runs from when it belongs to the package.
PACKAGE_PATHS = ("/usr/bin/spotrun", "/usr/lib/spotrun", "/usr/libexec/spotrun")
# The smallest complete job, as in the AMI recipe's check (packaging/ami/spotrun.pkr.hcl).
JOB = ('[code]\nrepository = "https://git.invalid/bake-check.git"\n'
       '[aws]\nlease_table = "spotrun-leases"\n')
CONFIG = "/etc/spotrun/agent.toml"


@pytest.fixture(scope="module", params=DISTRIBUTIONS, ids=lambda d: d.name)
def installed(request, system_ready, deb, tmp_path_factory):
    """One booted system per distribution with the package installed, shared by its tests."""
    workdir = tmp_path_factory.mktemp(request.param.name)
    with Container(workdir, distribution=request.param) as container:
        output = apt_install(container, deb)
        yield container, output


def _show(container, *props: str) -> dict[str, str]:
    out = container.run(["systemctl", "show", UNIT, *(f"--property={p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _help_commands(help_text: str) -> list[str]:
    """The subcommands argparse lists under COMMAND in ``--help`` (as test_installed.py)."""
    block = help_text.split("  COMMAND\n", 1)[1].split("\n\n", 1)[0]
    return [line.split()[0] for line in block.splitlines()
            if line.startswith("    ") and not line.startswith("     ")]


def _package_processes(container) -> list[str]:
    out = container.run(["ps", "-e", "-o", "pid=,args="]).stdout
    return [line for line in out.splitlines() if any(p in line for p in PACKAGE_PATHS)]


def test_runs_on_the_distributions_own_python(installed):
    container, output = installed
    distribution = container.distribution
    version = container.run(["python3", "--version"]).stdout
    assert version.startswith(f"Python {distribution.python}."), version
    # The launcher is that python3's, in isolated mode, and postinst compiled for it.
    assert container.path("/usr/bin/spotrun").read_text().splitlines()[0] == \
        "#!/usr/bin/python3 -ISB"
    tag = "cpython-" + distribution.python.replace(".", "")
    assert container.run(["find", "/usr/lib/spotrun/spotrun", "-name", f"*.{tag}.pyc",
                          "-print", "-quit"]).stdout.strip(), tag
    probe = container.run(["/usr/bin/python3", "-ISB", "-c",
                           "import sys; sys.path.insert(0, '/usr/lib/spotrun'); "
                           "import boto3, structlog, spotrun; "
                           "print(boto3.__file__, structlog.__file__, spotrun.__file__)"]).stdout
    assert all(path.startswith("/usr/lib/spotrun/") for path in probe.split()), probe


def test_installs_with_apt_enabled_but_not_started(installed):
    container, output = installed
    assert "Setting up spotrun" in output
    assert container.run(["dpkg-query", "-W", "-f=${Status}", "spotrun"]).stdout == \
        "install ok installed"
    assert container.run(["systemctl", "is-enabled", UNIT], check=False).stdout.strip() == "enabled"
    assert _show(container, "ActiveState", "ExecMainPID") == {"ActiveState": "inactive",
                                                              "ExecMainPID": "0"}


def test_help_lists_the_agent_alone(installed):
    container, _ = installed
    help_text = container.run(["spotrun", "--help"], check=False)
    assert help_text.returncode == 0, help_text
    assert _help_commands(help_text.stdout) == ["agent"], help_text.stdout
    run_help = container.run(["spotrun", "agent", "run", "--help"], check=False)
    assert run_help.returncode == 0 and "--no-user-data" in run_help.stdout, run_help


def test_without_a_job_the_start_is_skipped(installed):
    container, _ = installed
    # What boot does for an enabled unit: try to start it. has-job skips it.
    container.run(["systemctl", "start", UNIT])
    state = _show(container, "ActiveState", "ExecMainPID", "NRestarts")
    assert state == {"ActiveState": "inactive", "ExecMainPID": "0", "NRestarts": "0"}, state
    log = container.run(["journalctl", "--no-pager", "-u", UNIT, "-o", "cat"]).stdout
    assert "no job configured" in log, log


def test_check_config_accepts_a_job_as_the_unit_reads_it(installed):
    container, _ = installed
    config = container.path(CONFIG)
    shipped = config.read_text()
    try:
        # The unit's own file (no --config), the user data left out: there is no metadata.
        config.write_text(shipped + JOB)
        check = container.run(["spotrun", "agent", "check-config", "--no-user-data"],
                              check=False)
        assert check.returncode == 0 and check.stdout.startswith("ok: job"), check
        has_job = container.run(["/usr/libexec/spotrun/has-job"], check=False)
        assert has_job.returncode == 0 and "sets code.repository" in has_job.stdout, has_job
        # A bad key is named, exit 2 (the unit does not retry that).
        config.write_text(shipped + JOB + '[trainer]\nmax_restarts = "three"\n')
        bad = container.run(["spotrun", "agent", "check-config", "--no-user-data"], check=False)
        assert bad.returncode == 2 and "trainer.max_restarts" in bad.stderr + bad.stdout, bad
    finally:
        config.write_text(shipped)


def test_remove_stops_the_running_agent_and_takes_the_unit_away(installed):
    # (Last in this module: the package is gone afterwards.)
    container, _ = installed
    # A job, and a metadata endpoint where nothing answers: the unit's `spotrun agent run`
    # starts and keeps asking it for the user data until the remove stops it.
    container.path(CONFIG).write_text(
        JOB + '[metadata]\nendpoint = "http://127.0.0.1:9"\ndeadline_s = 600\n')
    container.run(["systemctl", "start", "--no-block", UNIT])

    def agent_running():
        state = _show(container, "ActiveState", "MainPID")
        if state["ActiveState"] in ("activating", "active") and state["MainPID"] != "0":
            return state
        return None

    state = container.wait_for(agent_running, "the agent to run under the unit", timeout=60)
    args = container.run(["ps", "-o", "args=", "-p", state["MainPID"]]).stdout.strip()
    assert args == "/usr/bin/python3 -ISB /usr/bin/spotrun agent run", args

    container.run(["apt-get", "remove", "-y", "spotrun"], timeout=300)

    assert container.run(["dpkg-query", "-W", "-f=${Status}", "spotrun"]).stdout == \
        "deinstall ok config-files"
    assert _package_processes(container) == []
    assert _show(container, "LoadState", "ActiveState") == {"LoadState": "not-found",
                                                           "ActiveState": "inactive"}
    assert container.run(["systemctl", "is-enabled", UNIT], check=False).stdout.strip() in (
        "", "not-found")
    assert not container.path("/usr/bin/spotrun").exists()

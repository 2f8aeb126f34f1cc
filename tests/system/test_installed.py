"""The .deb on a booted Debian 12 (systemd-nspawn): install, unit, journald, purge, lintian."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from nspawn import apt_install  # noqa: E402

pytestmark = [pytest.mark.system, pytest.mark.slow]

UNIT = "spotrun-agent"


def _show(container, *props: str) -> dict[str, str]:
    out = container.run(["systemctl", "show", UNIT, *(f"--property={p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _journal_json(container, *args: str) -> list[dict]:
    out = container.run(["journalctl", "--no-pager", "-o", "json", *args], check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _events(entries: list[dict]) -> list[dict]:
    """The agent's JSON events (MESSAGE bodies) among journal entries."""
    events = []
    for entry in entries:
        try:
            body = json.loads(entry.get("MESSAGE", ""))
        except (TypeError, ValueError):
            continue
        if isinstance(body, dict):
            events.append({**body, "_PRIORITY": entry.get("PRIORITY"),
                           "_IDENT": entry.get("SYSLOG_IDENTIFIER")})
    return events


@pytest.fixture(scope="module")
def installed(booted_container, deb):
    output = apt_install(booted_container, deb)
    return booted_container, output


def test_lintian_is_clean(deb):
    result = subprocess.run(["lintian", "--fail-on", "error,warning", str(deb)],
                            capture_output=True, text=True, timeout=600)
    findings = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert result.returncode == 0 and not findings, result.stdout + result.stderr


def test_installs_with_apt_enabled_but_not_started(installed):
    container, output = installed
    assert "Setting up spotrun" in output
    assert container.run(["dpkg-query", "-W", "-f=${Status}", "spotrun"]).stdout == \
        "install ok installed"
    assert container.run(["systemctl", "is-enabled", UNIT], check=False).stdout.strip() == "enabled"
    # An AMI is baked, not run: installing must not start the agent.
    assert _show(container, "ActiveState", "ExecMainPID") == {"ActiveState": "inactive",
                                                              "ExecMainPID": "0"}


def test_command_works_as_installed_and_is_isolated(installed):
    container, _ = installed
    help_text = container.run(["spotrun", "--help"]).stdout
    assert "agent" in help_text
    assert container.run(["spotrun", "agent", "run", "--help"]).returncode == 0
    # The vendored libraries, not anything pip or the distribution put on sys.path.
    probe = container.run(["/usr/bin/python3", "-ISB", "-c",
                           "import sys; sys.path.insert(0, '/usr/lib/spotrun'); "
                           "import boto3, structlog, spotrun; "
                           "print(boto3.__file__, structlog.__file__, spotrun.__file__)"]).stdout
    assert all(path.startswith("/usr/lib/spotrun/") for path in probe.split()), probe
    # postinst byte-compiled the private modules for this python3.
    assert container.run(["find", "/usr/lib/spotrun/botocore", "-name", "*.pyc",
                          "-print", "-quit"]).stdout.strip()


def test_agent_stays_idle_without_a_job(installed):
    container, _ = installed
    # What boot does for an enabled unit: try to start it. The condition skips it.
    container.run(["systemctl", "start", UNIT])
    state = _show(container, "ActiveState", "Result", "ExecMainPID", "NRestarts")
    assert state["ActiveState"] == "inactive", state
    assert state["ExecMainPID"] == "0", state  # `spotrun agent run` never ran
    assert state["NRestarts"] == "0", state
    log = container.run(["journalctl", "--no-pager", "-u", UNIT, "-o", "cat"]).stdout
    assert "no job configured" in log


def test_structured_events_reach_journald_with_their_priority(installed):
    container, _ = installed
    # The installed spotrun.log, as the agent uses it, under the agent's identifier.
    # A file, not `-c`: systemd logs a transient unit's command line, and the secret below
    # must reach the journal only through the logger (which redacts it).
    container.path("/root/logtest.py").write_text(
        "import sys\n"
        "sys.path.insert(0, '/usr/lib/spotrun')\n"
        "from spotrun import log\n"
        "log.configure(job='systest')\n"
        "logger = log.get_logger('systemtest')\n"
        "logger.info('systemtest_info', volume_id='vol-0123')\n"
        "logger.warning('systemtest_warning', volume_id='vol-0123', session_token='s3cr3t-value')\n")
    container.run(["systemd-run", "--quiet", "--wait", "--unit=spotrun-logtest",
                   "--property=SyslogIdentifier=spotrun-agent",
                   "/usr/bin/python3", "-ISB", "/root/logtest.py"])

    def both_events_logged():
        events = _events(_journal_json(container, "-u", "spotrun-logtest"))
        return events if len(events) == 2 else None

    events = container.wait_for(both_events_logged, "both events in the journal", timeout=30)
    by_event = {e["event"]: e for e in events}
    assert by_event["systemtest_info"]["_PRIORITY"] == "6"
    assert by_event["systemtest_warning"]["_PRIORITY"] == "4"
    for event in events:
        assert event["_IDENT"] == "spotrun-agent"
        assert {"event", "level", "ts", "job", "component", "volume_id"} <= set(event)
        assert event["job"] == "systest" and event["volume_id"] == "vol-0123"
    assert by_event["systemtest_warning"]["session_token"] == "[redacted]"
    # `-p warning` keeps the warning and drops the info.
    warnings = _events(_journal_json(container, "-u", "spotrun-logtest", "-p", "warning"))
    assert [e["event"] for e in warnings] == ["systemtest_warning"]
    everything = container.run(["journalctl", "--no-pager", "-o", "export"]).stdout
    assert "s3cr3t-value" not in everything


def test_config_error_is_logged_by_key_and_not_retried(installed):
    container, _ = installed
    config = container.path("/etc/spotrun/agent.toml")
    shipped = config.read_text()
    try:
        config.write_text(shipped + '\n[code]\nrepository = "https://git.example.org/t.git"\n'
                          '[trainer]\nmax_restarts = "three"\n')
        container.run(["systemctl", "start", UNIT], check=False, timeout=60)

        def failed():
            state = _show(container, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
            return state if state["ActiveState"] == "failed" else None

        state = container.wait_for(failed, "the agent to fail on the bad key", timeout=60)
        assert state["ExecMainStatus"] == "2", state
        # RestartPreventExitStatus=2: a config error is not retried.
        assert _show(container, "NRestarts")["NRestarts"] == "0"
        errors = _events(_journal_json(container, "-u", UNIT, "-p", "warning"))
        assert any(e["event"] == "config_invalid" and e.get("key") == "trainer.max_restarts"
                   for e in errors), errors
        assert all(e["_PRIORITY"] in ("0", "1", "2", "3", "4") for e in errors)
    finally:
        config.write_text(shipped)
        container.run(["systemctl", "reset-failed", UNIT], check=False)


# Paths that change by themselves on a running system (logs, apt's and dpkg's own records,
# systemd's runtime state) and the .deb the test copied in.
_VOLATILE = ("/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/var/log", "/var/cache",
             "/var/lib/apt", "/var/lib/dpkg", "/var/lib/systemd", "/root")


def _files(container) -> set[str]:
    prune = " -o ".join(f"-path {p}" for p in _VOLATILE)
    out = container.sh(f"find / -xdev \\( {prune} \\) -prune -o -print").stdout
    return set(out.splitlines())


def test_purge_leaves_nothing_but_what_the_admin_made(container_factory, deb):
    container = container_factory()
    before = _files(container)
    apt_install(container, deb)
    # What a machine accumulates: the admin edits the shipped config and adds a file of
    # their own; the agent writes its state and checks out code; python3 runs the agent.
    config = container.path("/etc/spotrun/agent.toml")
    config.write_text(config.read_text() + '\n[job]\nid = "edited-by-admin"\n')
    container.path("/etc/spotrun/site.toml").write_text("# the admin's own file\n")
    container.sh("echo '{}' > /var/lib/spotrun/state.json && "
                 "mkdir -p /var/lib/spotrun/workspace/repo && spotrun --help >/dev/null")

    container.run(["apt-get", "purge", "-y", "spotrun"], timeout=300)

    assert container.run(["dpkg-query", "-W", "-f=${Status}", "spotrun"],
                         check=False).stdout.strip() in ("", "unknown ok not-installed")
    left = _files(container) - before
    assert left == {"/etc/spotrun", "/etc/spotrun/site.toml"}, sorted(left)
    assert container.run(["systemctl", "is-enabled", UNIT], check=False).stdout.strip() in (
        "", "not-found")


def test_hardening_exposure_stays_at_the_measured_level(installed):
    container, _ = installed
    out = container.run(["systemd-analyze", "security", "--no-pager", UNIT], check=False).stdout
    exposure = float(out.rsplit("Overall exposure level for spotrun-agent.service:", 1)[1].split()[0])
    print(f"systemd-analyze security {UNIT}: {exposure}")
    # 9.6 without the hardening block, 5.2 with it (docs/packaging.md).
    assert exposure <= 5.5, out


def _expected_modules() -> set[str]:
    """The work tree's agent and trainer library less packaging/exclude.txt, as debian/rules
    copies them (paths relative to /usr/lib/spotrun)."""
    repo = Path(__file__).resolve().parents[2]
    sources = {"spotrun": repo / "agent", "spotrun_trainer": repo / "trainer"}
    left_out = set()
    for line in (repo / "packaging/exclude.txt").read_text().splitlines():
        pattern = line.split("#", 1)[0].strip()
        if pattern:
            for match in sources[pattern.split("/", 1)[0]].glob(pattern):
                left_out |= set(match.rglob("*.py")) if match.is_dir() else {match}
    return {str(path.relative_to(root)) for top, root in sources.items()
            for path in (root / top).rglob("*.py") if path not in left_out}


def test_installs_the_agent_and_the_trainer_library_only(installed):
    container, _ = installed
    lib = container.path("/usr/lib/spotrun")
    installed_modules = {str(path.relative_to(lib)) for top in ("spotrun", "spotrun_trainer")
                         for path in (lib / top).rglob("*.py")}
    assert installed_modules == _expected_modules()
    for gone in ("spotrun/localcloud", "spotrun/operator", "spotrun/harness"):
        assert not (lib / gone).exists(), gone
    assert (lib / "spotrun/agentcmd.py").is_file() and (lib / "spotrun_trainer/store.py").is_file()
    # --help lists what is installed: the agent's command alone.
    help_text = container.run(["spotrun", "--help"]).stdout
    commands = help_text.split("  COMMAND\n", 1)[1].split("\n\n", 1)[0]
    assert [line.split()[0] for line in commands.splitlines()
            if line.startswith("    ") and not line.startswith("     ")] == ["agent"], help_text
    # A left-out command says so in one line (exit 2), not a traceback.
    soak = container.run(["spotrun", "soak"], check=False)
    assert soak.returncode == 2, soak
    [line] = soak.stderr.splitlines()
    assert line.startswith("spotrun: 'soak' is not installed here"), soak.stderr

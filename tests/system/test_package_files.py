"""The files the package installs, checked without building or booting anything."""
from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spotrun.config import Config, to_mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd/spotrun-agent.service"
HAS_JOB = REPO / "packaging/libexec/has-job"


def _uncommented_defaults(text: str) -> dict:
    """The shipped agent.toml with its '# key = value' and '# [section]' lines switched on."""
    lines = []
    for line in text.splitlines():
        match = re.match(r"^# (\[[a-z0-9_.]+\]|[a-z0-9_]+ = .*)$", line)
        if match:
            lines.append(match.group(1))
    return tomllib.loads("\n".join(lines))


def test_default_config_documents_every_default_and_nothing_else():
    shipped = _uncommented_defaults((REPO / "packaging/agent.toml").read_text())
    expected = to_mapping(Config())
    # The [trainer.env] example is documentation (env defaults to empty).
    shipped["trainer"]["env"] = {}
    assert shipped == expected


def test_default_config_is_all_comments_so_the_defaults_come_from_the_code():
    text = (REPO / "packaging/agent.toml").read_text()
    assert tomllib.loads(text) == {}


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_contract():
    unit = _unit()
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert "network-online.target" in unit["Unit"]["Wants"]
    after = unit["Unit"]["After"].split()
    assert "network-online.target" in after
    # After cloud-init has written its copy of the user data (what has-job looks at), under
    # each name cloud-init has had: cloud-init.service before 24.3, then the split
    # cloud-init-main.service and cloud-init-network.service. Ordering only: never Wants=
    # or Requires=, which would pull cloud-init into a machine configured by hand.
    assert {"cloud-init.service", "cloud-init-main.service",
            "cloud-init-network.service"} <= set(after)
    for key in ("Wants", "Requires", "Requisite", "BindsTo"):
        assert "cloud-init" not in unit["Unit"].get(key, ""), key
    assert service["ExecStart"] == "/usr/bin/spotrun agent run"
    assert service["ExecCondition"] == "/usr/libexec/spotrun/has-job"
    assert service["KillMode"] == "mixed"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"
    assert int(unit["Unit"]["StartLimitBurst"]) >= 1
    # Drains inside the two-minute notice, with room for the rest of the shutdown.
    assert 60 <= int(service["TimeoutStopSec"]) < 120
    # ... and the agent's own stop deadline ends before systemd's SIGKILL.
    assert Config().agent.stop_budget_s < int(service["TimeoutStopSec"])
    assert service["SyslogIdentifier"] == "spotrun-agent"
    # A hung agent is restarted: the watchdog is on, and a busy one is not: its longest
    # wait between two kicks (one AWS attempt: connect + read timeout), plus the kicks' rate
    # limit (a quarter interval, spotrun.notify), fits in it.
    from spotrun import ec2
    watchdog_s = int(service["WatchdogSec"])
    assert ec2.CONNECT_TIMEOUT_S + ec2.READ_TIMEOUT_S + watchdog_s / 4 < watchdog_s
    assert service["TimeoutStartSec"] != "infinity"
    assert service["NoNewPrivileges"] == "yes"
    assert set(service["RestrictAddressFamilies"].split()) == {
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_unit_creates_no_mount_namespace_so_the_volume_mount_is_visible_to_the_system():
    # Each of these gives the service its own mount namespace; a mount made there (the
    # job's volume) would be invisible to the operator's shell (measured in the container).
    service = _unit()["Service"]
    for option in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                   "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                   "ProtectControlGroups", "ReadWritePaths", "ReadOnlyPaths", "ProtectProc",
                   "PrivateMounts", "MountFlags"):
        assert option not in service, option


@pytest.mark.parametrize("config, expected_exit, says", [
    (None, 1, "no job configured"),
    ("# [code]\n# repository = \"\"\n", 1, "no job configured"),
    ("[code]\nrepository = \"\"\n", 1, "no job configured"),
    ("[code]\nrepository = \"https://git.example.org/train.git\"\n", 0, "sets code.repository"),
    ("[code\nrepository = ", 0, "cannot be read"),  # the agent starts and names the error
])
def test_has_job_decides_whether_the_agent_starts(tmp_path, config, expected_exit, says):
    path = tmp_path / "agent.toml"
    if config is not None:
        path.write_text(config)
    # Runs with the system python3 in isolated mode, as the unit does; the user data
    # files it also looks at do not exist on a test machine.
    for user_data in ("/var/lib/cloud/instance/user-data.txt",):
        if Path(user_data).exists():
            pytest.skip(f"{user_data} exists on this machine: has-job would always start")
    result = subprocess.run(["/usr/bin/python3", "-ISB", str(HAS_JOB)], capture_output=True,
                            text=True, env={"SPOTRUN_CONFIG": str(path), "PATH": os.defpath})
    assert result.returncode == expected_exit, result
    assert says in result.stdout

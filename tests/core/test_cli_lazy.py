"""The agent's command line imports the agent alone: not the operator CLI (boto3), the local cloud
(moto), the soak, nor rich through structlog; ``spotrun --help`` still lists every subcommand."""
from __future__ import annotations

import json
import subprocess
import sys

from spotrun import cli

# What the idle agent must not keep resident (the issue 14 footprint).
NOT_IN_THE_AGENT = ("boto3", "moto", "rich", "psutil", "spotrun.operator.cli",
                    "spotrun.localcloud.cli", "spotrun.harness.soak", "spotrun.harness.rehearsal")


def _commands(parser) -> list[str]:
    [action] = [a for a in parser._actions if a.dest == "command"]
    return list(action.choices)


def test_the_table_names_each_subcommand_with_the_module_registering_it():
    everything = _commands(cli.build_parser(["--help"]))
    assert everything == list(cli.SUBCOMMANDS)
    for name, module in cli.SUBCOMMANDS.items():
        alone = _commands(cli.build_parser([name]))
        assert name in alone
        assert all(cli.SUBCOMMANDS[other] == module for other in alone), (name, alone)


def test_the_agents_command_line_loads_no_operator_localcloud_soak_or_rich():
    probe = (
        "import json, sys\n"
        "from spotrun import cli, log\n"
        "cli.build_parser(['agent', 'run'])\n"
        "log.get_logger('probe').info('x')\n"
        f"loaded = [m for m in {NOT_IN_THE_AGENT!r} if m in sys.modules]\n"
        "import importlib.util\n"
        # Kept out of structlog's import only: a later import of rich still works.
        "rich = importlib.util.find_spec('rich') is not None\n"
        "print(json.dumps({'loaded': loaded, 'rich_installed': rich,\n"
        "                  'rich_importable': rich and __import__('rich') is not None}))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    result = json.loads(out.splitlines()[-1])
    assert result["loaded"] == []
    assert result["rich_importable"] == result["rich_installed"]
    # The same probe with the operator's command line does load them (the probe can see them).
    whole = subprocess.run([sys.executable, "-c", probe.replace("['agent', 'run']", "[]")],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert "spotrun.operator.cli" in json.loads(whole.splitlines()[-1])["loaded"]

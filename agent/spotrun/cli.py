"""The ``spotrun`` command: agent, operator and local-cloud subcommands, ``--help`` on each.

Each area registers its own subcommands (``register(subparsers)``) so this file only
wires them together and turns errors into messages and exit codes.
"""
from __future__ import annotations

import argparse
import sys

from spotrun import __version__
from spotrun.config import ConfigError
from spotrun.errors import SpotrunError


# Which module registers each subcommand. A command line naming one imports that module
# alone: the agent systemd starts never loads the operator CLI (boto3), the local cloud (moto)
# or the soak, ~20 MB it would otherwise keep resident. --help and anything not listed load all
# (so a subcommand missing here still works; tests/core/test_cli_lazy.py keeps the list whole).
SUBCOMMANDS = {
    "agent": "spotrun.agentcmd",
    "init": "spotrun.operator.cli", "launch": "spotrun.operator.cli",
    "status": "spotrun.operator.cli", "cancel": "spotrun.operator.cli",
    "teardown": "spotrun.operator.cli",
    "localcloud": "spotrun.localcloud.cli",
    "rehearse": "spotrun.rehearsal",
    "soak": "spotrun.soak",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: only the named subcommand's module when ``argv`` starts with
    one, every subcommand otherwise."""
    import importlib

    if argv and argv[0] in SUBCOMMANDS:
        modules = [SUBCOMMANDS[argv[0]]]
    else:
        modules = list(dict.fromkeys(SUBCOMMANDS.values()))

    parser = argparse.ArgumentParser(
        prog="spotrun",
        description="Train on AWS spot GPUs at spot prices without losing work.",
    )
    parser.add_argument("--version", action="version", version=f"spotrun {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"spotrun: configuration error: {exc}", file=sys.stderr)
        return 2
    except SpotrunError as exc:
        print(f"spotrun: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

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


def build_parser() -> argparse.ArgumentParser:
    from spotrun import agentcmd, rehearsal
    from spotrun import soak
    from spotrun.localcloud import cli as localcloud_cli
    from spotrun.operator import cli as operator_cli

    parser = argparse.ArgumentParser(
        prog="spotrun",
        description="Train on AWS spot GPUs at spot prices without losing work.",
    )
    parser.add_argument("--version", action="version", version=f"spotrun {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    agentcmd.register(subparsers)
    operator_cli.register(subparsers)
    localcloud_cli.register(subparsers)
    rehearsal.register(subparsers)
    soak.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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

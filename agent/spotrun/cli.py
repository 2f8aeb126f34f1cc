"""The ``spotrun`` command: agent, operator and local-cloud subcommands, ``--help`` on each.

Each area registers its own subcommands (``register(subparsers)``) so this file only
wires them together and turns errors into messages and exit codes. The .deb ships the agent
alone (packaging/exclude.txt): a subcommand whose module is not installed is left out of
``--help``, and naming it says so.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from spotrun import __version__
from spotrun.config import ConfigError
from spotrun.errors import SpotrunError, UsageError


# Which module registers each subcommand. A command line naming one imports that module
# alone: the agent systemd starts never loads the operator CLI (boto3), the local cloud (moto)
# or the soak, ~20 MB it would otherwise keep resident. --help and anything not listed load all
# (so a subcommand missing here still works; tests/core/test_cli_lazy.py keeps the list whole).
SUBCOMMANDS = {
    "agent": "spotrun.agentcmd",
    "init": "spotrun.operator.cli", "launch": "spotrun.operator.cli",
    "status": "spotrun.operator.cli", "cancel": "spotrun.operator.cli",
    "teardown": "spotrun.operator.cli", "plan": "spotrun.operator.cli",
    "localcloud": "spotrun.localcloud.cli",
    "rehearse": "spotrun.harness.rehearsal",
    "soak": "spotrun.harness.soak",
}


def _registrar(module: str) -> ModuleType | None:
    """``module``, or None when this installation leaves it out (the agent's .deb)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        # Absent only when the module itself or its package below spotrun is missing: a
        # module that is there but lacks one of its own imports (psutil, a sibling) is a
        # broken installation, and hiding its command would hide that.
        parts = module.split(".")
        if exc.name in {".".join(parts[:end]) for end in range(2, len(parts) + 1)}:
            return None
        raise


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: only the named subcommand's module when ``argv`` starts with
    one, every installed subcommand otherwise. Raises UsageError when ``argv`` names one
    whose module is not installed."""
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
        registrar = _registrar(name)
        if registrar is not None:
            registrar.register(subparsers)
        elif argv and argv[0] in SUBCOMMANDS:
            raise UsageError(
                f"{argv[0]!r} is not installed here: this installation holds the agent, not "
                f"{name} (install spotrun with pip on a workstation for it; docs/packaging.md)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser(argv)
    except UsageError as exc:
        print(f"spotrun: {exc}", file=sys.stderr)
        return exc.exit_code
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

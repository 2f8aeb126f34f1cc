"""``spotrun agent run`` (what systemd starts) and ``spotrun agent status`` (on the instance)."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    agent = subparsers.add_parser("agent", help="the on-instance agent (systemd runs 'agent run')")
    sub = agent.add_subparsers(dest="agent_command", metavar="SUBCOMMAND", required=True)
    run = sub.add_parser("run", help="run the lifecycle on this instance (started by systemd)")
    run.set_defaults(func=_not_ready)
    status = sub.add_parser("status", help="this instance's agent: phase, trainer, progress")
    status.set_defaults(func=_not_ready)


def _not_ready(args: argparse.Namespace) -> int:
    raise NotImplementedError("the agent lifecycle is being built (issue 4)")

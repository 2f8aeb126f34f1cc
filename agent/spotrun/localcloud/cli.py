"""``spotrun localcloud ...`` and ``spotrun rehearse``."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    subparsers.add_parser("localcloud", help="run and drive the local spot cloud")

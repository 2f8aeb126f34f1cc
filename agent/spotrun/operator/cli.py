"""``spotrun init|launch|status|cancel``."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    return None

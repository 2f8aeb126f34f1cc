"""Errors that end a command with a clear message and a non-zero exit."""
from __future__ import annotations


class SpotrunError(Exception):
    """A problem the user or operator must act on; the message says what and where."""

    exit_code = 1


class UsageError(SpotrunError):
    """Bad input: config, user data, job file, CLI arguments."""

    exit_code = 2

"""Test-only fault points: ``crashpoint(name)`` SIGKILLs this process when
``SPOTRUN_CRASH_AT`` equals ``name``; ``pausepoint(name)`` stops it (SIGSTOP) when
``SPOTRUN_PAUSE_AT`` does, for whoever set it to land a fault there and SIGCONT it.

They exist so the kill tests can stop the agent exactly between two steps of the volume
migration, as a spot termination or power loss would. In production the variable is unset
and a crash point is a dictionary lookup. ``CRASHPOINTS`` lists every point in the order
they are passed; the kill test enumerates it, so a new step without a kill test fails
the suite (``crashpoint`` refuses names that are not listed).
"""
from __future__ import annotations

import os
import signal

ENV = "SPOTRUN_CRASH_AT"
PAUSE_ENV = "SPOTRUN_PAUSE_AT"

CRASHPOINTS: tuple[str, ...] = (
    "migration.snapshot_requested",   # CreateSnapshot answered, snapshot still pending
    "migration.snapshot_completed",   # snapshot completed, no new volume yet
    "migration.volume_created",       # new volume created and available, not attached
    "migration.attached",             # new volume attached to this instance
    "migration.mounted",              # new volume mounted, not yet verified
    "migration.before_delete",        # new volume verified and recorded, old one still there
    "migration.after_delete",         # old volume deleted, migration not yet marked done
)


def crashpoint(name: str) -> None:
    if name not in CRASHPOINTS:
        raise ValueError(f"unknown crash point {name!r}: add it to CRASHPOINTS (and a kill test)")
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


# Phases too short to hit from outside (a checkout of a small repository takes ~50 ms): the
# soak freezes the agent at the start of one, posts its notice, and lets it go on.
PAUSEPOINTS: tuple[str, ...] = (
    "checkout.started",
    # The other phases before training, for the tests of a notice in each (spotrun.boot).
    "identify.started",
    "acquire.started",
    "migration.started",
    # A migrated copy mounted, about to be verified: the soak boots a replacement meanwhile.
    "migration.verifying",
)


def pausepoint(name: str) -> None:
    if name not in PAUSEPOINTS:
        raise ValueError(f"unknown pause point {name!r}: add it to PAUSEPOINTS")
    if os.environ.get(PAUSE_ENV) == name:
        os.kill(os.getpid(), signal.SIGSTOP)

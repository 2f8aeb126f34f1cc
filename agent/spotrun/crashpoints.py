"""Fault points: named places in the agent where a test may land a fault from outside.

``crashpoint(name)`` marks a step of the volume migration (a spot termination or power loss
may strike between any two), ``pausepoint(name)`` the start of a phase too short to hit from
outside. Each calls the installed fault hooks, ``HOOKS``: in the agent as shipped, and in
every process started as ``spotrun ...``, :class:`NoFaults`, which does nothing. Only a test
launcher outside the package (spotrun.localcloud.faultagent, left out of the .deb) installs
hooks that kill or stop the process there; nothing here reads the environment or sends a
signal.

``CRASHPOINTS`` lists every crash point in the order they are passed and ``PAUSEPOINTS``
every pause point; the kill test enumerates them, so a new step without a kill test fails
the suite (both functions refuse names that are not listed, hooks or not).
"""
from __future__ import annotations

CRASHPOINTS: tuple[str, ...] = (
    "migration.snapshot_requested",   # CreateSnapshot answered, snapshot still pending
    "migration.snapshot_completed",   # snapshot completed, no new volume yet
    "migration.volume_created",       # new volume created and available, not attached
    "migration.attached",             # new volume attached to this instance
    "migration.mounted",              # new volume mounted, not yet verified
    "migration.before_delete",        # new volume verified and recorded, old one still there
    "migration.after_delete",         # old volume deleted, migration not yet marked done
)

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
    # A sweep's instance between two experiments: the last released finished, the next unclaimed.
    "sweep.claiming",
)


class NoFaults:
    """The hooks of the agent as shipped: every point is passed as if it were not there.
    A test's hooks provide the same two methods."""

    def crash(self, name: str) -> None:
        """At crash point ``name`` (one of CRASHPOINTS)."""

    def pause(self, name: str) -> None:
        """At pause point ``name`` (one of PAUSEPOINTS)."""


HOOKS: NoFaults = NoFaults()


def install(hooks) -> object:
    """Make ``hooks`` (an object with ``crash(name)`` and ``pause(name)``) this process's fault
    hooks; ``None`` puts the no-op ones back. Returns the hooks it replaced."""
    global HOOKS
    previous, HOOKS = HOOKS, hooks if hooks is not None else NoFaults()
    return previous


def crashpoint(name: str) -> None:
    if name not in CRASHPOINTS:
        raise ValueError(f"unknown crash point {name!r}: add it to CRASHPOINTS (and a kill test)")
    HOOKS.crash(name)


def pausepoint(name: str) -> None:
    if name not in PAUSEPOINTS:
        raise ValueError(f"unknown pause point {name!r}: add it to PAUSEPOINTS")
    HOOKS.pause(name)

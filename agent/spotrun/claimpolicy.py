"""Which experiment of a sweep an instance takes on (issue 19): a pure function.

An instance that boots into a sweep, or that has just finished its experiment, first takes
back an unfinished experiment it holds itself (its agent restarted, or the instance was stopped
and started: the volume is still attached to it); else it picks one unfinished experiment no
instance holds, in this order:

1. one whose volume is already in the instance's availability zone: no migration, and the
   data and checkpoints are a mount away;
2. one never started: its volume is made in this zone from the dataset snapshot, so starting
   it costs no more than resuming (1) and adds progress to the sweep sooner than a migration;
3. one whose volume is in another zone (a migration by snapshot), the one that has waited
   longest since its last holder let it go first, so no experiment starves.

That is the default policy, ``zone-first``. ``in-order`` (``[sweep] claim = "in-order"``) takes
the first free experiment in the sweep's order wherever its volume is: the experiments finish
closer to the order they were written in (a priority list), at the price of migrations by
snapshot; `make bench`'s sweep figure measures the difference.

Ties go to the sweep's own order (the job file's order of experiments, or the grid's). The
choice is only a wish: the lease table's conditional write decides who gets it, and the loser
of a race asks again with that experiment marked held.
"""
from __future__ import annotations

from dataclasses import dataclass

ZONE_FIRST = "zone-first"
IN_ORDER = "in-order"
POLICIES = (ZONE_FIRST, IN_ORDER)

RESUME = "held-by-this-instance"
IN_ZONE = "volume-in-zone"
NEVER_STARTED = "never-started"
MIGRATE = "migrate"


@dataclass(frozen=True)
class ExperimentState:
    """What the instance knows of one experiment when it chooses.

    ``volume_zone``: the zone of the experiment's volume, "" when it has none yet (never
    started). ``released_at``: wall-clock seconds when its last holder let it go (0 = never
    held). ``order``: its place in the sweep."""

    job_id: str
    order: int
    finished: bool = False
    held: bool = False
    volume_zone: str = ""
    released_at: float = 0.0
    mine: bool = False


@dataclass(frozen=True)
class Choice:
    job_id: str
    reason: str  # RESUME, IN_ZONE, NEVER_STARTED or MIGRATE


def choose(experiments: list[ExperimentState], zone: str,
           policy: str = ZONE_FIRST) -> Choice | None:
    """The experiment this instance (in ``zone``) should claim; None when none is free."""
    mine = [e for e in experiments if e.mine and not e.finished]
    if mine:
        return Choice(min(mine, key=lambda e: e.order).job_id, RESUME)
    free = [e for e in experiments if not e.finished and not e.held]
    if policy == IN_ORDER:
        if not free:
            return None
        first = min(free, key=lambda e: e.order)
        reason = (NEVER_STARTED if not first.volume_zone
                  else IN_ZONE if first.volume_zone == zone else MIGRATE)
        return Choice(first.job_id, reason)
    if policy != ZONE_FIRST:
        raise ValueError(f"claim policy {policy!r} is not one of {', '.join(POLICIES)}")
    in_zone = [e for e in free if e.volume_zone == zone]
    if in_zone:
        return Choice(min(in_zone, key=_longest_waiting).job_id, IN_ZONE)
    never = [e for e in free if not e.volume_zone]
    if never:
        return Choice(min(never, key=lambda e: e.order).job_id, NEVER_STARTED)
    if free:
        return Choice(min(free, key=_longest_waiting).job_id, MIGRATE)
    return None


def _longest_waiting(state: ExperimentState) -> tuple[float, int]:
    return (state.released_at, state.order)

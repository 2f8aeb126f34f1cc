"""Which experiment an instance claims (issue 19): in its zone, then never started, then the
longest waiting elsewhere; never a finished or held one."""
from __future__ import annotations

import pytest

from spotrun.claimpolicy import IN_ZONE, MIGRATE, NEVER_STARTED, Choice, ExperimentState, choose


def _state(job_id, order, **kw):
    return ExperimentState(job_id=job_id, order=order, **kw)


def test_a_volume_in_my_zone_comes_first():
    states = [_state("never", 0), _state("elsewhere", 1, volume_zone="us-west-2b"),
              _state("here", 2, volume_zone="us-west-2a", released_at=50.0)]
    assert choose(states, "us-west-2a") == Choice("here", IN_ZONE)


def test_of_several_in_my_zone_the_longest_waiting():
    states = [_state("late", 0, volume_zone="az1", released_at=90.0),
              _state("early", 1, volume_zone="az1", released_at=10.0)]
    assert choose(states, "az1").job_id == "early"


def test_then_the_first_never_started_in_the_sweeps_order():
    states = [_state("elsewhere", 0, volume_zone="az2"), _state("second", 2), _state("first", 1)]
    assert choose(states, "az1") == Choice("first", NEVER_STARTED)


def test_then_a_migration_of_the_longest_waiting():
    states = [_state("recent", 0, volume_zone="az2", released_at=100.0),
              _state("starving", 1, volume_zone="az3", released_at=5.0)]
    assert choose(states, "az1") == Choice("starving", MIGRATE)


def test_ties_go_to_the_sweeps_order():
    states = [_state("b", 1, volume_zone="az2"), _state("a", 0, volume_zone="az2")]
    assert choose(states, "az1").job_id == "a"


def test_finished_and_held_experiments_are_never_chosen():
    states = [_state("done", 0, finished=True, volume_zone="az1"),
              _state("taken", 1, held=True), _state("failed", 2, finished=True)]
    assert choose(states, "az1") is None
    assert choose(states + [_state("free", 3, volume_zone="az9")], "az1") == Choice("free", MIGRATE)


def test_no_experiments_no_choice():
    assert choose([], "az1") is None


def test_in_order_takes_the_first_free_experiment_wherever_its_volume_is():
    from spotrun.claimpolicy import IN_ORDER, RESUME

    found = [ExperimentState("a", 0, finished=True, volume_zone="z1"),
             ExperimentState("b", 1, volume_zone="z2", released_at=50.0),
             ExperimentState("c", 2, volume_zone="z1", released_at=10.0),
             ExperimentState("d", 3)]
    assert choose(found, "z1", IN_ORDER) == Choice("b", MIGRATE)  # zone-first would take c
    assert choose(found, "z1") == Choice("c", IN_ZONE)
    assert choose(found, "z2", IN_ORDER) == Choice("b", IN_ZONE)
    assert choose(found[:1] + [ExperimentState("d", 3)], "z1", IN_ORDER) == Choice("d", NEVER_STARTED)
    mine = [*found, ExperimentState("e", 4, held=True, mine=True, volume_zone="z2")]
    assert choose(mine, "z1", IN_ORDER) == Choice("e", RESUME)


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="in-order"):
        choose([ExperimentState("a", 0)], "z1", "random")

from pathlib import Path

import pytest

from spotrun.rehearsal import Rehearsal, RehearsalPlan, commit_repository

# The framework-free, protocol-aware trainer the soak drives too (exact resume via a running sum).
COUNTING_TRAINER = Path(__file__).resolve().parents[2] / "agent" / "spotrun" / "soak_trainer.py"


@pytest.fixture
def counting_repo(shared_tmp):
    """A git repository whose training code is the counting trainer."""
    return commit_repository(shared_tmp / "repo", {"train.py": COUNTING_TRAINER},
                             "counting trainer")


@pytest.fixture
def expected_sum():
    return lambda steps: steps * (steps + 1) // 2


@pytest.fixture
def start_rehearsal(shared_tmp):
    """Factory: ``start_rehearsal(**plan)`` -> a started :class:`Rehearsal` of
    ``RehearsalPlan(**plan)`` (``out``: a fresh folder by default; ``make``: what to build
    from the plan, e.g. a subclass or one sharing another rehearsal's cloud); every one
    stopped at teardown, whatever the test did."""
    made: list[Rehearsal] = []

    def start(make=Rehearsal, **plan) -> Rehearsal:
        plan.setdefault("out", shared_tmp / f"run{len(made)}")
        r = make(RehearsalPlan(**plan))
        made.append(r)  # before start(): a start that fails half-way is stopped too
        r.start()
        return r

    yield start
    for r in made:
        r.stop()

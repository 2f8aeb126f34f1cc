import sys
from pathlib import Path

import pytest

from spotrun.harness.rehearsal import Rehearsal, RehearsalPlan, commit_repository

# The framework-free, protocol-aware trainer the soak drives too (exact resume via a running sum).
COUNTING_TRAINER = Path(__file__).resolve().parents[2] / "agent" / "spotrun" / "harness" / "soak_trainer.py"


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


@pytest.fixture
def start_counting(start_rehearsal, counting_repo):
    """Factory: a started rehearsal of the counting trainer. ``env``: its settings over these
    (200 steps of 0.02 s, a checkpoint every 10); the rest as :func:`start_rehearsal`."""
    def start(env=None, *, timeout_s=180, **plan) -> Rehearsal:
        trainer_env = {"STEPS": "200", "STEP_S": "0.02", "CKPT_EVERY": "10", **(env or {})}
        return start_rehearsal(repository=counting_repo, command=[sys.executable, "train.py"],
                               trainer_env=trainer_env, timeout_s=timeout_s, **plan)
    return start

from pathlib import Path

import pytest

from spotrun.rehearsal import commit_repository

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

import shutil
import subprocess
from pathlib import Path

import pytest

# The framework-free, protocol-aware trainer the soak drives too (exact resume via a running sum).
COUNTING_TRAINER = Path(__file__).resolve().parents[2] / "agent" / "spotrun" / "soak_trainer.py"


@pytest.fixture
def counting_repo(shared_tmp):
    """A git repository whose training code is the counting trainer."""
    repo = shared_tmp / "repo"
    repo.mkdir()
    shutil.copy(COUNTING_TRAINER, repo / "train.py")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "-C", str(repo)]
    subprocess.run(git + ["init", "-q", "-b", "main"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "counting trainer"], check=True)
    return f"file://{repo}"


@pytest.fixture
def expected_sum():
    return lambda steps: steps * (steps + 1) // 2

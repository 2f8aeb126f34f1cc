import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def shared_tmp():
    """A temporary directory the unprivileged training user can traverse (pytest's are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="spotrun-soak-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)

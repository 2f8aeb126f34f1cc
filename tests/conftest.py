"""Suite-wide set-up.

The trainer runs as an unprivileged user (nobody) in the tests, as it does on an instance:
that user must be able to reach the virtualenv's interpreter and the checkout. A clone made
under a private directory (mode 0700, e.g. a mkdtemp) would stop it with "permission denied";
grant search permission (o+x, never read) along the path, and say so.
"""
import os
import stat
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _grant_traversal(path: Path) -> list[str]:
    changed = []
    for directory in [path, *path.parents]:
        if directory == Path("/"):
            continue
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(directory, mode | stat.S_IXOTH)
            changed.append(str(directory))
    return changed


def pytest_configure(config):
    if os.geteuid() != 0:
        return
    interpreter = Path(sys.executable).resolve()
    changed = _grant_traversal(ROOT) + _grant_traversal(Path(sys.prefix)) + _grant_traversal(interpreter.parent)
    if changed:
        print(f"tests: granted o+x on {', '.join(changed)} so the unprivileged trainer can run",
              file=sys.stderr)


@pytest.fixture(autouse=True)
def _default_logging():
    """No test leaves a logging level or a captured stream behind for the next one."""
    yield
    from spotrun import log

    log.configure()

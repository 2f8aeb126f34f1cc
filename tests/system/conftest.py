"""Fixtures for the system test: the .deb, and Debian 12 booted with systemd-nspawn."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# importlib import mode: the helper module beside this file is not importable otherwise.
sys.path.insert(0, str(Path(__file__).parent))
from nspawn import Container  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NEEDS = ("systemd-nspawn", "debootstrap", "nsenter", "dpkg-buildpackage", "dh", "lintian")


def _missing_tools() -> list[str]:
    return [tool for tool in NEEDS if shutil.which(tool) is None]


@pytest.fixture(scope="session")
def system_ready() -> None:
    """Root and the Debian tools (`make apt` installs them); otherwise skip, saying why."""
    if os.geteuid() != 0:
        pytest.skip("the system test boots a container: run as root (make system-test)")
    missing = _missing_tools()
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: run `make apt`")


@pytest.fixture(scope="session")
def deb(system_ready, tmp_path_factory) -> Path:
    """The package, built from this work tree by packaging/build-deb.sh (as `make deb`)."""
    dist = tmp_path_factory.mktemp("dist")
    result = subprocess.run([str(REPO / "packaging/build-deb.sh")], env={**os.environ, "DIST": str(dist)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"build-deb.sh failed:\n{result.stdout}\n{result.stderr}"
    debs = list(dist.glob("spotrun_*_all.deb"))
    assert len(debs) == 1, debs
    return debs[0]


@pytest.fixture
def container_factory(system_ready, tmp_path):
    """Boot containers on demand; every one is powered off and deleted at the end."""
    booted: list[Container] = []

    def boot(binds: list[str] = ()) -> Container:
        workdir = tmp_path / f"container-{len(booted)}"
        workdir.mkdir()
        container = Container(workdir, binds=list(binds))
        booted.append(container)
        return container.boot()

    yield boot
    errors = []
    for container in reversed(booted):
        try:
            container.poweroff()
        except Exception as exc:  # keep cleaning the others
            errors.append(exc)
    assert not errors, errors


@pytest.fixture(scope="module")
def booted_container(system_ready, tmp_path_factory):
    """One booted Debian 12 shared by a module's tests; always powered off afterwards."""
    workdir = tmp_path_factory.mktemp("container")
    with Container(workdir) as container:
        yield container


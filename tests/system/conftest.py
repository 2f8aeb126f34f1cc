"""Fixtures for the system test: the .deb, and Debian 12 (or another distribution:
nspawn.Distribution) booted with systemd-nspawn."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

# importlib import mode: the helper module beside this file is not importable otherwise.
sys.path.insert(0, str(Path(__file__).parent))
from nspawn import DEBIAN12, Container, Distribution, apt_install  # noqa: E402
from unitjob import Job  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
COUNTING_TRAINER = REPO / "agent/spotrun/harness/soak_trainer.py"
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

    def boot(binds: list[str] = (), distribution: Distribution = DEBIAN12) -> Container:
        workdir = tmp_path / f"container-{len(booted)}"
        workdir.mkdir()
        container = Container(workdir, binds=list(binds), distribution=distribution)
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


@pytest.fixture(scope="module")
def world(system_ready, deb):
    """The local spot cloud, a git repository of training code, and the booted system."""
    tomli_w = pytest.importorskip("tomli_w")
    from spotrun.localcloud import LocalCloud, TimingModel
    from spotrun.harness.rehearsal import commit_repository

    # Bound into the container and traversed by the training user: not pytest's 0700 tmp.
    shared = Path(tempfile.mkdtemp(prefix="spotrun-systest-"))
    shared.chmod(0o755)
    try:
        repo = shared / "repo"
        commit_repository(repo, {"train.py": COUNTING_TRAINER}, "counting trainer")
        with LocalCloud(shared / "cloud", TimingModel.fast()) as cloud:
            if not cloud.uses_loop_devices:
                pytest.skip("the local cloud has no loop devices here")
            workdir = shared / "container"
            workdir.mkdir()
            with Container(workdir, binds=[str(shared)]) as container:
                apt_install(container, deb)
                yield SimpleNamespace(cloud=cloud, container=container, tomli_w=tomli_w,
                                      repository=f"file://{repo}")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.fixture
def job(world, request):
    made = []

    def make(steps: int, **kw) -> Job:
        made.append(Job(world, f"sys-{request.node.name[5:25]}-{len(made)}".replace("_", "-"),
                        steps, **kw))
        return made[-1]

    yield make
    for j in made:
        j.close()

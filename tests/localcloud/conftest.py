"""Fixtures for the local spot cloud: a started LocalCloud that is always stopped.

``cloud`` yields a LocalCloud on tmp_path with the fast timing model; ``cloud_factory``
makes more (other timing, directory volumes, ...), all stopped at teardown -- which also
unmounts whatever a test mounted under the cloud's root and releases its loop devices,
whether the test passed or not.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

# pytest runs with --import-mode=importlib (tests/ has no packages): make this folder's
# helper module importable by name for the tests next to it.
sys.path.insert(0, str(Path(__file__).parent))

from localcloud_helpers import loop_devices_backed_by, mounts_under
from localcloud_helpers import wait_until as _wait_until
from spotrun.localcloud import LocalCloud, TimingModel
from spotrun.localcloud.ebs import probe_loop_devices


@pytest.fixture(scope="session")
def loop_devices_usable(tmp_path_factory) -> tuple[bool, str]:
    return probe_loop_devices(tmp_path_factory.mktemp("loop-probe"))


@pytest.fixture(autouse=True)
def _skip_loopdev_without_loop_devices(request):
    """``loopdev`` tests need root and loop devices; elsewhere they skip, saying why."""
    if request.node.get_closest_marker("loopdev") is not None:
        usable, reason = request.getfixturevalue("loop_devices_usable")
        if not usable:
            pytest.skip(f"loop devices unavailable: {reason}")


@pytest.fixture
def cloud_factory(tmp_path):
    clouds: list[LocalCloud] = []

    def make(timing: TimingModel | None = None, name: str = "cloud", **options) -> LocalCloud:
        cloud = LocalCloud(root=tmp_path / name, timing=timing or TimingModel.fast(), **options)
        clouds.append(cloud)
        return cloud.start()

    yield make
    for cloud in reversed(clouds):
        cloud.stop()
    # Whatever the test did (and however it ended), nothing of the clouds stays behind.
    assert loop_devices_backed_by(tmp_path) == [], "loop devices left bound"
    assert mounts_under(tmp_path) == [], "mounts left under the cloud root"


@pytest.fixture
def wait_until():
    """``wait_until(predicate, timeout=10, what=...)``: poll a real condition with a deadline."""
    return _wait_until


@pytest.fixture
def cloud(cloud_factory) -> LocalCloud:
    return cloud_factory()


@pytest.fixture
def ec2(cloud):
    """EC2 on the proxy without retries, so injected faults surface as they are."""
    return cloud.client("ec2", max_attempts=1)

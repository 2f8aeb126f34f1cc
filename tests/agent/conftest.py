"""Shared fixtures for the agent's tests: a real loop-device volume (the metadata server
is the suite's, in tests/conftest.py).

``loop_volume`` gives an empty sparse image on a real loop device, with a Nitro-shaped
by-id link (``nvme-Amazon_Elastic_Block_Store_vol…``) in a private device directory.
Everything it creates (mounts of the device, the loop device, the files) is removed
afterwards, also when the test fails.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

NITRO_PREFIX = "nvme-Amazon_Elastic_Block_Store_"


@dataclasses.dataclass
class LoopVolume:
    volume_id: str  # vol-<17 hex>, as EC2 shapes them
    image: Path  # the sparse backing file
    device: Path  # /dev/loopN
    device_dir: Path  # where the by-id link lives
    link: Path  # device_dir / nvme-Amazon_Elastic_Block_Store_vol<hex>


def _mount_points_of(device: Path) -> list[str]:
    """Mount points whose source is ``device`` (newest first, so nested ones go first)."""
    from spotrun import blockdev

    return [m["mount_point"] for m in reversed(blockdev.mounts()) if m["source"] == str(device)]


def _loop_devices_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop devices, mount)"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control"
    for tool in ("losetup", "mkfs.ext4", "blkid", "e2fsck", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@pytest.fixture
def make_loop_volume(tmp_path: Path):
    """Factory: ``make_loop_volume(size_mib=64)`` -> a :class:`LoopVolume` with no filesystem.

    All volumes share one device directory (``tmp_path/by-id``), as on one instance.
    """
    reason = _loop_devices_usable()
    if reason:
        pytest.skip(reason)
    device_dir = tmp_path / "by-id"
    device_dir.mkdir(exist_ok=True)
    made: list[LoopVolume] = []

    def make(size_mib: int = 64) -> LoopVolume:
        volume_id = "vol-" + secrets.token_hex(9)[:17]
        image = tmp_path / f"{volume_id}.img"
        with open(image, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        result = subprocess.run(["losetup", "--find", "--show", str(image)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            image.unlink()
            pytest.skip(f"losetup failed: {result.stderr.strip()}")
        device = Path(result.stdout.strip())
        link = device_dir / (NITRO_PREFIX + volume_id.replace("-", ""))
        volume = LoopVolume(volume_id, image, device, device_dir, link)
        made.append(volume)
        link.symlink_to(device)
        return volume

    try:
        yield make
    finally:
        for volume in reversed(made):
            for point in _mount_points_of(volume.device):
                subprocess.run(["umount", point], capture_output=True)
            subprocess.run(["losetup", "--detach", str(volume.device)], capture_output=True)
            volume.link.unlink(missing_ok=True)
            volume.image.unlink(missing_ok=True)


@pytest.fixture
def loop_volume(make_loop_volume) -> LoopVolume:
    """An empty (no filesystem) 64 MiB volume on a real loop device; see :class:`LoopVolume`."""
    return make_loop_volume()


"""spotrun.blockdev on real loop devices, ext4 and mount (root), plus the pure name rules."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from spotrun import blockdev
from spotrun.blockdev import DeviceError


def test_device_link_name_drops_the_dash():
    assert blockdev.device_link_name("vol-0123456789abcdef0") == \
        "nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0"
    assert blockdev.device_link_name("vol-0abc1234") == "nvme-Amazon_Elastic_Block_Store_vol0abc1234"


@pytest.mark.parametrize("bad", ["", "0abc1234", "vol-xyz", "vol-0abc1234/../x", "snap-0abc1234"])
def test_device_link_name_rejects_what_is_not_a_volume_id(bad):
    with pytest.raises(DeviceError, match="not an EBS volume id"):
        blockdev.device_link_name(bad)


def test_a_device_that_never_appears_names_the_volume_and_the_directory(tmp_path):
    started = time.monotonic()
    with pytest.raises(DeviceError) as error:
        blockdev.wait_for_device("vol-0abc1234def567890", tmp_path, timeout_s=0.3)
    assert time.monotonic() - started >= 0.3
    assert "vol-0abc1234def567890" in str(error.value)
    assert str(tmp_path) in str(error.value)


def test_a_sdf_name_is_never_trusted(tmp_path):
    # Only the by-id name counts: a link under the requested attach name is not the volume.
    (tmp_path / "sdf").symlink_to("/dev/null")
    with pytest.raises(DeviceError):
        blockdev.wait_for_device("vol-0abc1234def567890", tmp_path, timeout_s=0.1)


def test_a_link_to_a_regular_file_is_an_error_not_a_device(tmp_path):
    target = tmp_path / "plain"
    target.write_text("x")
    (tmp_path / blockdev.device_link_name("vol-0abc1234")).symlink_to(target)
    with pytest.raises(DeviceError, match="neither a block device nor a directory"):
        blockdev.wait_for_device("vol-0abc1234", tmp_path, timeout_s=1)


def test_nvme_serial_is_used_where_udev_made_no_link(tmp_path):
    # A sysfs-shaped tree as on a Nitro instance without udev links: nvme1n1's serial is the id.
    sys_block, dev, device_dir = tmp_path / "sys", tmp_path / "dev", tmp_path / "by-id"
    for name, serial in (("nvme0n1", "vol0root00000000000"), ("nvme1n1", "vol0abc1234def567890  ")):
        (sys_block / name / "device").mkdir(parents=True)
        (sys_block / name / "device" / "serial").write_text(serial + "\n")
    dev.mkdir()
    device_dir.mkdir()
    (dev / "nvme1n1").touch()
    found = blockdev.wait_for_device("vol-0abc1234def567890", device_dir, 1,
                                     sys_block=sys_block, dev=dev)
    assert found == dev / "nvme1n1"


@pytest.mark.loopdev
def test_a_directory_backed_volume_is_found_and_bind_mounted(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (mount)")
    data = tmp_path / "volume-data"
    data.mkdir()
    device_dir = tmp_path / "by-id"
    device_dir.mkdir()
    (device_dir / blockdev.device_link_name("vol-0abc1234")).symlink_to(data)
    device = blockdev.wait_for_device("vol-0abc1234", device_dir, 1)
    assert device == data
    assert blockdev.filesystem_type(device) == blockdev.DIRECTORY
    blockdev.check_filesystem(device)  # nothing to check, and no error
    with pytest.raises(DeviceError, match="directory-backed"):
        blockdev.make_filesystem(device, "x")
    mount_point = tmp_path / "mnt"
    try:
        blockdev.mount(device, mount_point)
        blockdev.mount(device, mount_point)  # idempotent
        assert blockdev.mounted_device(mount_point) == data
        (mount_point / "f").write_text("through the bind mount")
    finally:
        blockdev.unmount(mount_point)
    assert not blockdev.is_mounted(mount_point)
    assert (data / "f").read_text() == "through the bind mount"


def _wait_for(condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.mark.loopdev
def test_appears_then_mkfs_mount_write_unmount_remount(loop_volume, tmp_path):
    mount_point = tmp_path / "dltraining"
    # The link appears while we wait, as udev makes it a moment after the attachment.
    loop_volume.link.unlink()
    timer = threading.Timer(0.3, loop_volume.link.symlink_to, args=(loop_volume.device,))
    timer.start()
    try:
        device = blockdev.wait_for_device(loop_volume.volume_id, loop_volume.device_dir, 10)
    finally:
        timer.join()
    assert device == loop_volume.device
    assert blockdev.filesystem_type(device) is None
    blockdev.make_filesystem(device, "spotrun-job")
    assert blockdev.filesystem_type(device) == "ext4"
    blockdev.check_filesystem(device)

    blockdev.mount(device, mount_point)
    blockdev.mount(device, mount_point)  # second boot: a no-op
    assert blockdev.is_mounted(mount_point)
    assert blockdev.mounted_device(mount_point) == device
    assert "noatime" in _mount_options(mount_point)
    (mount_point / "checkpoint").write_bytes(b"epoch 3")
    blockdev.sync(mount_point)
    blockdev.unmount(mount_point)
    blockdev.unmount(mount_point)  # idempotent
    assert not blockdev.is_mounted(mount_point)
    assert not (mount_point / "checkpoint").exists()

    blockdev.check_filesystem(device)
    blockdev.mount(device, mount_point)
    try:
        assert (mount_point / "checkpoint").read_bytes() == b"epoch 3"
    finally:
        blockdev.unmount(mount_point)


def _mount_options(mount_point: Path) -> str:
    return next((m["options"] for m in blockdev.mounts() if m["mount_point"] == str(mount_point)), "")


@pytest.mark.loopdev
def test_mkfs_is_refused_on_a_device_that_has_a_filesystem(loop_volume, tmp_path):
    blockdev.make_filesystem(loop_volume.device, "first")
    mount_point = tmp_path / "m"
    blockdev.mount(loop_volume.device, mount_point)
    (mount_point / "keep").write_text("data")
    blockdev.unmount(mount_point)
    with pytest.raises(DeviceError, match="refusing.*TYPE=ext4"):
        blockdev.make_filesystem(loop_volume.device, "second")
    blockdev.mount(loop_volume.device, mount_point)
    try:
        assert (mount_point / "keep").read_text() == "data"
    finally:
        blockdev.unmount(mount_point)


@pytest.mark.loopdev
def test_mkfs_is_refused_on_any_other_signature(loop_volume):
    subprocess.run(["mkswap", str(loop_volume.device)], check=True, capture_output=True)
    with pytest.raises(DeviceError, match="TYPE=swap"):
        blockdev.make_filesystem(loop_volume.device, "x")


@pytest.mark.loopdev
def test_fsck_replays_an_unclean_filesystem(loop_volume, tmp_path):
    blockdev.make_filesystem(loop_volume.device, "dirty")
    # Mark the filesystem as not cleanly unmounted, as after an instance died mid-write.
    subprocess.run(["debugfs", "-w", "-R", "ssv state 0", str(loop_volume.device)],
                   check=True, capture_output=True)
    assert "not clean" in _fs_state(loop_volume.device)
    blockdev.check_filesystem(loop_volume.device)
    assert _fs_state(loop_volume.device) == "clean"


def _fs_state(device: Path) -> str:
    out = subprocess.run(["dumpe2fs", "-h", str(device)], capture_output=True, text=True).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                if line.startswith("Filesystem state:"))


@pytest.mark.loopdev
def test_mount_refuses_to_stack_over_another_device(loop_volume, tmp_path):
    blockdev.make_filesystem(loop_volume.device, "a")
    mount_point = tmp_path / "m"
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["mount", "--bind", str(other), str(mount_point.mkdir() or mount_point)], check=True)
    try:
        with pytest.raises(DeviceError, match="is mounted there"):
            blockdev.mount(loop_volume.device, mount_point)
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.loopdev
def test_unmount_while_a_file_is_open_is_a_clear_busy_error(loop_volume, tmp_path):
    blockdev.make_filesystem(loop_volume.device, "busy")
    mount_point = tmp_path / "m"
    blockdev.mount(loop_volume.device, mount_point)
    holder = subprocess.Popen(["sh", "-c", f"exec 3>{mount_point}/held; echo ready; exec sleep 60"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(DeviceError) as error:
            blockdev.unmount(mount_point)
        assert "busy" in str(error.value)
        assert f"{holder.pid} (sleep)" in str(error.value)
        assert blockdev.is_mounted(mount_point)
    finally:
        holder.kill()
        holder.wait()
    blockdev.unmount(mount_point)
    assert not blockdev.is_mounted(mount_point)


@pytest.mark.loopdev
def test_prepare_layout_makes_owned_dirs_and_leaves_owned_ones_alone(loop_volume, tmp_path):
    import pwd
    nobody = pwd.getpwnam("nobody")
    blockdev.make_filesystem(loop_volume.device, "layout")
    mount_point = tmp_path / "m"
    blockdev.mount(loop_volume.device, mount_point)
    try:
        stale = mount_point / "checkpoints" / "old"
        stale.mkdir(parents=True)  # root-owned, as if written under another uid
        blockdev.prepare_layout(mount_point, ["datasets", "checkpoints"], "nobody")
        for path in (mount_point / "datasets", mount_point / "checkpoints", stale):
            assert (path.stat().st_uid, path.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid), path
        assert mount_point.stat().st_uid == 0  # the volume root stays the agent's
        # A root-owned file inside a directory the user already owns is not walked again.
        marker = mount_point / "datasets" / "root-file"
        marker.write_text("x")
        blockdev.prepare_layout(mount_point, ["datasets", "checkpoints"], "nobody")
        assert marker.stat().st_uid == 0
    finally:
        blockdev.unmount(mount_point)


def test_prepare_layout_with_an_unknown_user_is_a_clear_error(tmp_path):
    with pytest.raises(DeviceError, match="training user 'no-such-user-x' does not exist"):
        blockdev.prepare_layout(tmp_path, ["datasets"], "no-such-user-x")
    assert not (tmp_path / "datasets").exists()


@pytest.mark.parametrize("bad", ["/etc", "../escape", ""])
def test_prepare_layout_refuses_paths_outside_the_volume(tmp_path, bad):
    with pytest.raises(DeviceError, match="relative path inside"):
        blockdev.prepare_layout(tmp_path, [bad], "root")

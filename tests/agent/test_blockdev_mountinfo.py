"""The one mountinfo parser (spotrun.blockdev.mounts): paths with blanks come back unescaped.

The kernel writes a space as \\040, a tab as \\011 and a backslash as \\134 in
/proc/self/mountinfo; a mount point compared without unescaping it is never found.
"""
import os

import pytest

from spotrun import blockdev
from spotrun.localcloud import ebs

# One line as proc(5) documents it, with an optional field, for a mount point
# "/mnt/a b<TAB>c\d/é" (é is UTF-8, left as it is by the kernel).
LINE = ("36 35 98:0 /sub\\040dir /mnt/a\\040b\\011c\\134d/\u00e9 rw,noatime master:1 - ext3 "
        "/dev/root\\040x rw,errors=continue")


def test_parse_mountinfo_unescapes_space_tab_and_backslash_in_every_path():
    [entry] = blockdev.parse_mountinfo(LINE + "\n")
    assert entry == {"dev": "98:0", "root": "/sub dir", "mount_point": "/mnt/a b\tc\\d/\u00e9",
                     "options": "rw,noatime", "fstype": "ext3", "source": "/dev/root x"}


def test_a_literal_backslash_before_digits_is_not_read_as_an_escape():
    # A directory really named "x\040y" is written "x\134040y": one pass, not two.
    line = "1 0 0:1 / /mnt/x\\134040y rw - tmpfs none rw"
    assert blockdev.parse_mountinfo(line)[0]["mount_point"] == "/mnt/x\\040y"


@pytest.mark.loopdev
def test_a_bind_mount_at_a_path_with_a_space_and_a_tab_is_seen_mounted(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (mount)")
    data = tmp_path / "volume data"
    data.mkdir()
    mount_point = tmp_path / "mount\tpoint with space"
    try:
        blockdev.mount(data, mount_point)
        assert blockdev.is_mounted(mount_point)
        assert blockdev.mounted_device(mount_point) == data
        assert str(mount_point) in blockdev.mount_points_of(data)
        # The local cloud's view of the same table (it unmounts what an instance leaves).
        assert ebs.mount_points_under(tmp_path) == [str(mount_point)]
    finally:
        blockdev.unmount(mount_point)
    assert not blockdev.is_mounted(mount_point)
    assert ebs.mount_points_under(tmp_path) == []

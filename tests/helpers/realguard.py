"""What a run that must prove the real thing needs (CI, `make test`): the check tests/conftest.py
makes at session start, and the skips it turns into failures.

Required when ``CI`` is set (to anything but "", "0" or "false") or ``SPOTRUN_REQUIRE_REAL=1``.
Then root, usable loop devices and the Debian tools the tests drive (systemd-nspawn and the
rest) must all be there, and directory-backed volumes must not be asked for: a missing part is
a failure that names it and how to get it, never a skip that leaves CI green. The probes are
module attributes so a test can stand in for a machine that lacks one (tests/core/
test_ci_guard.py runs pytest in a subprocess with such a plugin).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

REQUIRE_ENV = "SPOTRUN_REQUIRE_REAL"
# tool -> where it comes from (`make apt` installs every one of them).
TOOLS = {
    "losetup": "util-linux", "mount": "mount", "umount": "mount", "blkid": "util-linux",
    "nsenter": "util-linux", "mkfs.ext4": "e2fsprogs", "e2fsck": "e2fsprogs",
    "debugfs": "e2fsprogs", "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap", "dpkg-buildpackage": "dpkg-dev", "dh": "debhelper",
    "lintian": "lintian", "packer": "packer",
}
# A skip for one of these reasons is a missing part of the machine, not a choice.
# ("no IPv6 loopback" is not one: a loop device is.)
ENVIRONMENT_SKIP = re.compile(r"\broot\b|\bloop\b|loop devices?|loop-control|losetup|nspawn|"
                              r"container|mount|make apt|not installed|missing", re.IGNORECASE)


def required(environ=os.environ) -> bool:
    ci = environ.get("CI", "").strip().lower()
    return ci not in ("", "0", "false", "no") or environ.get(REQUIRE_ENV, "").strip() == "1"


def is_root() -> bool:
    return os.geteuid() == 0


def probe_loop() -> tuple[bool, str]:
    from spotrun.localcloud.ebs import probe_loop_devices

    with tempfile.TemporaryDirectory(prefix="spotrun-loop-probe-") as scratch:
        return probe_loop_devices(Path(scratch))


def which(tool: str) -> str | None:
    return shutil.which(tool)


def missing(environ=os.environ) -> list[str]:
    """One sentence per missing part: what it is and how to get it."""
    out = []
    if not is_root():
        out.append("root: the tests bind loop devices, mount volumes and boot a container; "
                   "run the suite as root (sudo make test)")
    else:
        usable, why = probe_loop()
        if not usable:
            out.append(f"loop devices ({why}): load the module (modprobe loop) or, in a "
                       "container, give it /dev/loop-control and /dev/loop* (--privileged)")
    absent = [tool for tool in TOOLS if not which(tool)]
    if absent:
        packages = sorted({TOOLS[tool] for tool in absent})
        out.append(f"tools {', '.join(absent)}: `make apt` installs them (Debian packages "
                   f"{' '.join(packages)})")
    from spotrun.localcloud.ebs import VOLUMES_ENV

    if environ.get(VOLUMES_ENV, "").strip().lower() == "directory":
        out.append(f"{VOLUMES_ENV}=directory asks for directory-backed volumes (no mkfs, fsck "
                   "or real detach): unset it; this run must use loop devices")
    return out


def message(parts: list[str], environ=os.environ) -> str:
    why = "CI is set" if environ.get("CI", "").strip().lower() not in ("", "0", "false", "no") \
        else f"{REQUIRE_ENV}=1"
    return (f"this test run must prove the real thing ({why}), and the machine lacks:\n"
            + "\n".join(f"  - {part}" for part in parts))

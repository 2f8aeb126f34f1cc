"""Block devices and mounts: find the volume's device by its id, mkfs-if-empty, fsck, mount.

Real kernel operations (blkid, mkfs.ext4, e2fsck, mount, umount); the agent runs as root.
Only this module runs them. The rules it keeps:

- The device is resolved from the *volume id* (Nitro's by-id link
  ``nvme-Amazon_Elastic_Block_Store_vol…``, or the NVMe controller serial in sysfs when
  udev made no link), never from the ``/dev/sdf`` name asked for at attach time.
- A filesystem is made only on a device with no signature at all; anything else is refused.
- Every operation is idempotent: mounting what is already mounted there, or unmounting
  what is not mounted, is a no-op.

Directory-backed volumes (the local spot cloud without loop devices links the by-id name to
a directory): ``filesystem_type`` says ``"directory"``, ``check_filesystem`` does nothing,
``make_filesystem`` refuses, and ``mount`` bind-mounts the directory, so the mount point,
unmount and busy rules behave as with a real device.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import pwd
import re
import subprocess
import time
from pathlib import Path

from spotrun.errors import SpotrunError
from spotrun.log import get_logger
from spotrun.waiting import wait_until

NITRO_PREFIX = "nvme-Amazon_Elastic_Block_Store_"
DIRECTORY = "directory"  # filesystem_type() of a directory-backed volume
SYS_BLOCK = Path("/sys/block")
DEV = Path("/dev")
MOUNTINFO = Path("/proc/self/mountinfo")
EXT4_LABEL_MAX = 16

_VOLUME_ID = re.compile(r"^vol-[0-9a-f]{8,17}$")
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")

log = get_logger("blockdev")


class DeviceError(SpotrunError):
    """A block device or mount problem; the message names the volume, device or path."""


# -- names and discovery ---------------------------------------------------------------------

def _check_volume_id(volume_id: str) -> None:
    if not _VOLUME_ID.match(volume_id or ""):
        raise DeviceError(f"{volume_id!r} is not an EBS volume id (vol- and 8 or 17 hex digits)")


def device_link_name(volume_id: str) -> str:
    """``vol-0abc…`` -> ``nvme-Amazon_Elastic_Block_Store_vol0abc…`` (Nitro's by-id name)."""
    _check_volume_id(volume_id)
    return NITRO_PREFIX + volume_id.replace("-", "", 1)


def _by_link(volume_id: str, device_dir: Path) -> Path | None:
    link = Path(device_dir) / device_link_name(volume_id)
    if not os.path.exists(link):  # follows the link: a dangling one is "not yet"
        return None
    target = link.resolve()
    if target.is_block_device() or target.is_dir():
        return target
    raise DeviceError(f"volume {volume_id}: {link} resolves to {target}, which is neither a block "
                      f"device nor a directory")


def _by_nvme_serial(volume_id: str, sys_block: Path, dev: Path) -> Path | None:
    # Nitro exposes the volume id (without the dash) as the NVMe controller's serial.
    wanted = volume_id.replace("-", "", 1)
    try:
        names = sorted(p.name for p in sys_block.iterdir() if p.name.startswith("nvme"))
    except OSError:
        return None
    for name in names:
        try:
            serial = (sys_block / name / "device" / "serial").read_text().strip()
        except OSError:
            continue
        if serial == wanted and (dev / name).exists():
            return dev / name
    return None


def find_device(volume_id: str, device_dir: Path, *, sys_block: Path = SYS_BLOCK,
                dev: Path = DEV) -> Path | None:
    """The volume's device now (by-id link, then NVMe serial), or None if not there yet."""
    return _by_link(volume_id, device_dir) or _by_nvme_serial(volume_id, sys_block, dev)


def wait_for_device(volume_id: str, device_dir: Path, timeout_s: float, *,
                    sys_block: Path = SYS_BLOCK, dev: Path = DEV) -> Path:
    """Wait until the attached volume's device appears; return the resolved device.

    Polls the real condition (the link, or a matching NVMe serial) until ``timeout_s``.
    """
    _check_volume_id(volume_id)
    device_dir = Path(device_dir)
    started = time.monotonic()

    def not_found() -> DeviceError:
        log.error("device_timeout", volume_id=volume_id, device_dir=str(device_dir),
                  timeout_s=timeout_s)
        return DeviceError(
            f"volume {volume_id}: no device appeared within {timeout_s:g} s: no "
            f"{device_dir / device_link_name(volume_id)} in {device_dir}, and no NVMe device in "
            f"{sys_block} with serial {volume_id.replace('-', '', 1)}")
    device = wait_until(lambda: find_device(volume_id, device_dir, sys_block=sys_block, dev=dev),
                        timeout_s, interval_s=0.05, backoff=2.0, max_interval_s=0.5,
                        what=f"a device for {volume_id}", error=not_found)
    log.info("device_found", volume_id=volume_id, device=str(device),
             waited_s=round(time.monotonic() - started, 3))
    return device


# -- filesystems -----------------------------------------------------------------------------

def _run(argv: list[str], what: str, *, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise DeviceError(f"{what}: {argv[0]} is not installed") from None
    if result.returncode not in ok:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise DeviceError(f"{what}: {' '.join(argv)} exited {result.returncode}"
                          + (f": {detail[-1]}" if detail else ""))
    return result


def _probe(device: Path) -> dict[str, str]:
    """Every signature blkid finds by probing the device itself (no cache): TYPE, PTTYPE, ..."""
    # blkid exits 2 when it finds nothing at all.
    result = _run(["blkid", "-p", "-o", "export", str(device)], f"probing {device}", ok=(0, 2))
    found = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found[key] = value
    return found


def filesystem_type(device: Path) -> str | None:
    """``ext4``, ``xfs``, … ; None when the device has no filesystem; ``"directory"`` for one."""
    device = Path(device)
    if device.is_dir():
        return DIRECTORY
    return _probe(device).get("TYPE")


def make_filesystem(device: Path, label: str) -> None:
    """mkfs.ext4 on a device that has no signature at all (no filesystem, no partition table)."""
    device = Path(device)
    if device.is_dir():
        raise DeviceError(f"{device} is a directory-backed volume: there is no filesystem to make")
    if not label or len(label.encode()) > EXT4_LABEL_MAX:
        raise DeviceError(f"filesystem label {label!r} must be 1 to {EXT4_LABEL_MAX} bytes (ext4)")
    found = _probe(device)
    signatures = {k: v for k, v in found.items() if k in ("TYPE", "PTTYPE", "PART_ENTRY_SCHEME")}
    if signatures:
        raise DeviceError(f"refusing to make a filesystem on {device}: it already has "
                          + ", ".join(f"{k}={v}" for k, v in sorted(signatures.items())))
    started = time.monotonic()
    # -m 0: a data volume needs no blocks reserved for root.
    _run(["mkfs.ext4", "-q", "-m", "0", "-L", label, str(device)], f"making a filesystem on {device}")
    made = filesystem_type(device)
    if made != "ext4":
        raise DeviceError(f"mkfs.ext4 on {device} finished but blkid finds {made!r}, not ext4")
    log.info("filesystem_made", device=str(device), fstype="ext4", label=label,
             duration_s=round(time.monotonic() - started, 3))


def check_filesystem(device: Path) -> None:
    """e2fsck -p: replays the journal and repairs what is safe after an unclean unmount.

    Fast on a clean filesystem. Skipped for a directory-backed volume, for a filesystem
    that is not ext2/3/4, and for a device that is mounted (never fsck a mounted filesystem).
    """
    device = Path(device)
    fstype = filesystem_type(device)
    if fstype not in ("ext2", "ext3", "ext4"):
        log.info("fsck_skipped", device=str(device), fstype=fstype, reason="not ext2/3/4")
        return
    points = mount_points_of(device)
    if points:
        log.info("fsck_skipped", device=str(device), reason="mounted", mount_points=points)
        return
    started = time.monotonic()
    # e2fsck exit codes: 0 clean, 1 errors fixed, 2 fixed and reboot advised; 4+ not fixed.
    result = _run(["e2fsck", "-p", str(device)], f"checking the filesystem on {device}", ok=(0, 1, 2))
    log.info("fsck_done", device=str(device), exit_code=result.returncode,
             repaired=result.returncode != 0, duration_s=round(time.monotonic() - started, 3))


# -- mounts ----------------------------------------------------------------------------------

def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \ooo (octal), one pass.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[dict[str, str]]:
    """proc(5) mountinfo lines as dicts: dev (major:minor), root, mount_point, options,
    fstype, source; paths unescaped."""
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        sep = fields.index("-")  # after the optional fields, which never are "-"
        entries.append({"dev": fields[2], "root": _unescape(fields[3]),
                        "mount_point": _unescape(fields[4]), "options": fields[5],
                        "fstype": fields[sep + 1], "source": _unescape(fields[sep + 2])})
    return entries


def mounts() -> list[dict[str, str]]:
    """Every mount this process sees (:func:`parse_mountinfo`), in mount order."""
    return parse_mountinfo(MOUNTINFO.read_text(encoding="utf-8", errors="surrogateescape"))


def _top_mount(mount_point: Path) -> dict[str, str] | None:
    target = os.path.realpath(mount_point)
    found = None
    for entry in mounts():
        if entry["mount_point"] == target:
            found = entry  # the last one is the one on top
    return found


def _entry_device(entry: dict[str, str], entries: list[dict[str, str]]) -> Path:
    if entry["root"] == "/":
        source = entry["source"]
        return Path(os.path.realpath(source)) if source.startswith("/") else Path(source)
    # A bind mount of a directory: find where its filesystem's root is mounted.
    for other in entries:
        if other["dev"] == entry["dev"] and other["root"] == "/":
            return Path(other["mount_point"]) / entry["root"].lstrip("/")
    return Path(entry["root"])


def is_mounted(mount_point: Path) -> bool:
    return _top_mount(Path(mount_point)) is not None


def mounted_device(mount_point: Path) -> Path | None:
    """What is mounted at ``mount_point``: the device, or the directory of a bind mount."""
    entry = _top_mount(Path(mount_point))
    return None if entry is None else _entry_device(entry, mounts())


def mount_points_of(device: Path) -> list[str]:
    """Where ``device`` (or a directory-backed volume) is mounted now."""
    wanted = Path(os.path.realpath(device))
    entries = mounts()
    return [e["mount_point"] for e in entries if _entry_device(e, entries) == wanted]


def mount(device: Path, mount_point: Path, options: str = "noatime") -> None:
    """Mount ``device`` at ``mount_point`` (made if missing); a no-op if it is already there."""
    device = Path(os.path.realpath(device))
    mount_point = Path(mount_point)
    current = mounted_device(mount_point)
    if current == device:
        log.info("mount_already", device=str(device), mount_point=str(mount_point))
        return
    if current is not None:
        raise DeviceError(f"cannot mount {device} at {mount_point}: {current} is mounted there")
    elsewhere = mount_points_of(device)
    if elsewhere:
        raise DeviceError(f"cannot mount {device} at {mount_point}: it is already mounted at "
                          f"{', '.join(elsewhere)}")
    mount_point.mkdir(parents=True, exist_ok=True)
    if any(mount_point.iterdir()):
        # Files written while nothing was mounted would be hidden, not lost; say so.
        log.warning("mount_point_not_empty", mount_point=str(mount_point))
    if device.is_dir():
        argv = ["mount", "--bind", str(device), str(mount_point)]
        kind = "bind"
    else:
        fstype = filesystem_type(device)
        if fstype is None:
            raise DeviceError(f"cannot mount {device} at {mount_point}: it has no filesystem")
        argv = ["mount", "-t", fstype, "-o", options, str(device), str(mount_point)]
        kind = fstype
    _run(argv, f"mounting {device} at {mount_point}")
    log.info("mounted", device=str(device), mount_point=str(mount_point), fstype=kind, options=options)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def sync(path: Path) -> None:
    """Flush the filesystem that holds ``path`` to its device (syncfs; sync() if unavailable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        syncfs = getattr(_libc, "syncfs", None)
        if syncfs is None or syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _holders(mount_point: Path) -> list[str]:
    """Processes with a file, cwd or root under ``mount_point``: ``"1234 (python3)"``."""
    prefix = os.path.realpath(mount_point)
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        proc = Path("/proc", pid)
        links = [proc / "cwd", proc / "root"]
        try:
            links += list((proc / "fd").iterdir())
        except OSError:
            continue
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == prefix or target.startswith(prefix + "/"):
                try:
                    name = (proc / "comm").read_text().strip()
                except OSError:
                    name = "?"
                holders.append(f"{pid} ({name})")
                break
    return holders


def unmount(mount_point: Path) -> None:
    """Flush and unmount; a no-op if nothing is mounted. A busy mount is an error, not lazy."""
    mount_point = Path(mount_point)
    device = mounted_device(mount_point)
    if device is None:
        log.info("unmount_already", mount_point=str(mount_point))
        return
    sync(mount_point)
    result = subprocess.run(["umount", str(mount_point)], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        holders = _holders(mount_point)
        message = result.stderr.strip() or f"umount exited {result.returncode}"
        if "busy" in message or holders:
            log.error("unmount_busy", mount_point=str(mount_point), holders=holders)
            raise DeviceError(f"cannot unmount {mount_point}: it is busy"
                              + (f"; held by {', '.join(holders)}" if holders else "")
                              + f" ({message})")
        raise DeviceError(f"cannot unmount {mount_point}: {message}")
    log.info("unmounted", mount_point=str(mount_point), device=str(device))


# -- layout ----------------------------------------------------------------------------------

def _chown_tree(top: Path, uid: int, gid: int) -> None:
    os.lchown(top, uid, gid)
    for root, dirs, files in os.walk(top):  # never follows symlinks
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


def prepare_layout(mount_point: Path, subdirs: list[str], user: str) -> None:
    """Make ``subdirs`` under the mount point and give them to ``user``.

    A new directory, or one owned by someone else (first boot; another uid on a new AMI),
    is chowned recursively; one the user already owns is left alone, so a second boot does
    not walk a large dataset.
    """
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise DeviceError(f"training user {user!r} does not exist on this instance "
                          f"(trainer.user; create it in the AMI)") from None
    mount_point = Path(mount_point)
    if not mount_point.is_dir():
        raise DeviceError(f"cannot prepare {mount_point}: not a directory (is the volume mounted?)")
    for sub in subdirs:
        if not sub or Path(sub).is_absolute() or ".." in Path(sub).parts:
            raise DeviceError(f"{sub!r} must be a relative path inside {mount_point}")
        path = mount_point / sub
        if path.is_symlink():
            raise DeviceError(f"{path} is a symbolic link; refusing to chown through it")
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        stat = path.stat()
        if created or (stat.st_uid, stat.st_gid) != (account.pw_uid, account.pw_gid):
            _chown_tree(path, account.pw_uid, account.pw_gid)
            log.info("layout_owned", path=str(path), user=user, created=created)

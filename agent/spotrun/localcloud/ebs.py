"""The EBS data plane: volumes as sparse image files on real loop devices.

Each volume is ``<root>/ebs/volumes/<vol-id>.img`` (sparse, its size in GiB); attaching it
binds a loop device (``losetup --find --show``) and links
``<device_dir>/nvme-Amazon_Elastic_Block_Store_vol<id without dash>`` to it, the name udev
gives an EBS volume under /dev/disk/by-id on Nitro instances. A snapshot is a sparse copy
of the image as of the call; a volume created from a snapshot starts as a copy of it.

Directory-backed volumes (a volume is a directory and the link points at it: no block
device, no mkfs, fsck or real detach) exist only when asked for by name:
``SPOTRUN_LOCALCLOUD_VOLUMES=directory`` in the environment, or ``use_loop_devices=False``.
Otherwise loop devices are required, and a cloud started where they are unavailable (not
root, no /dev/loop-control, ``losetup`` fails) fails saying why and how to ask for
directories: a silent fallback would let tests, the soak and the demo pass on a data plane
that never mounts anything.

Every loop device bound here is written to ``<root>/ebs/loop-devices.json`` before use, so
that the next start on the same root cleans up what a crashed run left behind. Only loop
devices whose backing file is under this root are ever detached: other users of the
machine's loop devices are never touched.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

from spotrun import blockdev
from spotrun.log import get_logger

GIB = 1024 ** 3
LINK_PREFIX = "nvme-Amazon_Elastic_Block_Store_"
log = get_logger("localcloud.ebs")


class DataPlaneError(RuntimeError):
    pass


VOLUMES_ENV = "SPOTRUN_LOCALCLOUD_VOLUMES"
VOLUME_KINDS = ("loop", "directory")


def volumes_asked_for() -> str:
    """The volume kind the environment asks for: "loop" (the default) or "directory"."""
    value = os.environ.get(VOLUMES_ENV, "").strip().lower() or "loop"
    if value not in VOLUME_KINDS:
        raise DataPlaneError(f"{VOLUMES_ENV}={os.environ.get(VOLUMES_ENV)!r}: expected one of "
                             f"{', '.join(VOLUME_KINDS)}")
    return value


def device_link_name(volume_id: str) -> str:
    """``vol-0abc`` -> ``nvme-Amazon_Elastic_Block_Store_vol0abc`` (Nitro's by-id name)."""
    return LINK_PREFIX + volume_id.replace("-", "", 1)


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise DataPlaneError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def mounts() -> list[tuple[str, str, str]]:
    """(major:minor, mount point, source) for every mount visible to this process."""
    return [(m["dev"], m["mount_point"], m["source"]) for m in blockdev.mounts()]


def mount_points_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first (the order to unmount them)."""
    base = os.path.realpath(path)
    found = [point for _, point, _ in mounts()
             if point == base or point.startswith(base.rstrip("/") + "/")]
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def lazy_unmount_under(path: Path) -> list[str]:
    """``umount -l`` everything mounted under ``path``: what happens to an instance's mounts
    when the instance disappears (the kernel keeps a busy filesystem alive until released)."""
    points = mount_points_under(path)
    for point in points:
        _run(["umount", "-l", point], check=False)
    return points


def probe_loop_devices(scratch: Path) -> tuple[bool, str]:
    """Whether this process can bind loop devices, and why not when it cannot."""
    if os.geteuid() != 0:
        return False, "not root"
    if not os.path.exists("/dev/loop-control"):
        return False, "no /dev/loop-control"
    if shutil.which("losetup") is None:
        return False, "losetup not installed"
    scratch.mkdir(parents=True, exist_ok=True)
    image = scratch / ".loop-probe.img"
    with open(image, "wb") as handle:
        handle.truncate(1024 * 1024)
    try:
        proc = _run(["losetup", "--find", "--show", str(image)], check=False)
        if proc.returncode != 0:
            return False, f"losetup --find failed: {proc.stderr.strip()}"
        _run(["losetup", "-d", proc.stdout.strip()], check=False)
        return True, ""
    finally:
        image.unlink(missing_ok=True)


class EbsDataPlane:
    def __init__(self, root: Path, use_loop_devices: bool | None = None):
        self.root = Path(root) / "ebs"
        self.volumes_dir = self.root / "volumes"
        self.snapshots_dir = self.root / "snapshots"
        self.registry_path = self.root / "loop-devices.json"
        for directory in (self.volumes_dir, self.snapshots_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        if use_loop_devices is None and volumes_asked_for() == "directory":
            use_loop_devices, self.no_loop_reason = False, f"asked for by {VOLUMES_ENV}=directory"
        elif use_loop_devices is None:
            usable, why = probe_loop_devices(self.root)
            if not usable:
                raise DataPlaneError(
                    f"loop devices unavailable ({why}): the local cloud's volumes are ext4 images "
                    "on loop devices, which need root and /dev/loop-control (modprobe loop; in a "
                    "container, give it the loop devices, e.g. --privileged). To run on "
                    "directory-backed volumes instead (no mkfs, fsck or real detach), ask for "
                    f"them by name: {VOLUMES_ENV}=directory")
            use_loop_devices, self.no_loop_reason = True, ""
        else:
            self.no_loop_reason = "" if use_loop_devices else "disabled by configuration"
        self.uses_loop_devices = use_loop_devices
        # Set once an instance mounts in a mount namespace of its own (rehearse's /dltraining):
        # its mounts are not in this process's mountinfo, so is_busy asks the kernel too.
        self.private_mount_namespaces = False
        # volume id -> (loop device or directory, device_dir it is linked in)
        self._attached: dict[str, tuple[str, Path]] = {}

    # -- paths ---------------------------------------------------------------------------
    def volume_path(self, volume_id: str) -> Path:
        suffix = ".img" if self.uses_loop_devices else ""
        return self.volumes_dir / f"{volume_id}{suffix}"

    def snapshot_path(self, snapshot_id: str) -> Path:
        suffix = ".img" if self.uses_loop_devices else ""
        return self.snapshots_dir / f"{snapshot_id}{suffix}"

    def has_volume(self, volume_id: str) -> bool:
        return self.volume_path(volume_id).exists()

    def device_of(self, volume_id: str) -> str | None:
        with self._lock:
            entry = self._attached.get(volume_id)
            return entry[0] if entry else None

    # -- volumes and snapshots ---------------------------------------------------------
    def create_volume(self, volume_id: str, size_gib: int, snapshot_id: str | None = None) -> Path:
        path = self.volume_path(volume_id)
        source = self.snapshot_path(snapshot_id) if snapshot_id else None
        if source is not None and not source.exists():
            # A snapshot made outside the local cloud (moto's AMI snapshots): start empty.
            log.warning("snapshot_data_missing", snapshot_id=snapshot_id, volume_id=volume_id)
            source = None
        if self.uses_loop_devices:
            if source is not None:
                _copy_sparse(source, path)
            with open(path, "ab") as handle:
                # AWS lets a volume from a snapshot be larger than the snapshot; never smaller.
                if handle.tell() < size_gib * GIB:
                    handle.truncate(size_gib * GIB)
        elif source is not None:
            _run(["cp", "-a", "--reflink=auto", str(source), str(path)])
        else:
            path.mkdir()
        log.info("volume_image_created", volume_id=volume_id, size_gib=size_gib,
                 snapshot_id=snapshot_id, path=str(path))
        return path

    def snapshot(self, volume_id: str, snapshot_id: str) -> Path:
        """Copy the volume's data as of now (crash-consistent, like an EBS snapshot)."""
        source, target = self.volume_path(volume_id), self.snapshot_path(snapshot_id)
        if not source.exists():
            raise DataPlaneError(f"{volume_id}: no data file {source}")
        if self.uses_loop_devices:
            _copy_sparse(source, target)
        else:
            _run(["cp", "-a", "--reflink=auto", str(source), str(target)])
        log.info("snapshot_data_copied", volume_id=volume_id, snapshot_id=snapshot_id)
        return target

    def delete_volume(self, volume_id: str) -> None:
        if self.device_of(volume_id):
            self.detach(volume_id, force=True)
        _remove(self.volume_path(volume_id))
        log.info("volume_image_deleted", volume_id=volume_id)

    def delete_snapshot(self, snapshot_id: str) -> None:
        _remove(self.snapshot_path(snapshot_id))
        log.info("snapshot_data_deleted", snapshot_id=snapshot_id)

    # -- attachments -------------------------------------------------------------------
    def attach(self, volume_id: str, device_dir: Path) -> Path:
        """Bind the volume to a block device and link it by id; returns the link."""
        with self._lock:
            image = self.volume_path(volume_id)
            if not image.exists():
                raise DataPlaneError(f"{volume_id}: no data file {image}")
            if volume_id in self._attached:
                raise DataPlaneError(f"{volume_id}: already attached at {self._attached[volume_id][0]}")
            device_dir = Path(device_dir)
            device_dir.mkdir(parents=True, exist_ok=True)
            if self.uses_loop_devices:
                device = _run(["losetup", "--find", "--show", str(image)]).stdout.strip()
                self._register(device, volume_id, image)
            else:
                device = str(image)
            link = device_dir / device_link_name(volume_id)
            link.unlink(missing_ok=True)
            link.symlink_to(device)
            self._attached[volume_id] = (device, device_dir)
            log.info("volume_device_attached", volume_id=volume_id, device=device, link=str(link))
            return link

    def is_busy(self, volume_id: str) -> bool:
        """True while the volume's loop device is mounted anywhere (detach must wait)."""
        device = self.device_of(volume_id)
        if not device or not self.uses_loop_devices:
            return False
        try:
            rdev = os.stat(device).st_rdev
        except FileNotFoundError:
            return False
        wanted = f"{os.major(rdev)}:{os.minor(rdev)}"
        if any(majmin == wanted or source == device for majmin, _, source in mounts()):
            return True
        return self.private_mount_namespaces and _claimed_exclusively(device)

    def detach(self, volume_id: str, force: bool = False) -> None:
        """Remove the by-id link and release the loop device.

        ``force`` releases even a mounted device: the kernel then keeps it (autoclear) until
        the filesystem is unmounted, where EC2 would cut the device off.
        """
        with self._lock:
            entry = self._attached.get(volume_id)
            if entry is None:
                return
            if not force and self.is_busy(volume_id):
                raise DataPlaneError(f"{volume_id}: {entry[0]} is mounted")
            device, device_dir = entry
            (device_dir / device_link_name(volume_id)).unlink(missing_ok=True)
            if self.uses_loop_devices:
                _run(["losetup", "-d", device], check=False)
                self._unregister(device)
            del self._attached[volume_id]
            log.info("volume_device_detached", volume_id=volume_id, device=device, forced=force)

    # -- cleanup -------------------------------------------------------------------------
    def release_all(self) -> None:
        """Unmount (lazily) and release every loop device this root bound, crashed runs too."""
        with self._lock:
            for volume_id in list(self._attached):
                self.detach(volume_id, force=True)
            for device in _loop_devices_backed_by(self.root) | set(self._read_registry()):
                if _backing_file(device, self.root) is None:
                    continue  # reused by someone else since: not ours any more
                for majmin, point, source in mounts():
                    if source == device:
                        _run(["umount", "-l", point], check=False)
                _run(["losetup", "-d", device], check=False)
                log.info("loop_device_released", device=device)
            self.registry_path.unlink(missing_ok=True)

    def _read_registry(self) -> dict:
        try:
            return json.loads(self.registry_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _write_registry(self, registry: dict) -> None:
        tmp = self.registry_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(registry, indent=1))
        os.replace(tmp, self.registry_path)

    def _register(self, device: str, volume_id: str, image: Path) -> None:
        registry = self._read_registry()
        registry[device] = {"volume_id": volume_id, "image": str(image)}
        self._write_registry(registry)

    def _unregister(self, device: str) -> None:
        registry = self._read_registry()
        registry.pop(device, None)
        self._write_registry(registry)


def _claimed_exclusively(device: str) -> bool:
    """Whether the kernel holds ``device`` for a filesystem (mounted in any mount namespace):
    an exclusive open is then refused with EBUSY."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL)
    except OSError as exc:
        return exc.errno == errno.EBUSY
    os.close(fd)
    return False


def _loop_devices_backed_by(root: Path) -> set[str]:
    proc = _run(["losetup", "--json", "--list"], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return set()
    devices = json.loads(proc.stdout).get("loopdevices", [])
    return {d["name"] for d in devices if _is_under(d.get("back-file") or "", root)}


def _backing_file(device: str, root: Path) -> str | None:
    proc = _run(["losetup", "--json", "--list", device], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    for entry in json.loads(proc.stdout).get("loopdevices", []):
        if _is_under(entry.get("back-file") or "", root):
            return entry["back-file"]
    return None


def _is_under(path: str, root: Path) -> bool:
    path = path.removesuffix(" (deleted)")
    base = os.path.realpath(root).rstrip("/") + "/"
    return path.startswith(base) or path.startswith(str(root).rstrip("/") + "/")


def _copy_sparse(source: Path, target: Path) -> None:
    # Reflink where the filesystem can (btrfs/xfs: instant), else a sparse copy that skips holes.
    _run(["cp", "--sparse=always", "--reflink=auto", str(source), str(target)])


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

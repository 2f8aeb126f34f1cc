"""What a job's volume holds, read from the volume's image file, not through the agent.

The rehearsal judges a resume by evidence the agent cannot write: the checkpoints on the
volume (their manifests: save sequence, step, time), the optimizer's iteration count inside
the newest one (the trainer's own model state), the trainer's last progress record and its
completion record. An ext4 image is read with ``debugfs`` in read-only catastrophic mode
(no mount, no loop device: the image may already be attached elsewhere or about to be
deleted); a directory-backed volume (the local cloud without loop devices) is read directly.
"""
from __future__ import annotations

import json
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Where the agent puts the trainer's checkpoints on the volume, and the store's layout there
# (spotrun_trainer.store and spotrun_trainer.protocol; not imported: the agent must not
# depend on the trainer library being importable).
CHECKPOINTS = "checkpoints"
STORE_SUBDIR = "spotrun"
PROGRESS_FILE = ".spotrun-progress.json"
COMPLETION_FILE = ".spotrun-trainer-completed.json"
WEIGHTS_FILE = "model.weights.h5"
_CKPT_NAME = re.compile(r"^ckpt-(\d{12})$")
_STAT_SIZE = re.compile(r"^User:\s+(\d+)\s.*\bSize: (\d+)")
_STAT_MTIME = re.compile(r"^\s*mtime: 0x([0-9a-f]+)(?::([0-9a-f]+))?")


class VolumeReadError(Exception):
    """The image could not be read; the message names it."""


@dataclass
class CheckpointSeen:
    name: str
    sequence: int
    step: int | None
    epoch: int | None
    step_in_epoch: int | None
    time: float | None
    iterations: int | None = None  # the optimizer's own count, from the saved model state

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class VolumeState:
    volume_id: str
    checkpoints: list[CheckpointSeen] = field(default_factory=list)  # by save sequence
    progress: dict | None = None
    completion: dict | None = None

    @property
    def newest(self) -> CheckpointSeen | None:
        return self.checkpoints[-1] if self.checkpoints else None

    @property
    def progress_step(self) -> int | None:
        step = (self.progress or {}).get("global_step")
        return step if isinstance(step, int) else None

    def as_dict(self) -> dict:
        return {"volume_id": self.volume_id, "checkpoints": [c.as_dict() for c in self.checkpoints],
                "progress_step": self.progress_step, "completion": self.completion}


class VolumeImage:
    """Read-only access to a volume's files by their path on the volume."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise VolumeReadError(f"{self.path}: no such volume image")

    def listdir(self, rel: str) -> list[str]:
        return [name for name, _ in self.entries(rel)]

    def entries(self, rel: str) -> list[tuple[str, bool]]:
        """(name, is a directory) for each entry of a directory on the volume; [] if none."""
        if self.path.is_dir():
            try:
                return sorted((p.name, p.is_dir() and not p.is_symlink())
                              for p in (self.path / rel).iterdir())
            except OSError:
                return []
        found = []
        for line in self._debugfs(["-R", f"ls -p /{rel}"]).stdout.splitlines():
            parts = line.split("/")  # /inode/mode/uid/gid/name/size/
            if len(parts) >= 7 and parts[5] not in (".", ".."):
                found.append((parts[5], parts[2].startswith("04")))
        return sorted(found)

    def stat(self, rels: list[str]) -> dict[str, tuple[float, int, int]]:
        """{rel: (mtime, size, owner uid)} for the files that exist among ``rels``."""
        if self.path.is_dir():
            found = {}
            for rel in rels:
                try:
                    st = (self.path / rel).stat()
                except OSError:
                    continue
                found[rel] = (st.st_mtime, st.st_size, st.st_uid)
            return found
        if not rels:
            return {}
        with tempfile.TemporaryDirectory(prefix="spotrun-volume-stat-") as tmp:
            script = Path(tmp) / "commands"
            script.write_text("".join(f'stat "/{rel}"\n' for rel in rels))
            out = self._debugfs(["-f", str(script)]).stdout
        found, current = {}, None
        for line in out.splitlines():
            if line.startswith("debugfs: stat "):
                current, size = line[len("debugfs: stat "):].strip().strip('"').lstrip("/"), None
            elif current and size is None and (m := _STAT_SIZE.search(line)):
                size, uid = int(m.group(2)), int(m.group(1))
            elif current and size is not None and (m := _STAT_MTIME.match(line)):
                # ext4's extra field: nanoseconds << 2 | epoch bits.
                found[current] = (int(m.group(1), 16) + (int(m.group(2) or "0", 16) >> 2) / 1e9,
                                  size, uid)
                current = None
        return found

    def read(self, rels: list[str]) -> dict[str, bytes]:
        """The files that exist among ``rels``, as {rel: bytes}; missing ones are left out."""
        if self.path.is_dir():
            found = {}
            for rel in rels:
                try:
                    found[rel] = (self.path / rel).read_bytes()
                except OSError:
                    continue
            return found
        with tempfile.TemporaryDirectory(prefix="spotrun-volume-read-") as tmp:
            script = Path(tmp) / "commands"
            script.write_text("".join(f'dump "/{rel}" "{tmp}/{i}"\n' for i, rel in enumerate(rels)))
            self._debugfs(["-f", str(script)])
            return {rel: (Path(tmp) / str(i)).read_bytes() for i, rel in enumerate(rels)
                    if (Path(tmp) / str(i)).exists()}

    def _debugfs(self, args: list[str]) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(["debugfs", "-c", *args, str(self.path)], capture_output=True,
                                  text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VolumeReadError(f"{self.path}: debugfs failed ({exc}); it is in e2fsprogs") from exc
        # debugfs exits 0 even when it cannot open the image; it says so on stderr.
        if proc.returncode != 0 or "while trying to open" in proc.stderr:
            raise VolumeReadError(f"{self.path}: not readable as ext4 (debugfs exit "
                                  f"{proc.returncode}: {proc.stderr.strip()[-300:]})")
        return proc


def read_volume_state(volume_id: str, image_path: Path) -> VolumeState:
    """The checkpoints (manifests, and the newest one's optimizer iterations), the progress
    record and the completion record on a volume. VolumeReadError if the image is unreadable."""
    image = VolumeImage(image_path)
    store = f"{CHECKPOINTS}/{STORE_SUBDIR}"
    names = sorted(n for n in image.listdir(store) if _CKPT_NAME.match(n))
    wanted = [f"{store}/{n}/manifest.json" for n in names]
    wanted += [f"{CHECKPOINTS}/{PROGRESS_FILE}", f"{CHECKPOINTS}/{COMPLETION_FILE}"]
    if names:
        wanted.append(f"{store}/{names[-1]}/{WEIGHTS_FILE}")
    files = image.read(wanted)
    state = VolumeState(volume_id)
    for name in names:
        manifest = _json(files.get(f"{store}/{name}/manifest.json"))
        if manifest is None:
            continue  # torn or foreign: the store's own readers skip it too
        state.checkpoints.append(CheckpointSeen(
            name=name, sequence=int(_CKPT_NAME.match(name).group(1)),
            step=_int(manifest.get("step")), epoch=_int(manifest.get("epoch")),
            step_in_epoch=_int(manifest.get("step_in_epoch")),
            time=manifest.get("time") if isinstance(manifest.get("time"), (int, float)) else None))
    weights = files.get(f"{store}/{names[-1]}/{WEIGHTS_FILE}") if names else None
    if state.checkpoints and weights is not None and state.newest.name == names[-1]:
        state.newest.iterations = optimizer_iterations(weights)
    state.progress = _json(files.get(f"{CHECKPOINTS}/{PROGRESS_FILE}"))
    state.completion = _json(files.get(f"{CHECKPOINTS}/{COMPLETION_FILE}"))
    return state


def list_script_files(image_path: Path, top: str = CHECKPOINTS, depth: int = 3,
                      check_newest: int = 3) -> list[dict]:
    """The files a training script wrote under ``top`` on the volume (its own checkpoints),
    leaving out spotrun's (the store, the progress and completion records): ``{"path",
    "mtime", "size", "uid", "intact"}`` each, oldest first. ``intact`` is whether the file opens as
    what its name says (a `.keras` zip, an HDF5 file), for the ``check_newest`` newest; None
    where that is unknown or not checked. VolumeReadError if the image is unreadable."""
    image = VolumeImage(image_path)
    files, level = [], [top]
    for _ in range(depth):
        below = []
        for directory in level:
            for name, is_dir in image.entries(directory):
                if name.startswith(".spotrun-") or (directory == top and name == STORE_SUBDIR):
                    continue
                (below if is_dir else files).append(f"{directory}/{name}")
        level = below
    stats = image.stat(files)
    found = sorted(({"path": rel, "mtime": mtime, "size": size, "uid": uid, "intact": None}
                    for rel, (mtime, size, uid) in stats.items()),
                   key=lambda f: (f["mtime"], f["path"]))
    newest = [f for f in found if f["path"].endswith(_CHECKABLE)][-check_newest:] if check_newest else []
    contents = image.read([f["path"] for f in newest])
    for f in newest:
        f["intact"] = opens_whole(f["path"], contents.get(f["path"], b""))
    return found


_CHECKABLE = (".keras", ".zip", ".h5", ".hdf5")


def opens_whole(name: str, data: bytes) -> bool | None:
    """Whether a saved model file is whole: a `.keras` (a zip) whose members all read back
    with their checksums, an HDF5 file h5py opens. A seed-style ModelCheckpoint writes in
    place, so a SIGTERM mid-save leaves a torn newest file. None: no way to tell."""
    import io

    if name.endswith((".keras", ".zip")):
        import zipfile

        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                return archive.testzip() is None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            return False
    if name.endswith((".h5", ".hdf5")):
        try:
            import h5py
        except ImportError:
            return None
        try:
            with h5py.File(io.BytesIO(data), "r"):
                return True
        except (OSError, ValueError):
            return False
    return None


def optimizer_iterations(weights: bytes) -> int | None:
    """The optimizer's step counter in a Keras 3 ``.weights.h5``: its first variable
    (``optimizer/vars/0``, an int64 scalar), which every optimizer creates first. None when
    the file has no optimizer part or h5py is missing."""
    try:
        import io

        import h5py
    except ImportError:
        return None
    try:
        with h5py.File(io.BytesIO(weights), "r") as h5:
            var = h5.get("optimizer/vars/0")
            if var is None or var.shape != () or var.dtype.kind not in "iu":
                return None
            return int(var[()])
    except (OSError, ValueError):
        return None


def _json(data: bytes | None) -> dict | None:
    if data is None:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None

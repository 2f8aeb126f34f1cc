"""Crash-safe checkpoint directories: never torn, checksummed, the last N kept.

Standard library only (no numpy, no keras at import): the agent imports this module to check
the volume's latest checkpoint and read the training progress.

Layout under the checkpoint directory (``$SPOTRUN_CHECKPOINT_DIR``)::

    spotrun/ckpt-000000001234/        one directory per checkpoint, named by global step
        weights.npz ...               payload files, written and fsynced first
        manifest.json                 written last: format, fingerprint, step, sha256 of each file
    spotrun/.tmp-ckpt-...             a save in progress (or a crashed one, removed on next save)

A save builds everything under a ``.tmp-`` name in the same directory, fsyncs each file and
the directory, renames it atomically to ``ckpt-<step>`` and fsyncs the parent; only then are
older checkpoints pruned. A crash at any point leaves the new checkpoint or the previous one,
both complete. Loading verifies every file's sha256 and falls back to the previous checkpoint,
with a warning, when one fails.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Union

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SUBDIR = "spotrun"
_CKPT_NAME = re.compile(r"^ckpt-(\d{12})$")
_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20

# A payload file is bytes, or a callable that writes into a binary file object (so a large
# array can be streamed without a second copy in memory).
Payload = Union[bytes, bytearray, memoryview, Callable[[BinaryIO], None]]
# Called with the name of each point of a save; the crash tests kill the writer there.
FaultHook = Callable[[str], None]

SAVE_POINTS = ("tmp_created", "during_file", "after_files", "during_manifest",
               "after_manifest", "before_rename", "after_rename", "before_prune",
               "during_prune", "saved")


def _logger(component: str):
    try:  # the agent's structured logger when it is installed; plain logging otherwise
        from spotrun.log import get_logger
        return get_logger(component)
    except Exception:  # noqa: BLE001 - the store must work without the agent package
        return None


def _log(level: str, event: str, component: str = "trainer.store", **fields: Any) -> None:
    structured = _logger(component)
    if structured is not None:
        getattr(structured, level)(event, **fields)
        return
    logging.getLogger("spotrun_" + component.replace(".", "_")).log(
        {"warning": logging.WARNING, "error": logging.ERROR}.get(level, logging.INFO),
        "%s %s", event, json.dumps(fields, default=str, sort_keys=True))


class CheckpointError(Exception):
    """Base class; the message names the checkpoint or directory concerned."""


class CheckpointWriteError(CheckpointError):
    """A save failed (disk full, I/O error); the previous checkpoint is untouched."""


class IncompatibleCheckpoint(CheckpointError):
    """The newest checkpoint has another format version or belongs to another model."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's manifest or a file's checksum does not verify."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    manifest: dict

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def epoch(self) -> int:
        return int(self.manifest["epoch"])

    @property
    def step_in_epoch(self) -> int:
        return int(self.manifest["step_in_epoch"])

    def file(self, name: str) -> Path:
        if name not in self.manifest.get("files", {}):
            raise CheckpointError(f"{self.path}: no file {name!r} in its manifest")
        return self.path / name

    def read_bytes(self, name: str) -> bytes:
        return self.file(name).read_bytes()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """File-like wrapper that hashes and counts what a payload callable writes."""

    def __init__(self, fh: BinaryIO):
        self._fh, self.sha256, self.size = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self.size += len(view)
        return self._fh.write(view)

    def flush(self) -> None:
        self._fh.flush()

    def tell(self) -> int:
        return self.size

    def seekable(self) -> bool:  # np.savez / zipfile need to know it cannot seek
        return False


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointStore:
    """Checkpoints of one job under ``<directory>/spotrun/``."""

    def __init__(self, directory: Union[str, os.PathLike], keep: int = 2,
                 fault_hook: FaultHook | None = None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.root = self.directory / SUBDIR
        self.keep = keep
        self._fault = fault_hook or (lambda _point: None)

    # ----------------------------------------------------------------- reading
    def list(self) -> list[Checkpoint]:
        """Complete-looking checkpoints (renamed into place), oldest first, not verified."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            if _CKPT_NAME.match(entry.name) and entry.is_dir():
                found.append(Checkpoint(entry, self._read_manifest_lenient(entry)))
        return sorted(found, key=lambda c: c.path.name)

    @staticmethod
    def _read_manifest_lenient(path: Path) -> dict:
        try:
            return json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}

    def verify(self, path: Union[str, os.PathLike]) -> Checkpoint:
        """The checkpoint at ``path`` with every checksum checked, or CorruptCheckpoint."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{path}: no {MANIFEST}") from None
        except (OSError, ValueError) as exc:
            raise CorruptCheckpoint(f"{path}/{MANIFEST}: unreadable: {exc}") from None
        version = manifest.get("format") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            raise IncompatibleCheckpoint(
                f"{path}: checkpoint format {version!r}, this library reads format "
                f"{FORMAT_VERSION}; use the spotrun_trainer version that wrote it")
        for name, meta in manifest.get("files", {}).items():
            file_path = path / name
            try:
                size = file_path.stat().st_size
            except OSError:
                raise CorruptCheckpoint(f"{file_path}: missing") from None
            if size != meta["size"]:
                raise CorruptCheckpoint(f"{file_path}: {size} bytes, manifest says {meta['size']}")
            if sha256_file(file_path) != meta["sha256"]:
                raise CorruptCheckpoint(f"{file_path}: sha256 mismatch")
        return Checkpoint(path, manifest)

    def latest_valid(self, fingerprint: str | None = None) -> Checkpoint | None:
        """The newest checkpoint whose checksums verify; older ones are tried in turn.

        A corrupt checkpoint is skipped with a ``checkpoint_corrupt`` warning. A checkpoint of
        another format, or (when ``fingerprint`` is given) of another model, raises
        IncompatibleCheckpoint: training on from the wrong state would be worse than stopping.
        """
        for candidate in reversed(self.list()):
            try:
                checkpoint = self.verify(candidate.path)
            except IncompatibleCheckpoint:
                raise
            except CorruptCheckpoint as exc:
                _log("warning", "checkpoint_corrupt", path=str(candidate.path), reason=str(exc))
                continue
            found = checkpoint.manifest.get("fingerprint")
            if fingerprint is not None and found != fingerprint:
                raise IncompatibleCheckpoint(
                    f"{checkpoint.path}: written for model {found!r}, this model is "
                    f"{fingerprint!r}; point the job at a fresh checkpoint directory or "
                    f"restore the model definition that wrote it")
            return checkpoint
        return None

    # ----------------------------------------------------------------- writing
    def cleanup_temporaries(self) -> list[Path]:
        """Remove what crashed saves left behind (``.tmp-*``); returns what was removed."""
        removed = []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.name.startswith(_TMP_PREFIX):
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
                    removed.append(entry)
        if removed:
            _log("info", "checkpoint_temporaries_removed", paths=[str(p) for p in removed])
        return removed

    def save(self, files: Mapping[str, Payload], *, step: int, epoch: int, step_in_epoch: int,
             fingerprint: str | None = None, commit: str | None = None,
             extra: Mapping[str, Any] | None = None) -> Checkpoint:
        """Write a new checkpoint atomically; returns it. Raises CheckpointWriteError."""
        for name in files:
            if name == MANIFEST or "/" in name or name.startswith("."):
                raise ValueError(f"invalid checkpoint file name {name!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        self.cleanup_temporaries()
        final = self.root / f"ckpt-{int(step):012d}"
        tmp = self.root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        try:
            os.mkdir(tmp)
            self._fault("tmp_created")
            digests = {name: self._write_file(tmp / name, payload) for name, payload in files.items()}
            self._fault("after_files")
            manifest = {
                "format": FORMAT_VERSION, "fingerprint": fingerprint, "step": int(step),
                "epoch": int(epoch), "step_in_epoch": int(step_in_epoch), "time": time.time(),
                "commit": commit, "files": digests, "extra": dict(extra or {}),
            }
            self._write_manifest(tmp / MANIFEST, manifest)
            self._fault("after_manifest")
            _fsync_dir(tmp)
            self._fault("before_rename")
            self._replace_into_place(tmp, final)
            self._fault("after_rename")
            _fsync_dir(self.root)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.list()
            kept = previous[-1].path.name if previous else "none"
            reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            _log("error", "checkpoint_save_failed", path=str(final), reason=reason, kept=kept)
            raise CheckpointWriteError(
                f"could not write checkpoint {final}: {reason} ({exc}); the previous "
                f"checkpoint ({kept}) is intact") from exc
        self._fault("before_prune")
        self._prune()
        self._fault("saved")
        _log("info", "checkpoint_saved", path=str(final), step=int(step), epoch=int(epoch),
             step_in_epoch=int(step_in_epoch), seconds=round(time.monotonic() - started, 3))
        return Checkpoint(final, manifest)

    def _write_file(self, path: Path, payload: Payload) -> dict:
        with open(path, "wb") as fh:
            writer = _HashingWriter(fh)
            if callable(payload):
                payload(writer)
            else:
                data = memoryview(payload).cast("B")
                half = len(data) // 2
                writer.write(data[:half])
                fh.flush()
                self._fault("during_file")
                writer.write(data[half:])
            fh.flush()
            os.fsync(fh.fileno())
        return {"sha256": writer.sha256.hexdigest(), "size": writer.size}

    def _write_manifest(self, path: Path, manifest: dict) -> None:
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            self._fault("during_manifest")
            fh.write(data[len(data) // 2:])
            fh.flush()
            os.fsync(fh.fileno())

    def _replace_into_place(self, tmp: Path, final: Path) -> None:
        if not final.exists():
            os.rename(tmp, final)
            return
        # The same step saved again. A directory cannot be renamed over a non-empty one, and
        # moving a good checkpoint aside first would leave a window with none (keep=1): so a
        # valid one stays and the new copy is dropped (a step's state is the same state).
        try:
            self.verify(final)
        except CheckpointError:
            pass
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            _log("info", "checkpoint_exists", path=str(final))
            return
        old = self.root / f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def _prune(self) -> None:
        checkpoints = self.list()
        for stale in checkpoints[: max(0, len(checkpoints) - self.keep)]:
            # Rename out of the ckpt- namespace first so a half-deleted directory is never
            # mistaken for a checkpoint; the .tmp- leftover is cleaned by the next save.
            doomed = self.root / f"{_TMP_PREFIX}prune-{stale.path.name}"
            os.rename(stale.path, doomed)
            self._fault("during_prune")
            shutil.rmtree(doomed, ignore_errors=True)
        _fsync_dir(self.root)


def write_json_atomic(path: Union[str, os.PathLike], data: Any, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` as JSON: temp file in the same dir, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, sort_keys=True)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if fsync:
        _fsync_dir(path.parent)


def write_progress(path: Union[str, os.PathLike], *, global_step: int, epoch: int = 0,
                   epochs: int | None = None, step: int | None = None,
                   steps_per_epoch: int | None = None,
                   last_checkpoint_time: float | None = None) -> None:
    """The progress record the agent reads from ``$SPOTRUN_PROGRESS_FILE`` (its status line,
    the volume's progress tag, the step a drain reached). A report, rewritten often: atomic
    but not fsynced. ``time`` is when it was written: the agent ignores a record older than
    the trainer it supervises."""
    write_json_atomic(path, {
        "epoch": epoch, "epochs": epochs, "step": global_step if step is None else step,
        "steps_per_epoch": steps_per_epoch, "global_step": global_step, "time": time.time(),
        "last_checkpoint_time": last_checkpoint_time}, fsync=False)

"""Crash-safe checkpoint directories: never torn, checksummed, the newest N saves kept.

Standard library only (no numpy, no keras at import): the agent imports this module to check
the volume's latest checkpoint and read the training progress.

Layout under the checkpoint directory (``$SPOTRUN_CHECKPOINT_DIR``)::

    spotrun/ckpt-000000000007/        one directory per checkpoint, named by its save sequence
        model.weights.h5 ...          payload files (the callback's), written and fsynced first
        manifest.json                 written last: format, fingerprint, sequence, step, sha256s
    spotrun/corrupt/ckpt-000000000006/  a checkpoint that failed verification, moved aside
    spotrun/.tmp-ckpt-...             a save in progress (or a crashed one, removed on next save)

Order is save order, as in TensorFlow's CheckpointManager (its ``ckpt-N`` is a save counter),
never the step: after a restart from an older checkpoint (the newest corrupt, a rollback) the
new saves are the newest. A save takes the number one above every ``ckpt-`` name present,
quarantined ones included, so a number is never reused. Checkpoints of earlier versions are
named by step, without ``sequence``: that number stands as their sequence, so they keep their
order among themselves and every new save comes after them.

A save builds everything under a ``.tmp-`` name, fsyncs each file and the directory, renames
it atomically to ``ckpt-<sequence>`` and fsyncs the parent; only then are older checkpoints
pruned (the newest ``keep`` by sequence stay, the one just written always among them). A crash
at any point leaves the new checkpoint or the previous one, both complete. Loading verifies
every file's sha256 and falls back to the previous checkpoint, with a warning; the writer's
restore passes ``quarantine=True`` to move a corrupt one aside (readers only look).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Union

# Re-exported: the agent and the trainers import these two from here.
from .jsonfile import fsync_dir as _fsync_dir, write_json_atomic, write_progress  # noqa: F401
from .logs import log_event

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SUBDIR = "spotrun"
QUARANTINE = "corrupt"
_CKPT_NAME = re.compile(r"^ckpt-(\d{12})$")
# Quarantined names may carry a suffix (see _quarantine); their number still counts.
_NUMBERED = re.compile(r"^ckpt-(\d{12})(?:-[0-9a-f]+)?$")
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
    def sequence(self) -> int:
        """Save order: the number in the name (a step-named checkpoint's step)."""
        match = _NUMBERED.match(self.path.name)
        if match is None:
            raise CheckpointError(f"{self.path}: not a checkpoint name (ckpt-<12 digits>)")
        return int(match.group(1))

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


def _manifest_problem(manifest: dict) -> str | None:
    """What makes a format-1 manifest unusable, naming the field; None when it is sound."""
    optional = ("sequence",) if "sequence" in manifest else ()  # absent in step-named ones
    for key in ("step", "epoch", "step_in_epoch") + optional:
        value = manifest.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            return f"field {key!r} is {value!r}, not an integer"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"field 'files' is {type(files).__name__}, not a mapping"
    for name, meta in files.items():
        if "/" in name or name.startswith("."):
            return f"files: invalid file name {name!r}"
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int)
                and isinstance(meta.get("sha256"), str)):
            return f"files[{name!r}] needs an integer 'size' and a string 'sha256', has {meta!r}"
    return None


class CheckpointStore:
    """Checkpoints of one job under ``<directory>/spotrun/``."""

    def __init__(self, directory: Union[str, os.PathLike], keep: int = 2,
                 fault_hook: FaultHook | None = None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.root = self.directory / SUBDIR
        self.quarantine_dir = self.root / QUARANTINE
        self.keep = keep
        self._fault = fault_hook or (lambda _point: None)

    # ----------------------------------------------------------------- reading
    def list(self) -> list[Checkpoint]:
        """Complete-looking checkpoints (renamed into place), in save order, not verified."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            if _CKPT_NAME.match(entry.name) and entry.is_dir():
                found.append(Checkpoint(entry, self._read_manifest_lenient(entry)))
        return sorted(found, key=lambda c: c.sequence)

    @staticmethod
    def _read_manifest_lenient(path: Path) -> dict:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            return {}
        return manifest if isinstance(manifest, dict) else {}

    def verify(self, path: Union[str, os.PathLike], *, checksums: bool = True) -> Checkpoint:
        """The checkpoint at ``path`` with every checksum checked, or CorruptCheckpoint.
        ``checksums=False`` checks only the manifest and the files' sizes (no reading)."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{path}: no {MANIFEST}") from None
        except (OSError, ValueError) as exc:
            raise CorruptCheckpoint(f"{path}/{MANIFEST}: unreadable: {exc}") from None
        if not isinstance(manifest, dict):
            raise CorruptCheckpoint(f"{path}/{MANIFEST}: not a JSON object")
        version = manifest.get("format")
        if version != FORMAT_VERSION:
            raise IncompatibleCheckpoint(
                f"{path}: checkpoint format {version!r}, this library reads format "
                f"{FORMAT_VERSION}; use the spotrun_trainer version that wrote it")
        problem = _manifest_problem(manifest)
        if problem:
            raise CorruptCheckpoint(f"{path}/{MANIFEST}: {problem}")
        for name, meta in manifest["files"].items():
            file_path = path / name
            try:
                size = file_path.stat().st_size
            except OSError:
                raise CorruptCheckpoint(f"{file_path}: missing") from None
            if size != meta["size"]:
                raise CorruptCheckpoint(f"{file_path}: {size} bytes, manifest says {meta['size']}")
            if checksums and sha256_file(file_path) != meta["sha256"]:
                raise CorruptCheckpoint(f"{file_path}: sha256 mismatch")
        return Checkpoint(path, manifest)

    def _broken(self, path: Path) -> str | None:
        """Why ``path`` is plainly broken, found without hashing; None if it looks whole
        (another format's counts as whole: it is not ours to judge)."""
        try:
            self.verify(path, checksums=False)
        except IncompatibleCheckpoint:
            return None
        except CorruptCheckpoint as exc:
            return str(exc)
        return None

    def latest_valid(self, fingerprint: str | None = None, *,
                     quarantine: bool = False) -> Checkpoint | None:
        """The newest checkpoint (by save order) whose checksums verify; older ones are tried
        in turn.

        A corrupt checkpoint is skipped with a ``checkpoint_corrupt`` warning, or, with
        ``quarantine=True`` (the trainer restoring; never a reader that only looks while a
        trainer may write), moved to ``spotrun/corrupt/`` with a ``checkpoint_quarantined``
        warning. A checkpoint of another format, or (when ``fingerprint`` is given) of another
        model, raises IncompatibleCheckpoint: training on from the wrong state would be worse
        than stopping.
        """
        for candidate in reversed(self.list()):
            try:
                checkpoint = self.verify(candidate.path)
            except IncompatibleCheckpoint:
                raise
            except CorruptCheckpoint as exc:
                if not (quarantine and self._quarantine(candidate.path, str(exc))):
                    log_event("warning", "checkpoint_corrupt", component="store",
                              path=str(candidate.path), reason=str(exc))
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
    def _quarantine(self, path: Path, reason: str) -> Path | None:
        """Move a corrupt checkpoint out of the ``ckpt-`` namespace, kept for inspection;
        its number stays taken. None (and a warning) if it cannot be moved."""
        target = self.quarantine_dir / path.name
        try:
            self.quarantine_dir.mkdir(exist_ok=True)
            if os.path.lexists(target):  # numbers are never reused: a hand-made copy, say
                target = target.with_name(f"{path.name}-{uuid.uuid4().hex[:8]}")
            os.rename(path, target)
            _fsync_dir(self.quarantine_dir)
            _fsync_dir(self.root)
        except OSError as exc:
            if path.exists():
                log_event("warning", "checkpoint_quarantine_failed", component="store",
                          path=str(path), error=str(exc))
                return None
        log_event("warning", "checkpoint_quarantined", component="store", path=str(path),
                  moved_to=str(target), reason=reason)
        return target

    def cleanup_temporaries(self) -> list[Path]:
        """Remove what crashed saves left behind (``.tmp-*``); returns what was removed."""
        removed = []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.name.startswith(_TMP_PREFIX):
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
                    removed.append(entry)
        if removed:
            log_event("info", "checkpoint_temporaries_removed", component="store",
                      paths=[str(p) for p in removed])
        return removed

    def _next_sequence(self) -> int:
        """One above every checkpoint number present, quarantined ones included."""
        highest = 0
        for folder in (self.root, self.quarantine_dir):
            try:
                names = os.listdir(folder)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                match = _NUMBERED.match(name)
                if match:
                    highest = max(highest, int(match.group(1)))
        return highest + 1

    def save(self, files: Mapping[str, Payload], *, step: int, epoch: int, step_in_epoch: int,
             fingerprint: str | None = None, commit: str | None = None,
             extra: Mapping[str, Any] | None = None) -> Checkpoint:
        """Write a new checkpoint atomically; returns it. Raises CheckpointWriteError."""
        for name in files:
            if name == MANIFEST or "/" in name or name.startswith("."):
                raise ValueError(f"invalid checkpoint file name {name!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        self.cleanup_temporaries()
        sequence = self._next_sequence()
        final = self.root / f"ckpt-{sequence:012d}"
        tmp = self.root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        try:
            os.mkdir(tmp)
            self._fault("tmp_created")
            digests = {name: self._write_file(tmp / name, payload) for name, payload in files.items()}
            self._fault("after_files")
            manifest = {
                "format": FORMAT_VERSION, "fingerprint": fingerprint, "sequence": sequence,
                "step": int(step), "epoch": int(epoch), "step_in_epoch": int(step_in_epoch),
                "time": time.time(), "commit": commit, "files": digests,
                "extra": dict(extra or {}),
            }
            self._write_manifest(tmp / MANIFEST, manifest)
            self._fault("after_manifest")
            _fsync_dir(tmp)
            self._fault("before_rename")
            # A name is never reused, so it is free unless another writer shares this
            # directory: never rename over it (Linux silently replaces an empty directory).
            if os.path.lexists(final):
                raise OSError(errno.EEXIST, f"{final.name} already exists (another writer?)")
            os.rename(tmp, final)
            self._fault("after_rename")
            _fsync_dir(self.root)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = next((c.path.name for c in reversed(self.list()) if c.path != final
                         and not self._broken(c.path)), "none")
            reason = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            log_event("error", "checkpoint_save_failed", component="store", path=str(final),
                      reason=reason, kept=kept)
            raise CheckpointWriteError(
                f"could not write checkpoint {final}: {reason} ({exc}); the previous "
                f"checkpoint ({kept}) is intact") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # interrupted: leave no half-written save
            raise
        self._fault("before_prune")
        self._prune(final)
        self._fault("saved")
        log_event("info", "checkpoint_saved", component="store", path=str(final),
                  sequence=sequence, step=int(step), epoch=int(epoch),
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

    def _prune(self, written: Path) -> None:
        """Keep the newest ``keep`` checkpoints by save order, ``written`` always among them.
        A plainly broken one is moved aside, neither counted nor deleted (a flipped byte is
        found only by hashing, which ``latest_valid`` does, not each save)."""
        kept = 0
        for checkpoint in reversed(self.list()):
            path = checkpoint.path
            reason = None if path == written else self._broken(path)
            if reason is not None:
                self._quarantine(path, reason)
            elif kept < self.keep or path == written:
                kept += 1
            else:
                # Rename out of the ckpt- namespace first so a half-deleted directory is never
                # mistaken for a checkpoint; the .tmp- leftover is cleaned by the next save.
                doomed = self.root / f"{_TMP_PREFIX}prune-{path.name}"
                os.rename(path, doomed)
                self._fault("during_prune")
                shutil.rmtree(doomed, ignore_errors=True)
        _fsync_dir(self.root)

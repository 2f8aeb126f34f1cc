"""CIFAR-10 on the volume: download (checksummed, resumable), a synthetic stand-in, a loader.

    python -m spotrun_trainer.datasets download --dest /dltraining/datasets [--url URL]
    python -m spotrun_trainer.datasets synth --dest DIR --train 2000 --test 500 --seed 0

Both leave ``DEST/cifar-10-batches-py/`` in the standard python-batches format
(``data_batch_1..5``, ``test_batch``, ``batches.meta``), which ``load_cifar10(DEST)`` (and
``keras.datasets.cifar``'s batch reader) read.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # published on the dataset's page
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]
_CHUNK = 1 << 16


class DatasetError(Exception):
    """A download or a dataset file failed; the message names the URL or file."""


# ------------------------------------------------------------------ loading
class _BatchUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; only the classes a batch needs may be loaded (no code)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("builtins", "bytes"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset batch")


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file → (N, 32, 32, 3) uint8 images (channels-last), (N,) int labels."""
    try:
        with open(path, "rb") as fh:
            batch = _BatchUnpickler(fh, encoding="bytes").load()
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
        raise DatasetError(f"{path}: not a CIFAR python batch ({exc})") from None
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    if len(images) != len(labels):
        raise DatasetError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def load_cifar10(data_dir: str | os.PathLike):
    """``(x_train, y_train), (x_test, y_test)`` from ``data_dir`` (or its cifar-10-batches-py)."""
    root = Path(data_dir)
    if (root / BATCHES_DIR).is_dir():
        root = root / BATCHES_DIR
    missing = [n for n in TRAIN_BATCHES + ["test_batch"] if not (root / n).is_file()]
    if missing:
        raise DatasetError(f"{root}: missing {', '.join(missing)}; run `python -m "
                           f"spotrun_trainer.datasets download --dest {data_dir}` (or `synth`)")
    parts = [read_batch(root / n) for n in TRAIN_BATCHES]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = read_batch(root / "test_batch")
    return (x_train, y_train), (x_test, y_test)


def is_synthetic(data_dir: str | os.PathLike) -> bool:
    root = Path(data_dir)
    root = root / BATCHES_DIR if (root / BATCHES_DIR).is_dir() else root
    return (root / "SYNTHETIC-README.txt").exists()


# ------------------------------------------------------------------ synthetic data
def synthesize(dest: str | os.PathLike, train: int = 5000, test: int = 1000, seed: int = 0) -> Path:
    """Write a small, clearly labelled synthetic CIFAR-10 look-alike that a model can learn.

    Each class has its own colour and stripe orientation/frequency; noise and random
    brightness make it not trivially separable, so accuracy visibly rises over epochs.
    """
    if train < 5 or test < 1:
        raise DatasetError(f"synth needs --train >= 5 and --test >= 1 (got {train}, {test})")
    rng = np.random.default_rng(seed)
    palette = rng.uniform(40, 215, size=(10, 3))
    yy, xx = np.mgrid[0:32, 0:32]

    def images(n):
        labels = rng.integers(0, 10, n)
        angle = labels * (np.pi / 10)
        freq = 0.25 + 0.08 * (labels % 4)
        phase = rng.uniform(0, 2 * np.pi, n)
        wave = np.sin(freq[:, None, None] * (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy)
                      + phase[:, None, None])
        base = palette[labels][:, None, None, :] * rng.uniform(0.7, 1.3, (n, 1, 1, 1))
        img = base + 35 * wave[..., None] + rng.normal(0, 30, (n, 32, 32, 3))
        return np.clip(img, 0, 255).astype(np.uint8), labels

    out = Path(dest) / BATCHES_DIR
    Path(dest).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".synth-", dir=dest))
    x, y = images(train)
    for i, (xs, ys) in enumerate(zip(np.array_split(x, 5), np.array_split(y, 5)), start=1):
        _write_batch(staging / f"data_batch_{i}", xs, ys, f"training batch {i} of 5 (SYNTHETIC)")
    xt, yt = images(test)
    _write_batch(staging / "test_batch", xt, yt, "testing batch 1 of 1 (SYNTHETIC)")
    meta = {b"num_cases_per_batch": int(np.ceil(train / 5)), b"num_vis": 3072,
            b"label_names": [n.encode() for n in LABEL_NAMES], b"synthetic": True,
            b"generator": f"spotrun_trainer.datasets synth --train {train} --test {test} "
                          f"--seed {seed}".encode()}
    (staging / "batches.meta").write_bytes(pickle.dumps(meta, protocol=4))
    (staging / "SYNTHETIC-README.txt").write_text(
        "SYNTHETIC DATA - not CIFAR-10.\n\n"
        f"Generated by `python -m spotrun_trainer.datasets synth --train {train} --test {test} "
        f"--seed {seed}` in the CIFAR-10 python-batches format, for tests and the demo. Each "
        "class is a colour plus a stripe orientation, with noise; the label names are "
        "CIFAR-10's but the images show nothing of the kind.\n")
    if out.exists():
        shutil.rmtree(out)
    os.rename(staging, out)
    return out


def _write_batch(path: Path, images: np.ndarray, labels: np.ndarray, label: str) -> None:
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # channels-first rows, as CIFAR
    batch = {b"batch_label": label.encode(), b"labels": [int(v) for v in labels], b"data": data,
             b"filenames": [f"synthetic_{i:06d}.png".encode() for i in range(len(labels))]}
    # Protocol 4 (not the original's 2): Keras's restricted unpickler refuses protocol 2's
    # _codecs.encode for bytes, and both readers accept 4.
    path.write_bytes(pickle.dumps(batch, protocol=4))


# ------------------------------------------------------------------ download
def download(url: str, dest: str | os.PathLike, md5: str | None = CIFAR10_MD5,
             sha256: str | None = None, retries: int = 3, progress: bool | None = None,
             timeout: float = 60) -> Path:
    """Fetch ``url`` into ``dest`` (resuming ``*.part`` with HTTP Range), verify, extract."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if (dest / BATCHES_DIR / "test_batch").is_file():
        return dest / BATCHES_DIR
    archive = dest / (Path(url.split("?")[0]).name or ARCHIVE_NAME)
    if not archive.exists():
        part = archive.with_name(archive.name + ".part")
        show = sys.stderr.isatty() if progress is None else progress
        for attempt in range(retries + 1):
            try:
                _fetch(url, part, show, timeout)
                break
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                if isinstance(exc, urllib.error.HTTPError) and exc.code < 500 and exc.code != 416:
                    raise DatasetError(f"{url}: HTTP {exc.code} {exc.reason}") from None
                if attempt == retries:
                    raise DatasetError(f"{url}: download interrupted ({exc}); "
                                       f"{part.stat().st_size if part.exists() else 0} bytes kept "
                                       f"in {part}, run again to resume") from None
                time.sleep(min(2 ** attempt, 10))  # back-off between attempts, not synchronisation
        _verify(part, url, md5, sha256)
        os.replace(part, archive)
    _extract(archive, dest)
    return dest / BATCHES_DIR


def _fetch(url: str, part: Path, show: bool, timeout: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # already complete
            return
        raise
    with response:
        if have and response.status != 206:  # server ignored Range: start over
            have = 0
        total = response.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        with open(part, "ab" if have else "wb") as fh:
            done, last = have, 0.0
            while chunk := response.read(_CHUNK):
                fh.write(chunk)
                done += len(chunk)
                if show and time.monotonic() - last > 0.2:
                    last = time.monotonic()
                    _bar(done, total)
            fh.flush()
            os.fsync(fh.fileno())
        if show:
            _bar(done, total, end="\n")
        if total is not None and done < total:
            raise OSError(f"connection closed after {done} of {total} bytes")


def _bar(done: int, total: int | None, end: str = "") -> None:
    if total:
        filled = int(30 * done / total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done / 2**20:7.1f}/"
                         f"{total / 2**20:.1f} MiB{end}")
    else:
        sys.stderr.write(f"\r{done / 2**20:7.1f} MiB{end}")
    sys.stderr.flush()


def _verify(path: Path, url: str, md5: str | None, sha256: str | None) -> None:
    digests = {"md5": hashlib.md5(usedforsecurity=False), "sha256": hashlib.sha256()}
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            for digest in digests.values():
                digest.update(chunk)
    for name, expected in (("md5", md5), ("sha256", sha256)):
        if expected and digests[name].hexdigest() != expected.lower():
            path.unlink()
            raise DatasetError(f"{url}: {name} checksum mismatch (got {digests[name].hexdigest()}, "
                               f"expected {expected}); the download was deleted")


def _extract(archive: Path, dest: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:  # Python 3.11.2 has no extraction filters: check by hand
                name = Path(member.name)
                if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                    raise DatasetError(f"{archive}: refusing unsafe member {member.name!r}")
            tar.extractall(staging, members=members)
        if not (staging / BATCHES_DIR / "test_batch").is_file():
            raise DatasetError(f"{archive}: no {BATCHES_DIR}/test_batch inside")
        if (dest / BATCHES_DIR).exists():
            shutil.rmtree(dest / BATCHES_DIR)
        os.rename(staging / BATCHES_DIR, dest / BATCHES_DIR)
    except tarfile.TarError as exc:
        raise DatasetError(f"{archive}: not a readable tar archive ({exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def make_archive(batches_dir: Path, archive: Path) -> Path:
    """Pack a cifar-10-batches-py directory like the published tar.gz (used by the tests)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(batches_dir, arcname=BATCHES_DIR)
    archive.write_bytes(buffer.getvalue())
    return archive


# ------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spotrun_trainer.datasets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="fetch CIFAR-10 (checksummed, resumable) and extract it")
    dl.add_argument("--dest", required=True, help="datasets directory, e.g. /dltraining/datasets")
    dl.add_argument("--url", default=CIFAR10_URL)
    dl.add_argument("--md5", default=None, help=f"expected md5 (default: CIFAR-10's, {CIFAR10_MD5}, "
                    "when --url is the default)")
    dl.add_argument("--sha256", default=None, help="expected sha256 (optional)")
    dl.add_argument("--retries", type=int, default=3)
    dl.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    sy = sub.add_parser("synth", help="write a small SYNTHETIC data set in the same format")
    sy.add_argument("--dest", required=True)
    sy.add_argument("--train", type=int, default=5000)
    sy.add_argument("--test", type=int, default=1000)
    sy.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            md5 = args.md5 or (CIFAR10_MD5 if args.url == CIFAR10_URL else None)
            if not md5 and not args.sha256:
                parser.error("--md5 or --sha256 is required with a custom --url")
            out = download(args.url, args.dest, md5=md5, sha256=args.sha256, retries=args.retries,
                           progress=False if args.no_progress else None)
        else:
            Path(args.dest).mkdir(parents=True, exist_ok=True)
            out = synthesize(args.dest, args.train, args.test, args.seed)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

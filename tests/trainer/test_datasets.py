"""Dataset download (real local HTTP server with Range), checksum, resume; synthetic data."""
from __future__ import annotations

import hashlib
import http.server
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from spotrun_trainer import datasets


class ArchiveServer:
    """Serves one file over real HTTP, honouring ``Range: bytes=N-``; can cut a response short."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.cut_first_response_at: int | None = None
        self.requests: list[dict] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                rng = self.headers.get("Range")
                server.requests.append({"path": self.path, "range": rng})
                start = 0
                if rng:
                    match = re.fullmatch(r"bytes=(\d+)-", rng)
                    start = int(match.group(1))
                    if start >= len(server.payload):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                else:
                    self.send_response(200)
                body = server.payload[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_first_response_at is not None:
                    cut, server.cut_first_response_at = server.cut_first_response_at, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{datasets.ARCHIVE_NAME}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory) -> bytes:
    tmp = tmp_path_factory.mktemp("archive")
    batches = datasets.synthesize(tmp, train=300, test=50, seed=3)
    return datasets.make_archive(batches, tmp / datasets.ARCHIVE_NAME).read_bytes()


def test_synth_is_labelled_and_readable(tmp_path):
    out = datasets.synthesize(tmp_path, train=120, test=30, seed=1)
    (x, y), (xt, yt) = datasets.load_cifar10(tmp_path)
    assert x.shape == (120, 32, 32, 3) and x.dtype == np.uint8 and xt.shape == (30, 32, 32, 3)
    assert set(np.unique(y)) <= set(range(10)) and len(yt) == 30
    assert datasets.is_synthetic(tmp_path)
    assert "SYNTHETIC" in (out / "SYNTHETIC-README.txt").read_text()
    # Keras's own CIFAR batch reader (restricted unpickler) reads our files too.
    from keras.src.datasets.cifar import load_batch  # the reader keras.datasets.cifar10 uses
    kx, ky = load_batch(str(out / "data_batch_1"))
    assert kx.shape[1:] == (3, 32, 32) and len(ky) == len(kx)
    # Same seed → same data; the classes differ in mean colour (learnable).
    again = datasets.synthesize(tmp_path / "again", train=120, test=30, seed=1)
    assert (again / "test_batch").read_bytes() == (out / "test_batch").read_bytes()
    means = np.array([x[y == c].mean(axis=(0, 1, 2)) for c in np.unique(y)])
    assert np.ptp(means, axis=0).max() > 40


def test_download_verifies_and_extracts(tmp_path, small_archive):
    md5 = hashlib.md5(small_archive).hexdigest()
    with ArchiveServer(small_archive) as server:
        out = datasets.download(server.url, tmp_path, md5=md5, retries=0, progress=True)
    assert out == tmp_path / datasets.BATCHES_DIR
    assert (out / "test_batch").is_file() and len(datasets.load_cifar10(tmp_path)[0][0]) == 300
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob(".extract-*"))


def test_interrupted_download_resumes_with_range(tmp_path, small_archive):
    md5 = hashlib.md5(small_archive).hexdigest()
    half = len(small_archive) // 2
    with ArchiveServer(small_archive) as server:
        server.cut_first_response_at = half
        with pytest.raises(datasets.DatasetError, match="run again to resume"):
            datasets.download(server.url, tmp_path, md5=md5, retries=0, progress=False)
        part = tmp_path / (datasets.ARCHIVE_NAME + ".part")
        assert part.stat().st_size == half
        # Second run: the CLI, as a user would type it.
        proc = subprocess.run([sys.executable, "-m", "spotrun_trainer.datasets", "download",
                               "--dest", str(tmp_path), "--url", server.url, "--md5", md5,
                               "--retries", "0"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert server.requests[0]["range"] is None
    assert server.requests[1]["range"] == f"bytes={half}-"
    assert "[" not in proc.stderr  # no progress bar when stderr is not a terminal
    assert (tmp_path / datasets.BATCHES_DIR / "test_batch").is_file()


def test_one_run_retries_and_resumes_by_itself(tmp_path, small_archive):
    md5 = hashlib.md5(small_archive).hexdigest()
    with ArchiveServer(small_archive) as server:
        server.cut_first_response_at = 1000
        datasets.download(server.url, tmp_path, md5=md5, retries=1, progress=False)
    assert [r["range"] for r in server.requests] == [None, "bytes=1000-"]


def test_bad_checksum_is_an_error_and_extracts_nothing(tmp_path, small_archive):
    with ArchiveServer(small_archive) as server:
        proc = subprocess.run([sys.executable, "-m", "spotrun_trainer.datasets", "download",
                               "--dest", str(tmp_path), "--url", server.url, "--md5", "0" * 32,
                               "--retries", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "md5 checksum mismatch" in proc.stderr and server.url in proc.stderr
    assert not (tmp_path / datasets.BATCHES_DIR).exists()
    assert not list(tmp_path.glob("*.tar.gz*"))


def test_custom_url_needs_a_checksum_and_missing_data_is_named(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spotrun_trainer.datasets", "download",
                           "--dest", str(tmp_path), "--url", "http://127.0.0.1:9/x.tar.gz"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--md5 or --sha256" in proc.stderr
    with pytest.raises(datasets.DatasetError, match="missing data_batch_1.*synth"):
        datasets.load_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py"
    bad.mkdir()
    for name in datasets.TRAIN_BATCHES + ["test_batch"]:
        (bad / name).write_bytes(b"cos\nsystem\n(S'true'\ntR.")  # a pickle that runs code
    with pytest.raises(datasets.DatasetError, match="refusing to load"):
        datasets.load_cifar10(tmp_path)


def test_synth_cli(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "spotrun_trainer.datasets", "synth", "--dest",
                           str(tmp_path), "--train", "50", "--test", "10", "--seed", "2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == tmp_path / datasets.BATCHES_DIR
    assert datasets.is_synthetic(tmp_path)

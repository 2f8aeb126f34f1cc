"""The checkpoint store: crash at every save point, corruption, disk full, formats."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from spotrun_trainer import store as store_mod
from spotrun_trainer.store import (SAVE_POINTS, CheckpointStore, CheckpointWriteError,
                                   IncompatibleCheckpoint)

PAYLOAD_1 = {"weights.bin": b"\x01" * 4096, "state.json": b'{"a": 1}'}
PAYLOAD_2 = {"weights.bin": b"\x02" * 8192, "state.json": b'{"a": 2}'}


def _save(store, step, payload, **kw):
    return store.save(payload, step=step, epoch=step // 10, step_in_epoch=step % 10,
                      fingerprint="model-a", commit="abc123", **kw)


def test_save_and_load_roundtrip_keeps_last_n(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (5, 10, 15):
        _save(store, step, PAYLOAD_1 if step != 15 else PAYLOAD_2)
    names = [c.path.name for c in store.list()]
    assert names == ["ckpt-000000000010", "ckpt-000000000015"]
    latest = store.latest_valid("model-a")
    assert latest.step == 15 and latest.epoch == 1 and latest.step_in_epoch == 5
    assert latest.manifest["commit"] == "abc123"
    assert latest.read_bytes("weights.bin") == PAYLOAD_2["weights.bin"]
    assert not [p for p in (tmp_path / "spotrun").iterdir() if p.name.startswith(".tmp-")]


def test_streamed_payload_and_same_step_resave(tmp_path):
    store = CheckpointStore(tmp_path)
    _save(store, 3, {"big.bin": lambda fh: [fh.write(b"x" * 1000) for _ in range(5)]})
    assert store.latest_valid().read_bytes("big.bin") == b"x" * 5000
    _save(store, 3, {"big.bin": b"y" * 10})  # a valid checkpoint of that step stays
    assert store.latest_valid().read_bytes("big.bin") == b"x" * 5000
    (store.list()[0].path / "big.bin").write_bytes(b"torn")  # a corrupt one is replaced
    _save(store, 3, {"big.bin": b"z" * 10})
    assert store.latest_valid().read_bytes("big.bin") == b"z" * 10
    assert len(store.list()) == 1
    assert not [p for p in (tmp_path / "spotrun").iterdir() if p.name.startswith(".tmp-")]


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from spotrun_trainer.store import CheckpointStore
    directory, point = sys.argv[1], sys.argv[2]
    def hook(name):
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)
    store = CheckpointStore(directory, keep=2, fault_hook=hook)
    store.save({"weights.bin": b"\\x02" * 8192, "state.json": b'{"a": 2}'},
               step=20, epoch=2, step_in_epoch=0, fingerprint="model-a")
    print("survived")
""")


@pytest.mark.parametrize("point", SAVE_POINTS)
def test_sigkill_at_every_save_point_leaves_a_complete_checkpoint(tmp_path, point):
    store = CheckpointStore(tmp_path, keep=2)
    _save(store, 5, PAYLOAD_1)
    _save(store, 10, PAYLOAD_1)
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(tmp_path), point],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    latest = store.latest_valid("model-a")
    assert latest is not None
    assert latest.step in (10, 20)
    # The new checkpoint appears exactly when the rename happened, and never torn.
    renamed = SAVE_POINTS.index(point) >= SAVE_POINTS.index("after_rename")
    assert latest.step == (20 if renamed else 10)
    for checkpoint in store.list():  # everything in the ckpt- namespace verifies
        store.verify(checkpoint.path)
    # The next save cleans the leftovers and works.
    _save(store, 30, PAYLOAD_2)
    assert not [p for p in (tmp_path / "spotrun").iterdir() if p.name.startswith(".tmp-")]
    assert [c.step for c in store.list()][-1] == 30


def test_flipped_byte_is_detected_and_previous_used(tmp_path, capfd):
    store = CheckpointStore(tmp_path)
    _save(store, 1, PAYLOAD_1)
    newest = _save(store, 2, PAYLOAD_2)
    target = newest.path / "weights.bin"
    data = bytearray(target.read_bytes())
    data[100] ^= 0x01
    target.write_bytes(bytes(data))
    latest = store.latest_valid("model-a")
    assert latest.step == 1
    out = capfd.readouterr()
    assert "checkpoint_corrupt" in out.out + out.err
    assert "sha256 mismatch" in out.out + out.err


def test_truncated_manifest_is_skipped(tmp_path):
    store = CheckpointStore(tmp_path)
    _save(store, 1, PAYLOAD_1)
    newest = _save(store, 2, PAYLOAD_2)
    (newest.path / "manifest.json").write_text('{"format": 1, "st')
    assert store.latest_valid().step == 1


def test_all_corrupt_returns_none(tmp_path):
    store = CheckpointStore(tmp_path)
    only = _save(store, 1, PAYLOAD_1)
    (only.path / "state.json").write_bytes(b"{}")
    assert store.latest_valid() is None
    assert CheckpointStore(tmp_path / "empty").latest_valid() is None


def test_incompatible_model_and_format_raise_naming_the_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path)
    saved = _save(store, 1, PAYLOAD_1)
    with pytest.raises(IncompatibleCheckpoint, match="ckpt-000000000001.*model-a"):
        store.latest_valid("model-b")
    manifest = json.loads((saved.path / "manifest.json").read_text())
    manifest["format"] = 99
    (saved.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IncompatibleCheckpoint, match="ckpt-000000000001.*format 99"):
        store.latest_valid()


def test_injected_enospc_keeps_previous_and_says_disk_full(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    _save(store, 1, PAYLOAD_1)
    real_write = store_mod._HashingWriter.write

    def full_disk(self, data):
        if self.size > 1000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(store_mod._HashingWriter, "write", full_disk)
    with pytest.raises(CheckpointWriteError, match="disk full.*ckpt-000000000001.*intact"):
        _save(store, 2, PAYLOAD_2)
    monkeypatch.undo()
    assert store.latest_valid().step == 1
    assert not [p for p in (tmp_path / "spotrun").iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_real_disk_full_on_tmpfs_keeps_previous(tiny_tmpfs):
    store = CheckpointStore(tiny_tmpfs)
    _save(store, 1, {"weights.bin": b"\x01" * 20_000})
    with pytest.raises(CheckpointWriteError, match="disk full"):
        _save(store, 2, {"weights.bin": os.urandom(60_000)})
    latest = store.latest_valid("model-a")
    assert latest.step == 1
    assert latest.read_bytes("weights.bin") == b"\x01" * 20_000


def test_store_imports_without_numpy_or_keras():
    code = ("import sys; import spotrun_trainer.store; "
            "bad = [m for m in ('numpy', 'keras', 'tensorflow', 'jax') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bad_file_name_rejected(tmp_path):
    with pytest.raises(ValueError, match="manifest.json"):
        _save(CheckpointStore(tmp_path), 1, {"manifest.json": b"x"})
    assert not (Path(tmp_path) / "spotrun").exists() or not CheckpointStore(tmp_path).list()


def test_the_progress_record_is_what_the_agent_reads(tmp_path):
    """The trainer library writes the progress file; the agent's reader takes it only from
    the trainer it supervises (a record older than that trainer's start is an earlier one's)."""
    import time

    from spotrun.progress import PROGRESS_FILE, read_progress, training_status

    before = time.time()
    store_mod.write_progress(tmp_path / PROGRESS_FILE, epoch=2, epochs=5, step=7,
                             steps_per_epoch=10, global_step=27, last_checkpoint_time=before)
    progress = read_progress(tmp_path, trainer_started_wall=before)
    assert progress["global_step"] == 27 and progress["step"] == 7 and progress["epochs"] == 5
    assert training_status(progress).startswith("training epoch 2/5, step 7")
    assert read_progress(tmp_path, trainer_started_wall=time.time() + 1) == {}
    assert [p.name for p in tmp_path.iterdir()] == [PROGRESS_FILE]  # no temporary left

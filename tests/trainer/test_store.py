"""The checkpoint store: crash at every save point, corruption, disk full, formats."""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from spotrun_trainer import store as store_mod
from spotrun_trainer.store import (SAVE_POINTS, CheckpointStore, CheckpointWriteError,
                                   CorruptCheckpoint, IncompatibleCheckpoint)

PAYLOAD_1 = {"weights.bin": b"\x01" * 4096, "state.json": b'{"a": 1}'}
PAYLOAD_2 = {"weights.bin": b"\x02" * 8192, "state.json": b'{"a": 2}'}


def _events(caplog, name):
    return [dict(r.spotrun_fields) for r in caplog.records
            if r.name == "spotrun_trainer.store" and r.getMessage() == name]


def _save(store, step, payload=PAYLOAD_1, **kw):
    return store.save(payload, step=step, epoch=step // 10, step_in_epoch=step % 10,
                      fingerprint="model-a", commit="abc123", **kw)


def test_save_and_load_roundtrip_keeps_last_n(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (5, 10, 15):
        _save(store, step, PAYLOAD_1 if step != 15 else PAYLOAD_2)
    # Named by save sequence (the third save is ckpt-…3), the step in the manifest.
    assert [(c.path.name, c.sequence, c.step) for c in store.list()] == [
        ("ckpt-000000000002", 2, 10), ("ckpt-000000000003", 3, 15)]
    assert [c.manifest["sequence"] for c in store.list()] == [2, 3]
    latest = store.latest_valid("model-a")
    assert latest.step == 15 and latest.epoch == 1 and latest.step_in_epoch == 5
    assert latest.manifest["commit"] == "abc123"
    assert latest.read_bytes("weights.bin") == PAYLOAD_2["weights.bin"]
    assert not [p for p in (tmp_path / "spotrun").iterdir() if p.name.startswith(".tmp-")]


def test_streamed_payload_and_same_step_saved_again(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    _save(store, 3, {"big.bin": lambda fh: [fh.write(b"x" * 1000) for _ in range(5)]})
    assert store.latest_valid().read_bytes("big.bin") == b"x" * 5000
    # The same step again is a new save (a rollback reaches a step again with other state):
    # the newer one wins; a name is never reused, so nothing is renamed over anything.
    again = _save(store, 3, {"big.bin": b"y" * 10})
    assert store.latest_valid().read_bytes("big.bin") == b"y" * 10
    assert store.list() == [again] and again.sequence == 2
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


def test_flipped_byte_is_detected_and_previous_used(tmp_path, caplog):
    store = CheckpointStore(tmp_path)
    _save(store, 1, PAYLOAD_1)
    newest = _save(store, 2, PAYLOAD_2)
    target = newest.path / "weights.bin"
    data = bytearray(target.read_bytes())
    data[100] ^= 0x01
    target.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="spotrun_trainer"):
        latest = store.latest_valid("model-a")
    assert latest.step == 1
    [event] = _events(caplog, "checkpoint_corrupt")
    assert "sha256 mismatch" in event["reason"] and event["path"] == str(newest.path)
    assert newest.path.is_dir()  # only looked at: the agent's readers never move anything


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


# ------------------------------------------------ pruning by save order (issue 16, item 2)
def _corrupt(checkpoint):
    """Flip one byte in the middle of its weights: the size stays, the sha256 does not."""
    target = checkpoint.path / "weights.bin"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x5A
    target.write_bytes(bytes(data))


def test_corrupt_newest_with_keep_1_later_saves_each_survive_until_the_next(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    _corrupt(_save(store, 20))
    assert store.latest_valid() is None  # a restart begins at step 0
    previous = None
    for step in (4, 8, 12):
        saved = _save(store, step)
        assert saved.path.is_dir() and store.verify(saved.path).step == step
        assert store.latest_valid("model-a").step == step
        assert store.list() == [saved]  # the older save (and the corrupt one) pruned
        assert previous is None or not previous.path.exists()
        previous = saved
    assert store.latest_valid().step == 12


@pytest.mark.parametrize("keep", [2, 3])
def test_restart_from_an_older_checkpoint_keeps_the_newest_saves(tmp_path, keep):
    store = CheckpointStore(tmp_path, keep=keep)
    for step in (100, 200, 300, 400):
        _save(store, step)
    for newer in store.list()[1:]:  # every retained one but the oldest turns out corrupt
        _corrupt(newer)
    start = store.latest_valid().step
    assert start == 400 - 100 * (keep - 1)
    saves = []
    for step in range(start + 1, start + keep + 2):
        saves.append(_save(store, step))
        assert store.list()[-len(saves[-keep:]):] == saves[-keep:]  # the newest `keep` saves
        assert store.latest_valid().step == step
    assert store.list() == saves[-keep:]


def test_the_checkpoint_just_written_is_never_pruned(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    _save(store, 500)
    _save(store, 600)
    fresh_run = _save(store, 5)  # a lower step than anything present (a fresh run, say)
    assert store.list() == [fresh_run]
    assert store.latest_valid().step == 5 and store.verify(fresh_run.path).step == 5


def test_a_corrupt_checkpoint_is_quarantined_not_counted_not_pruned(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep=2)
    _save(store, 1)
    bad = _save(store, 2)
    _corrupt(bad)
    assert store.latest_valid().step == 1 and bad.path.is_dir()  # looking moves nothing
    with caplog.at_level(logging.INFO, logger="spotrun_trainer"):
        assert store.latest_valid("model-a", quarantine=True).step == 1
    aside = tmp_path / "spotrun" / "corrupt" / bad.path.name
    [event] = _events(caplog, "checkpoint_quarantined")
    assert event["path"] == str(bad.path) and event["moved_to"] == str(aside)
    assert "sha256 mismatch" in event["reason"]
    assert not bad.path.exists() and (aside / "weights.bin").is_file()
    assert [c.step for c in store.list()] == [1]
    third = _save(store, 3)
    assert [c.step for c in store.list()] == [1, 3]  # the quarantined one took no place
    assert third.sequence > bad.sequence  # a number is never reused
    for step in (4, 5, 6):
        _save(store, step)
    assert [c.step for c in store.list()] == [5, 6]
    assert (aside / "manifest.json").is_file()  # pruning never touches it
    with pytest.raises(CorruptCheckpoint, match="sha256"):
        store.verify(aside)
    assert CheckpointStore(tmp_path).latest_valid(quarantine=True).step == 6


def _legacy(store, step):
    """A checkpoint as the store wrote them before save sequences: ``ckpt-<step>``, no
    ``sequence`` in the manifest."""
    saved = _save(store, step)
    manifest = json.loads((saved.path / "manifest.json").read_text())
    manifest.pop("sequence", None)
    (saved.path / "manifest.json").write_text(json.dumps(manifest))
    legacy = saved.path.with_name(f"ckpt-{step:012d}")
    saved.path.rename(legacy)
    return legacy


def test_step_named_checkpoints_are_read_and_new_saves_come_after_them(tmp_path):
    store = CheckpointStore(tmp_path / "a", keep=3)
    for step in (40, 80):
        _legacy(store, step)
    assert [(c.sequence, c.step) for c in store.list()] == [(40, 40), (80, 80)]
    assert store.latest_valid("model-a").step == 80
    new = _save(store, 84)
    assert new.path.name == "ckpt-000000000081" and new.manifest["sequence"] == 81
    assert [c.step for c in store.list()] == [40, 80, 84]
    _save(store, 88)
    assert [c.step for c in store.list()] == [80, 84, 88]
    # The newest step-named one corrupt, keep=1: the restart's saves come after it.
    writer = CheckpointStore(tmp_path / "b", keep=3)
    _legacy(writer, 40)
    _corrupt(writer.verify(_legacy(writer, 80)))
    store = CheckpointStore(tmp_path / "b", keep=1)
    assert store.latest_valid().step == 40
    resumed = _save(store, 44)
    assert store.list() == [resumed] and store.latest_valid().step == 44


class _Crash(Exception):
    pass


@pytest.mark.parametrize("point", SAVE_POINTS)
def test_a_crash_at_each_save_point_leaves_a_valid_newest(tmp_path, point):
    """The newest checkpoint corrupt, keep=1, and the writer dies (an exception) at ``point``
    of the save of step 8: the newest valid is step 4's before the rename, step 8's after."""
    seed = CheckpointStore(tmp_path, keep=2)
    _save(seed, 4)
    _corrupt(_save(seed, 20))

    def crash(name):
        if name == point:
            raise _Crash(name)

    with pytest.raises(_Crash):
        _save(CheckpointStore(tmp_path, keep=1, fault_hook=crash), 8)
    store = CheckpointStore(tmp_path, keep=1)
    renamed = SAVE_POINTS.index(point) >= SAVE_POINTS.index("after_rename")
    assert store.latest_valid("model-a").step == (8 if renamed else 4)
    after = _save(store, 12)
    assert store.list() == [after] and store.latest_valid().step == 12
    assert not [p for p in (tmp_path / "spotrun").iterdir() if p.name.startswith(".tmp-")]


def test_a_taken_name_is_never_renamed_over(tmp_path):
    def squat(name):  # another writer took the name between numbering and rename
        if name == "before_rename":
            (tmp_path / "spotrun" / "ckpt-000000000002").mkdir()

    store = CheckpointStore(tmp_path, keep=1)
    _save(store, 1)
    with pytest.raises(CheckpointWriteError, match="ckpt-000000000002.*exists"):
        _save(CheckpointStore(tmp_path, keep=1, fault_hook=squat), 2)
    assert not any((tmp_path / "spotrun" / "ckpt-000000000002").iterdir())
    assert store.latest_valid().step == 1


def test_a_malformed_manifest_is_corrupt_naming_the_field(tmp_path):
    store = CheckpointStore(tmp_path)
    _save(store, 1)
    bad = _save(store, 2)
    manifest = json.loads((bad.path / "manifest.json").read_text())
    manifest["files"]["weights.bin"] = {"size": 4096}
    (bad.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpoint, match="manifest.json.*weights.bin.*sha256"):
        store.verify(bad.path)
    assert store.latest_valid().step == 1

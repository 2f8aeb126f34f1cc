"""The rehearsal's evidence for a script that knows nothing of spotrun, without a cloud: its
own checkpoint files read from a real ext4 image (mkfs.ext4 -d, read by debugfs: names,
times, owner, whether each opens whole), grouped and numbered as a user names them, and the
verdict on where each replacement resumed — which fails when a replacement started over."""
import io
import os
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from spotrun.harness.rehearsal_report import InterruptionRecord, format_report, verdict
from spotrun.harness.rehearsal_script_report import script_checkpoints, script_figures
from spotrun.harness.rehearsal_volume import list_script_files, opens_whole


def _keras_file() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("config.json", '{"class_name": "Sequential"}')
        archive.writestr("model.weights.h5", b"\0" * 64)
    return buffer.getvalue()


def _tree(root: Path, files: dict[str, tuple[bytes, float]]) -> Path:
    for rel, (data, mtime) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (mtime, mtime))
    return root


def _ext4(tmp_path: Path, tree: Path) -> Path:
    image = tmp_path / "volume.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "16M"], check=True)
    return image


WHOLE = _keras_file()
FILES = {
    # Whole seconds: mkfs.ext4 -d copies no sub-second times (a mounted ext4 keeps them).
    "checkpoints/cifar10/cifar10_model.001.keras": (WHOLE, 1000.0),
    "checkpoints/cifar10/cifar10_model.002.keras": (WHOLE, 1002.0),
    "checkpoints/cifar10/cifar10_model.003.keras": (WHOLE[:40], 1005.0),  # torn mid-save
    "checkpoints/tf/ckpt-7.index": (b"index", 1003.0),
    "checkpoints/tf/ckpt-7.data-00000-of-00001": (b"data", 1004.0),
    "checkpoints/spotrun/ckpt-000000000001/manifest.json": (b"{}", 999.0),  # spotrun's own
    "checkpoints/.spotrun-progress.json": (b"{}", 1005.0),
    "datasets/cifar-10.tar": (b"x", 1.0),  # not under checkpoints/
}


@pytest.mark.parametrize("as_image", [True, False], ids=["ext4-image", "directory"])
def test_a_scripts_files_are_listed_with_times_owner_and_wholeness(tmp_path, as_image):
    tree = _tree(tmp_path / "tree", FILES)
    found = list_script_files(_ext4(tmp_path, tree) if as_image else tree)
    assert [f["path"] for f in found] == [
        "checkpoints/cifar10/cifar10_model.001.keras", "checkpoints/cifar10/cifar10_model.002.keras",
        "checkpoints/tf/ckpt-7.index", "checkpoints/tf/ckpt-7.data-00000-of-00001",
        "checkpoints/cifar10/cifar10_model.003.keras"]
    assert [f["mtime"] for f in found] == [1000.0, 1002.0, 1003.0, 1004.0, 1005.0]
    assert {f["uid"] for f in found} == {os.getuid()}
    assert [f["intact"] for f in found] == [True, True, None, None, False]
    assert found[0]["size"] == len(WHOLE)


def test_whole_and_torn_model_files_are_told_apart():
    assert opens_whole("m.keras", WHOLE) is True
    assert opens_whole("m.keras", WHOLE[:-10]) is False
    assert opens_whole("m.keras", b"") is False
    assert opens_whole("m.h5", b"not hdf5") is False
    assert opens_whole("m.pt", b"anything") is None


def test_checkpoints_are_grouped_numbered_and_torn_ones_marked():
    files = [{"path": "checkpoints/tf/checkpoint", "mtime": 5.0},
             {"path": "checkpoints/tf/ckpt-7.index", "mtime": 3.0},
             {"path": "checkpoints/tf/ckpt-7.data-00000-of-00001", "mtime": 3.5},
             {"path": "checkpoints/m.010.keras", "mtime": 4.0, "intact": False}]
    found = script_checkpoints(files)
    # TensorFlow's unnumbered `checkpoint` index is no checkpoint where numbered ones exist.
    assert [(c["name"], c["number"], c["mtime"], c["torn"]) for c in found] == [
        ("checkpoints/tf/ckpt-7", 7, 3.5, False), ("checkpoints/m.010", 10, 4.0, True)]


def _epochs(numbers_and_times, torn=()):
    return [{"path": f"checkpoints/m.{n:03d}.keras", "mtime": t, "intact": n not in torn}
            for n, t in numbers_and_times]


def _rehearsal(after_drain, final):
    record = InterruptionRecord("i-old", "us-east-1a", 0, notice_wall=110.0)
    record.script_files_after_drain = after_drain
    boots = [{"instance_id": "i-old", "training_wall": 100.0,
              "trainer_exit": {"returncode": -15, "outcome": "preempted", "wall": 110.5}},
             {"instance_id": "i-new", "training_wall": 130.0, "trainer_exit": None}]
    rehearsal = SimpleNamespace(interruptions=[record], final_script_files=final,
                                missed=[], plan=SimpleNamespace(interrupt_at_steps=[]))
    return rehearsal, boots


def _judged(rehearsal, boots):
    rows = script_figures(rehearsal, boots)
    report = {"script_interruptions": rows, "fleet_state": "cancelled", "completed": "yes",
              "volumes_left": [{"id": "vol-1"}], "steps_trained": None, "interruptions": []}
    return rows, verdict(rehearsal, report)


def test_a_resume_from_the_newest_file_passes_with_the_time_lost():
    before = _epochs([(1, 102.0), (2, 104.0), (3, 106.0), (4, 108.0)])
    rows, failures = _judged(*_rehearsal(before, before + _epochs([(5, 133.0), (6, 135.0)])))
    (row,) = rows
    assert failures == []
    assert row["newest_checkpoint_at_stop"] == "checkpoints/m.004" and row["resumed_after_number"] == 4
    assert row["resumed_from_newest"] is True and row["numbers_redone"] == 0
    assert row["training_lost_s"] == 2.5 and row["trainer_ran_s"] == 10.5


def test_a_replacement_that_starts_over_fails_naming_both_files():
    before = _epochs([(1, 102.0), (2, 104.0), (3, 106.0)])
    # The replacement rewrote epoch 1 (started over): its files carry the new times.
    final = _epochs([(1, 133.0), (2, 135.0), (3, 137.0), (4, 139.0)])
    rows, failures = _judged(*_rehearsal(before, final))
    assert rows[0]["resumed_from_newest"] is False and rows[0]["numbers_redone"] == 3
    (failure,) = failures
    assert "checkpoints/m.001" in failure and "checkpoints/m.003" in failure and "3 redone" in failure


def test_a_file_torn_by_the_stop_is_no_resume_point():
    before = _epochs([(1, 102.0), (2, 104.0), (3, 110.4)], torn={3})
    final = _epochs([(1, 102.0), (2, 104.0), (3, 134.0), (4, 136.0)])
    rows, failures = _judged(*_rehearsal(before, final))
    (row,) = rows
    assert row["torn_at_stop"] == ["checkpoints/m.003"]
    assert row["newest_checkpoint_at_stop"] == "checkpoints/m.002" and row["resumed_from_newest"] is True
    assert failures == []


def _plain_report(**changes):
    report = {"job": "j", "timeline": [], "instances": [], "interruptions": [],
              "missed_interruptions": [], "volumes_left": [{"id": "vol-1", "az": "us-east-1a"}],
              "snapshots_left": [], "fleet_state": "cancelled", "completed": "yes",
              "steps_trained": 10, "final_metrics": {}, "failures": []}
    report.update(changes)
    return report


def test_the_verdict_line_says_what_the_run_showed():
    assert format_report(_plain_report()).endswith(
        "OK: finished without an interruption (none was asked for or needed).")
    with_one = _plain_report(interruptions=[{
        "instance_id": "i-1", "notice_at_step": 3, "trainer_reached_step": 4, "checkpoint": "c",
        "checkpoint_step": 4, "checkpoint_epoch": 0, "checkpoint_step_in_epoch": 4,
        "checkpoint_optimizer_iterations": 4, "volume": "vol-1", "notice_to_durable_checkpoint_s": 0.1,
        "replacement": "i-2", "resumed_from_step": 4, "resumed_from_source": "trainer",
        "replacement_trained_steps": 6, "steps_redone": 0, "az": "us-east-1a"}])
    assert format_report(with_one).endswith("OK: interrupted mid-training, resumed on the replacement, finished.")
    failed = format_report(_plain_report(failures=["the fleet was not cancelled"]))
    assert "FAILED" in failed and "OK:" not in failed

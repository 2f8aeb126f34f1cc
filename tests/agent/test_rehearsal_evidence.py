"""The rehearsal's resume evidence and verdict, without a cloud: volume images read without
the agent (a real ext4 image made by mkfs.ext4, read by debugfs), the resume figures computed
from them and the replacement trainer's own log, the verdict that fails `make demo` when no
resume happened, and a rerun in the same directory."""
import io
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from spotrun.harness.rehearsal import commit_repository
from spotrun.harness.rehearsal_cli import RUN_STATE, clear_previous_run
from spotrun.harness.rehearsal_report import (InterruptionRecord, MissedInterruption, _resume_figures,
                                      verdict)
from spotrun.harness.rehearsal_volume import VolumeReadError, optimizer_iterations, read_volume_state


def _weights_h5(iterations: int) -> bytes:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        h5["optimizer/vars/0"] = np.int64(iterations)
        h5["optimizer/vars/1"] = np.float32(0.003)
    return buffer.getvalue()


def _volume_tree(root: Path, steps: list[tuple[int, int]], progress: int, completion: int | None):
    """checkpoints/spotrun/ckpt-<seq> with manifests (and weights) as the trainer library lays
    them out, its progress record and, when finished, its completion record."""
    store = root / "checkpoints" / "spotrun"
    for sequence, step in steps:
        ckpt = store / f"ckpt-{sequence:012d}"
        ckpt.mkdir(parents=True)
        (ckpt / "manifest.json").write_text(json.dumps(
            {"format": 1, "sequence": sequence, "step": step, "epoch": step // 64,
             "step_in_epoch": step % 64, "time": 1000.0 + sequence, "files": {}}))
        (ckpt / "model.weights.h5").write_bytes(_weights_h5(step))
    (store / ".tmp-ckpt-000000000099-1-abc").mkdir()  # a save in progress is not a checkpoint
    (root / "checkpoints" / ".spotrun-progress.json").write_text(json.dumps({"global_step": progress}))
    if completion is not None:
        (root / "checkpoints" / ".spotrun-trainer-completed.json").write_text(
            json.dumps({"global_step": completion, "checkpoint": "ckpt-000000000003"}))


def test_an_ext4_image_is_read_without_mounting_it(tmp_path):
    tree = tmp_path / "tree"
    _volume_tree(tree, [(1, 55), (2, 120), (3, 192)], progress=192, completion=192)
    image = tmp_path / "vol.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "16M"], check=True)
    state = read_volume_state("vol-1", image)
    assert [(c.name, c.step) for c in state.checkpoints] == [
        ("ckpt-000000000001", 55), ("ckpt-000000000002", 120), ("ckpt-000000000003", 192)]
    assert state.newest.iterations == 192  # from the saved optimizer state, not the manifest
    assert state.checkpoints[0].iterations is None  # only the newest one's weights are read
    assert state.progress_step == 192 and state.completion["global_step"] == 192
    # A directory-backed volume (the local cloud without loop devices) reads the same.
    assert read_volume_state("vol-1", tree).as_dict() == state.as_dict()


def test_an_unreadable_image_is_an_error_naming_it(tmp_path):
    with pytest.raises(VolumeReadError, match="nothing.img"):
        read_volume_state("vol-1", tmp_path / "nothing.img")
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * 65536)
    with pytest.raises(VolumeReadError, match="junk.img"):
        read_volume_state("vol-1", junk)


def test_optimizer_iterations_needs_the_int_scalar():
    assert optimizer_iterations(_weights_h5(7)) == 7
    assert optimizer_iterations(b"not hdf5") is None


def _log(path: Path, *events: dict) -> str:
    path.write_text("".join(f"<6>{json.dumps(e)}\n" for e in events))
    return str(path)


def _state(volume_id: str, steps: list[int], progress: int | None, completion: int | None = None):
    return {"volume_id": volume_id, "progress_step": progress,
            "completion": None if completion is None else {"global_step": completion},
            "checkpoints": [{"name": f"ckpt-{i + 1:012d}", "sequence": i + 1, "step": s,
                             "epoch": s // 64, "step_in_epoch": s % 64, "time": 100.0 + s,
                             "iterations": s} for i, s in enumerate(steps)]}


def _figures(tmp_path, *, notice: int, drained: list[int], reached: int, resumed: int | None,
             final: int, replayed: int = 0, missed=(), replacement_trained: bool = True):
    """A one-interruption rehearsal as the report sees it; returns (rows, steps, failures)."""
    events = [] if resumed is None else [{"event": "training_resumed", "global_step": resumed}]
    if replayed:
        events.append({"event": "training_resumed_at_epoch_start", "replayed_steps": replayed})
    boots = [{"instance_id": "i-1", "trainer_log": _log(tmp_path / "t1.log"), "started_training": True},
             {"instance_id": "i-2", "trainer_log": _log(tmp_path / "t2.log", *events),
              "started_training": replacement_trained}]
    record = InterruptionRecord("i-1", "us-east-1a", notice, 100.0,
                                volume_after_drain=_state("vol-1", drained, reached))
    rehearsal = SimpleNamespace(interruptions=[record], missed=list(missed),
                                plan=SimpleNamespace(interrupt_at_steps=[40]))
    final_state = _state("vol-2", drained[-1:] + [final], final, completion=final)
    rows, steps = _resume_figures(rehearsal, boots, final_state)
    report = {"interruptions": rows, "steps_trained": steps, "fleet_state": "cancelled",
              "completed": "yes", "volumes_left": [{"id": "vol-2"}], "final_volume_read_error": None}
    return rows, steps, verdict(rehearsal, report)


def test_a_real_resume_passes_with_its_figures(tmp_path):
    (row,), steps, failures = _figures(tmp_path, notice=50, drained=[55], reached=55, resumed=55,
                                       final=192)
    assert failures == []
    assert (row["checkpoint_step"], row["resumed_from_step"], row["steps_redone"],
            row["replacement_trained_steps"], steps) == (55, 55, 0, 137, 192)
    assert row["resumed_from_source"] == "trainer"


def test_a_notice_after_the_last_step_fails(tmp_path):
    # The defect: the notice meant for step 40 landed when the trainer had reached 192 of 192.
    _, _, failures = _figures(tmp_path, notice=125, drained=[192], reached=192, resumed=192, final=192)
    assert any("did not land mid-training" in f for f in failures), failures
    assert any("trained 0 steps" in f for f in failures), failures


def test_redoing_more_than_one_step_fails(tmp_path):
    # The trainer reached 55 (its last progress) but the replacement restored the epoch start.
    _, _, failures = _figures(tmp_path, notice=50, drained=[55], reached=55, resumed=55,
                              replayed=55 % 64, final=192)
    assert any("55 steps redone" in f for f in failures), failures


def test_without_the_trainers_own_line_the_resume_point_is_the_volumes_newest_checkpoint(tmp_path):
    # A trainer that is not spotrun_trainer (the soak's counting trainer) logs no
    # training_resumed: it restores the newest checkpoint, which the volume image shows.
    (row,), _, failures = _figures(tmp_path, notice=50, drained=[55], reached=55, resumed=None,
                                   final=192)
    assert failures == []
    assert row["resumed_from_source"] == "newest checkpoint on the volume"


def test_a_replacement_that_never_trained_fails(tmp_path):
    _, _, failures = _figures(tmp_path, notice=50, drained=[55], reached=55, resumed=None, final=55,
                              replacement_trained=False)
    assert any("trained 0 steps" in f for f in failures), failures
    assert any("no resume point" in f for f in failures), failures


def test_a_notice_never_sent_fails_naming_the_step(tmp_path):
    missed = [MissedInterruption(100000, "training finished before the trainer reached it")]
    _, _, failures = _figures(tmp_path, notice=50, drained=[55], reached=55, resumed=55, final=192,
                              missed=missed)
    assert failures and "no interruption landed at step 100000" in failures[0]


def test_a_rerun_reuses_the_repository_and_clears_only_the_runs_state(tmp_path):
    out = tmp_path / "demo-out"
    url = commit_repository(out / "repo", {"train.py": "print(1)\n"}, "code")
    # The defect: the second commit of the same files failed with CalledProcessError.
    assert commit_repository(out / "repo", {"train.py": "print(1)\n"}, "code") == url
    commit_repository(out / "repo", {"train.py": "print(2)\n"}, "code")
    log = subprocess.run(["git", "-C", str(out / "repo"), "log", "--format=%s"], capture_output=True,
                         text=True, check=True).stdout.split()
    assert log == ["code", "code"]
    for name in ("report.json", "report.txt", "rehearsal.log"):
        (out / name).write_text("old")
    (out / "cloud" / "ebs").mkdir(parents=True)
    (out / "with-callback" / "cloud").mkdir(parents=True)  # --compare-with-callback's run
    (out / "mine.txt").write_text("keep")
    assert sorted(clear_previous_run(out)) == sorted(RUN_STATE)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert clear_previous_run(out) == []


def test_a_relative_output_directory_still_gives_the_agent_a_url_it_can_clone(tmp_path, monkeypatch):
    # The defect: `spotrun soak --out replay` handed the agent file://replay/repo, which git
    # reads as host "replay", path /repo; every checkout failed and the job timed out.
    monkeypatch.chdir(tmp_path)
    url = commit_repository(Path("relative-out") / "repo", {"train.py": "print(1)\n"}, "code")
    assert url == f"file://{tmp_path.resolve()}/relative-out/repo"
    clone = subprocess.run(["git", "clone", "-q", url, str(tmp_path / "clone")], capture_output=True,
                           text=True, cwd="/")
    assert clone.returncode == 0, clone.stderr
    assert (tmp_path / "clone" / "train.py").read_text() == "print(1)\n"

"""Keras trainers under the real agent on the local spot cloud (TensorFlow backend, CPU, tiny model):
spotrun's reference trainer resumes mid-epoch to the same result as an uninterrupted run, and the
seed's own script — which knows nothing of the protocol — still runs, resumes from its own
per-epoch files, completes, and only then is the fleet cancelled."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spotrun.rehearsal import DEMO_TRAIN_PY, Rehearsal, RehearsalPlan, commit_repository

pytestmark = [pytest.mark.loopdev, pytest.mark.slow]
PYTHON = sys.executable
ROOT = Path(__file__).resolve().parents[2]
SMALL = {"DEMO_TRAIN": "1024", "DEMO_TEST": "256", "DEMO_EPOCHS": "6", "DEMO_BATCH": "32"}

SEED_WRAPPER = '''\
import os, subprocess, sys
from pathlib import Path
data = Path(os.environ["SPOTRUN_DATA_DIR"])
if not (data / "cifar-10-batches-py" / "test_batch").exists():
    subprocess.run([sys.executable, "-m", "spotrun_trainer.datasets", "synth", "--dest", str(data),
                    "--train", "1024", "--test", "256", "--seed", "7"], check=True)
os.execv(sys.executable, [sys.executable, "seed_train.py", "--model", "tiny", "--epochs", "3"])
'''


def _repo(path: Path) -> str:
    return commit_repository(path, {
        "train.py": DEMO_TRAIN_PY, "seed_train.py": ROOT / "examples" / "seed_style" / "train.py",
        "seed_wrapper.py": SEED_WRAPPER}, "training code")


def test_reference_trainer_resumes_mid_epoch_to_the_uninterrupted_result(shared_tmp):
    repo = _repo(shared_tmp / "repo")
    # 1024 samples / 32 = 32 steps an epoch, 192 in all. The tiny model runs ~100 steps/s here,
    # so where the drain lands (mid-epoch or on a boundary) is up to timing; the library's own
    # tests pin SIGTERM to exact mid-epoch steps.
    report = Rehearsal(RehearsalPlan(out=shared_tmp / "run", repository=repo, trainer_env=SMALL,
                                     interrupt_at_steps=[20], notice_s=15, timeout_s=400)).run()
    assert report["fleet_state"] == "cancelled" and report["completed"]
    (record,) = report["interruptions"]
    assert 20 <= record["checkpoint_step"] < 192, "the notice should land during training"
    assert record["steps_redone"] <= 1
    interrupted = report["final_metrics"]
    assert interrupted["global_step"] == 192

    # The same training, uninterrupted, in one process.
    data, ckpt = shared_tmp / "data", shared_tmp / "ckpt"
    subprocess.run([PYTHON, "-m", "spotrun_trainer.datasets", "synth", "--dest", str(data),
                    "--train", "1024", "--test", "256", "--seed", "7"], check=True)
    subprocess.run([PYTHON, "-m", "spotrun_trainer.resnet_cifar", "--model", "tiny", "--epochs", "6",
                    "--batch-size", "32", "--data-dir", str(data), "--checkpoint-dir", str(ckpt),
                    "--verbose", "0"], check=True, timeout=300)
    straight = json.loads((ckpt / "final_metrics.json").read_text())
    # Same seed, same data order, deterministic CPU kernels: the results agree to float32 noise.
    assert interrupted["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-4, abs=1e-5)
    assert interrupted["test_accuracy"] == pytest.approx(straight["test_accuracy"], abs=1 / 256)


def test_the_seeds_own_script_runs_resumes_from_its_files_and_completes(shared_tmp):
    repo = _repo(shared_tmp / "repo")
    r = Rehearsal(RehearsalPlan(out=shared_tmp / "run", repository=repo,
                                command=[PYTHON, "seed_wrapper.py"], interrupt_at_steps=[],
                                notice_s=15, timeout_s=400))
    r.start()
    try:
        deadline = time.monotonic() + 300
        first = r._await("the first instance", lambda: r.boots and r.boots[0]["instance_id"], deadline)
        inst = r.cloud.instance(first)
        epoch_one = inst.mount_point / "checkpoints" / "cifar10" / "cifar10_model.001.keras"
        r._await("the seed's first epoch file", epoch_one.exists, deadline)
        r.cloud.interrupt(first, "terminate", in_seconds=15)
        r.await_agent_event(first, "phase_changed", timeout=60, phase="released")
        second = r._await("a replacement", lambda: len(r.boots) > 1 and r.boots[1]["instance_id"], deadline)
        done = r.await_agent_event(second, "completion_recorded", timeout=300)
        r._await("the fleet cancel", r._fleet_cancelled, deadline)
        # Its own resume: the replacement started at the epoch after its highest file.
        log_text = (r.cloud.instance(second).state_dir / "trainer.log").read_text()
        epochs_run = [line.split()[1] for line in log_text.splitlines() if line.startswith("Epoch ")]
        assert epochs_run and epochs_run[0] != "1/3", epochs_run
        assert "test_accuracy" in done["metrics"]
        # The fleet was cancelled once, by the completion: no instance before it finished.
        events = [e["event"] for e in r._agent_events(first)]
        assert "fleet_cancel_started" not in events
    finally:
        r.stop()

"""The reference trainer and the example scripts, on the synthetic data set (JAX, CPU)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spotrun_trainer import datasets
from spotrun_trainer.store import CheckpointStore

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("datasets")
    datasets.synthesize(path, train=400, test=100, seed=0)
    return path


def run(argv, env_extra, timeout=240):
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3", **env_extra)
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_reference_trainer_tiny_writes_metrics_csv_checkpoint_and_resumes_as_done(tmp_path, data_dir):
    env = {"SPOTRUN_DATA_DIR": str(data_dir), "SPOTRUN_CHECKPOINT_DIR": str(tmp_path / "ck"),
           "SPOTRUN_PROGRESS_FILE": str(tmp_path / "progress.json"),
           "SPOTRUN_JOB_ID": "job-test"}  # as under the agent: events are <prio>{json} on stderr
    argv = ["-m", "spotrun_trainer.resnet_cifar", "--model", "tiny", "--epochs", "3",
            "--batch-size", "50", "--limit", "300", "--verbose", "0"]
    proc = run(argv, env)
    metrics = json.loads((tmp_path / "ck" / "final_metrics.json").read_text())
    assert metrics["model"] == "tiny" and metrics["synthetic_data"] is True
    assert metrics["global_step"] == 3 * 6 and metrics["train_samples"] == 300
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    rows = list(csv.DictReader((tmp_path / "ck" / "training_log.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert float(rows[-1]["accuracy"]) > float(rows[0]["accuracy"])  # it learns
    assert proc.stderr.count('"event":"epoch_end"') == 3
    record = json.loads((tmp_path / "ck" / ".spotrun-trainer-completed.json").read_text())
    assert record["global_step"] == 18 and "test_accuracy" in record["final_metrics"]
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["global_step"] == 18 and progress["epochs"] == 3
    assert CheckpointStore(tmp_path / "ck").latest_valid().step == 18
    # Run again (as after a crash right before exit): nothing left to train, same metrics file.
    again = run(argv, env)
    assert '"event":"training_resumed"' in again.stderr
    assert '"event":"epoch_end"' not in again.stderr
    assert json.loads((tmp_path / "ck" / "final_metrics.json").read_text())["global_step"] == 18


def test_reference_trainer_reports_missing_data_clearly(tmp_path):
    env = dict(os.environ, KERAS_BACKEND="jax", SPOTRUN_DATA_DIR=str(tmp_path / "nothing"))
    proc = subprocess.run([sys.executable, "-m", "spotrun_trainer.resnet_cifar", "--model", "tiny",
                           "--checkpoint-dir", str(tmp_path / "ck")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert "missing data_batch_1" in proc.stderr and "spotrun_trainer.datasets" in proc.stderr


def test_resnet50_is_the_seeds_model():
    import keras

    from spotrun_trainer.resnet_cifar import build_model
    model = build_model("resnet50", 1e-4)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)
    assert isinstance(model.optimizer, keras.optimizers.RMSprop)
    assert 23_000_000 < model.count_params() < 24_000_000  # ResNet50 with a 10-class top


@pytest.mark.slow
def test_seed_style_example_resumes_from_its_highest_numbered_file(tmp_path, data_dir):
    env = {"SPOTRUN_DATA_DIR": str(data_dir), "SPOTRUN_CHECKPOINT_DIR": str(tmp_path)}
    script = "examples/seed_style/train.py"
    run([script, "--model", "tiny", "--epochs", "2", "--limit", "200"], env)
    files = sorted(p.name for p in (tmp_path / "cifar10").iterdir())
    assert files == ["cifar10_model.001.keras", "cifar10_model.002.keras"]
    resumed = run([script, "--model", "tiny", "--epochs", "3", "--limit", "200"], env)
    assert "Epoch 3/3" in resumed.stdout and "Epoch 1/3" not in resumed.stdout
    assert (tmp_path / "cifar10" / "cifar10_model.003.keras").exists()
    assert "test_accuracy" in json.loads((tmp_path / "final_metrics.json").read_text())
    run([script, "--model", "tiny", "--epochs", "1", "--limit", "200",
         "--keras-backup-and-restore", "3"], {**env, "SPOTRUN_CHECKPOINT_DIR": str(tmp_path / "b")})
    assert (tmp_path / "b" / "cifar10" / "backup").is_dir()


def test_quickstart_has_the_two_lines_and_resumes_at_the_step(tmp_path):
    text = (ROOT / "examples" / "quickstart" / "train.py").read_text()
    assert text.count("# spotrun line") == 2
    assert "SpotCheckpoint(data=batches" in text and "model.fit(batches" in text
    env = {"SPOTRUN_CHECKPOINT_DIR": str(tmp_path), "QUICKSTART_EPOCHS": "2", "SPOTRUN_JOB_ID": "t"}
    run(["examples/quickstart/train.py"], env)
    resumed = run(["examples/quickstart/train.py"], {**env, "QUICKSTART_EPOCHS": "3"})
    assert '"event":"training_resumed"' in resumed.stderr and "Epoch 3/3" in resumed.stdout
    assert "Epoch 1/3" not in resumed.stdout
    assert "accuracy" in json.loads((tmp_path / "final_metrics.json").read_text())

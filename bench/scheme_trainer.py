"""One training run under one checkpoint scheme; the same tiny model and data for every scheme.

    KERAS_BACKEND=jax python bench/scheme_trainer.py --scheme spotrun|seed|bnr-epoch|bnr-step
        --dir DIR [--save-steps N] [--epochs 6] [--samples 1024] [--batch-size 32]
        [--sigterm-at POSITION] --events FILE

Run it again with the same --dir to resume as the scheme resumes. --sigterm-at sends SIGTERM to
this process right after the training step that brings the job to POSITION (global steps
since the job began: epoch x steps per epoch + batch), so every scheme is interrupted at the
same points; what happens next is the scheme's own doing. The events file gets one JSON line
per run start (the position it resumed at), per SIGTERM sent, and at the end of training or
exit (the position reached) — a scheme killed by SIGTERM writes no end line: it reached the
position the signal was sent at.

The schemes, and where their behaviour comes from:
  spotrun   — spotrun_trainer.SpotCheckpoint.fit (checkpoints every 300 s, the reference
              trainer's default, and on SIGTERM at the step; resumes at the next step).
  seed      — the AWS blog's scheme as the seed quotes it (/work/shared/seed/000_18943e10f556dcd8.txt,
              step 5, ec2_spot_keras_training.py): Keras ModelCheckpoint saving the whole model
              "at the end of each epoch" to numbered files, load_checkpoint_model() resuming from
              the highest epoch number (reused from examples/seed_style/train.py), fit with
              initial_epoch and shuffle=True. The seed installs no SIGTERM handler: the signal
              kills it (the default action), as termination does.
  bnr-epoch — keras.callbacks.BackupAndRestore(save_freq="epoch") (Keras docs: "backing up the
              training states ... at the end of each epoch"; on restart fit resumes from the
              backed-up epoch). No SIGTERM handling: killed.
  bnr-step  — BackupAndRestore(save_freq=N): weights saved every N batches, but Keras 3 restores
              only the epoch number (keras/src/callbacks/backup_and_restore.py `_load_model` sets
              `model._initial_epoch` from the metadata; the batch is written, never read), so the
              interrupted epoch is replayed from its first batch. Killed by SIGTERM.
The model is spotrun_trainer.resnet_cifar's "tiny" for every scheme (the seed's own model and
one-hot loss are irrelevant to what a checkpoint scheme loses), data a fixed random CIFAR-10-
shaped set, so the schemes differ only in how they checkpoint and resume.
"""
from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer"))

import keras  # noqa: E402
import numpy as np  # noqa: E402

SCHEMES = ("spotrun", "seed", "bnr-epoch", "bnr-step")


def _events(path: str):
    def record(event: str, **fields) -> None:
        with open(path, "a") as fh:
            fh.write(json.dumps({"event": event, "wall": time.time(), "pid": os.getpid(), **fields}) + "\n")
    return record


class Interrupter(keras.callbacks.Callback):
    """Tracks the job's position and sends SIGTERM to this process at ``sigterm_at``."""

    def __init__(self, record, steps_per_epoch: int, sigterm_at: int | None, spot=None):
        super().__init__()
        self.record, self.spe, self.sigterm_at, self.spot = record, steps_per_epoch, sigterm_at, spot
        self.position: int | None = None

    def _start(self, position: int) -> None:
        if self.position is None:
            self.position = position
            self.record("run_start", position=position)

    def on_epoch_begin(self, epoch, logs=None):
        if self.spot is None:  # Keras schemes resume at an epoch boundary
            self._start(epoch * self.spe)

    def on_train_batch_begin(self, batch, logs=None):
        if self.spot is not None:  # spotrun resumes mid-epoch: its own count is the truth
            self._start(self.spot.global_step)

    def on_train_batch_end(self, batch, logs=None):
        self.position += 1
        if self.sigterm_at is not None and self.position == self.sigterm_at:
            self.record("sigterm_sent", position=self.position)
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_end(self, logs=None):
        position = self.spot.global_step if self.spot is not None else self.position
        self.record("train_end", position=position)


def _data(samples: int):
    rng = np.random.default_rng(1234)
    x = rng.random((samples, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, samples)
    xv = rng.random((256, 32, 32, 3), dtype=np.float32)
    yv = rng.integers(0, 10, 256)
    return x, y, xv, yv


def _seed_module():
    spec = importlib.util.spec_from_file_location("seed_style_train", ROOT / "examples" / "seed_style" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", choices=SCHEMES, required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--save-steps", type=int, default=8, help="bnr-step's save_freq")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sigterm-at", type=int, default=None)
    parser.add_argument("--events", required=True)
    args = parser.parse_args()
    from spotrun_trainer import SpotCheckpoint
    from spotrun_trainer.resnet_cifar import build_model

    record = _events(args.events)
    x, y, xv, yv = _data(args.samples)
    spe = -(-args.samples // args.batch_size)
    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    fit = dict(batch_size=args.batch_size, epochs=args.epochs, validation_data=(xv, yv), verbose=0)

    if args.scheme == "spotrun":
        spot = SpotCheckpoint(workdir / "spotrun", every_seconds=300, seed=0)
        tap = Interrupter(record, spe, args.sigterm_at, spot)
        atexit.register(lambda: record("exit", position=spot.global_step))
        spot.fit(build_model("tiny", 3e-3), x, y, callbacks=[tap], **fit)
        return 0
    tap = Interrupter(record, spe, args.sigterm_at)
    if args.scheme == "seed":
        seed = _seed_module()
        path = workdir / "cifar10"
        path.mkdir(exist_ok=True)
        callbacks = [keras.callbacks.ModelCheckpoint(  # as the seed: every epoch, whole model
            str(path / seed.CHECKPOINT_NAMES), monitor="val_loss", save_best_only=False,
            save_weights_only=False, mode="auto", save_freq="epoch")]
        if not os.listdir(path):
            model, initial_epoch = build_model("tiny", 3e-3), 0
        else:
            model, initial_epoch = seed.load_checkpoint_model(str(path), seed.CHECKPOINT_NAMES)
        model.fit(x, y, shuffle=True, callbacks=callbacks + [tap], initial_epoch=initial_epoch, **fit)
        return 0
    save_freq = "epoch" if args.scheme == "bnr-epoch" else args.save_steps
    backup = keras.callbacks.BackupAndRestore(str(workdir / "backup"), save_freq=save_freq)
    model = build_model("tiny", 3e-3)
    model.fit(x, y, shuffle=True, callbacks=[backup, tap], **fit)
    return 0


if __name__ == "__main__":
    sys.exit(main())

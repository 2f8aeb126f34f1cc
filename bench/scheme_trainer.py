"""One training run under one checkpoint scheme; the same tiny model and data for every scheme.

    KERAS_BACKEND=jax python bench/scheme_trainer.py --scheme spotrun|seed|bnr-epoch|bnr-step|bnr-term
        --dir DIR [--save-steps N] [--epochs 6] [--samples 1024] [--batch-size 32]
        --events FILE [--notify-fd FD]

Run it again with the same --dir to resume as the scheme resumes. Nothing in this process sends
the interruption: the runner (bench/schemes.py) reads the position this process reports on
--notify-fd after every batch and sends SIGTERM from outside when it reaches an interruption
point, while training goes on — as a real notice finds a trainer mid-step.

The witness is `Interrupter`, first in the callback list. It reads nothing the scheme keeps
about its own progress; per process it records, one JSON line per event, written and flushed at
once so that the line is there even when SIGTERM kills the process right after:
  run_start — the optimizer's iteration count in the restored model state, read at the first
              batch before its step (`iterations`), Keras's epoch and batch index there, and
              the data-stream position the run starts at (`data_start`, below);
  batch_end — after every training batch: `batches` (this process's own count of batches
              run: on_train_batch_end calls), Keras's epoch and batch, `position`
              (= data_start + batches, the last batch completed);
  epoch_end — Keras's epoch number and `batches` at each epoch end: (epoch + 1) x steps per
              epoch - batches at the first one is where this run's data started, a check on
              data_start that neither the scheme nor the optimizer state supplies;
  exit      — at interpreter exit, when the process exits rather than being killed.
data_start: where in the job's data stream (epoch x steps per epoch + batch) this run's first
batch is. For the Keras schemes fit iterates the arrays itself, so it is Keras's epoch x steps
per epoch + Keras's batch index; spotrun feeds fit a positioned ResumableBatches (Keras's batch
index restarts at 0 mid-epoch), so it is the optimizer's iteration count, checked at the first
epoch end as above.

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
  bnr-step  — BackupAndRestore(save_freq=N): weights (optimizer included) saved every N batches,
              but Keras 3 restores only the epoch number (keras/src/callbacks/backup_and_restore.py
              `_load_model` sets `model._initial_epoch` from the metadata; the batch is written,
              never read), so the interrupted epoch's data is replayed from its first batch on
              weights of a later step. Killed by SIGTERM.
  bnr-term  — the control: bnr-step's BackupAndRestore(save_freq=N) plus the SIGTERM handler a
              user would add (`BackupOnSigterm`): it separates "handles the signal" from
              "resumes inside the epoch".
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

SCHEMES = ("spotrun", "seed", "bnr-epoch", "bnr-step", "bnr-term")


class Events:
    """Append-only JSON lines, each written and flushed whole: the file is the record of a
    process that SIGTERM may kill between any two batches."""

    def __init__(self, path: str):
        self._fh = open(path, "a", buffering=1)

    def __call__(self, event: str, **fields) -> None:
        self._fh.write(json.dumps({"event": event, "wall": time.time(), "pid": os.getpid(), **fields}) + "\n")
        self._fh.flush()


class Interrupter(keras.callbacks.Callback):
    """The bench's witness in the trainer (see the module docstring): counts the batches this
    process runs and reports its position after each one; never signals, never reads the
    scheme's own step count."""

    def __init__(self, record: Events, steps_per_epoch: int, notify_fd: int | None,
                 loop_is_data: bool):
        super().__init__()
        self.record, self.spe, self.notify_fd, self.loop_is_data = record, steps_per_epoch, notify_fd, loop_is_data
        self.batches = 0
        self.epoch = 0
        self.data_start: int | None = None
        self._epoch_ends = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self.data_start is None:
            iterations = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            self.data_start = self.epoch * self.spe + batch if self.loop_is_data else iterations
            self.record("run_start", iterations=iterations, epoch=self.epoch, batch=batch,
                        data_start=self.data_start)

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        position = self.data_start + self.batches
        self.record("batch_end", batches=self.batches, epoch=self.epoch, batch=batch, position=position)

    def notifier(self) -> keras.callbacks.Callback:
        """The callback that tells the runner the position: last in the list (but before
        SpotCheckpoint, which spot.fit puts last), after the scheme's own batch-end saves —
        a kill that lands inside BackupAndRestore's save_weights leaves a torn backup that
        its next start refuses (OSError), a failure of the scheme but not the loss measured
        here (docs/benchmarks.md)."""
        tap = self

        class Notify(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if tap.notify_fd is None:
                    return
                try:
                    os.write(tap.notify_fd, b"%d\n" % (tap.data_start + tap.batches))
                except BrokenPipeError:  # the runner stopped listening: training goes on
                    tap.notify_fd = None

        return Notify()

    def on_epoch_end(self, epoch, logs=None):
        self.record("epoch_end", epoch=epoch, batches=self.batches)

    def on_train_end(self, logs=None):
        self.record("fit_end", batches=self.batches)


class BackupOnSigterm(keras.callbacks.BackupAndRestore):
    """bnr-term: BackupAndRestore(save_freq=N) with the SIGTERM handler a user would write.

    The handler only sets a flag (a signal handler must not save mid-step); at the next batch
    end the callback backs up and exits 0. What it shows: handling the signal keeps the
    weights and optimizer state of the last step (no step lost by the optimizer's count), but
    Keras 3 resumes at the start of the backed-up epoch, so the data since the epoch began is
    fed again — the loss that remains is "resumes inside the epoch", not "handles the signal".
    Keras 3 has no public "back up now": ``_save_model`` is the method its own save_freq
    calls, the least a user can call. It exits from the batch end rather than setting
    ``stop_training``: that would run the rest of fit — validation, on_epoch_end (which moves
    the backed-up epoch past the unfinished one) and on_train_end, which deletes the backup
    (delete_checkpoint=True).
    """

    def __init__(self, backup_dir: str, save_freq: int, record: Events):
        super().__init__(backup_dir, save_freq=save_freq)
        self.record = record
        self.stop_requested = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.stop_requested = True

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self.stop_requested:
            self._save_model()
            self.record("backed_up_on_sigterm", epoch=self._current_epoch, batch=batch)
            sys.exit(0)


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
    parser.add_argument("--save-steps", type=int, default=8, help="bnr-step's and bnr-term's save_freq")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--events", required=True)
    parser.add_argument("--notify-fd", type=int, default=None,
                        help="a pipe to write the position to after every batch (the runner's)")
    args = parser.parse_args()
    from spotrun_trainer import SpotCheckpoint
    from spotrun_trainer.resnet_cifar import build_model

    if args.notify_fd is not None:
        os.set_inheritable(args.notify_fd, False)  # a child holding it would keep the runner waiting
    record = Events(args.events)
    atexit.register(lambda: record("exit"))
    x, y, xv, yv = _data(args.samples)
    spe = -(-args.samples // args.batch_size)
    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    fit = dict(batch_size=args.batch_size, epochs=args.epochs, validation_data=(xv, yv), verbose=0)
    # The witness first in every list: a batch is on record before any scheme's batch-end code
    # runs, so a save of batch k is never ahead of it; its notifier last (see notifier()).
    tap = Interrupter(record, spe, args.notify_fd, loop_is_data=args.scheme != "spotrun")

    if args.scheme == "spotrun":
        spot = SpotCheckpoint(workdir / "spotrun", every_seconds=300, seed=0)
        spot.fit(build_model("tiny", 3e-3), x, y, callbacks=[tap, tap.notifier()], **fit)
        return 0
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
        model.fit(x, y, shuffle=True, callbacks=[tap, *callbacks, tap.notifier()], initial_epoch=initial_epoch,
                  **fit)
        return 0
    if args.scheme == "bnr-term":
        backup = BackupOnSigterm(str(workdir / "backup"), args.save_steps, record)
    else:
        save_freq = "epoch" if args.scheme == "bnr-epoch" else args.save_steps
        backup = keras.callbacks.BackupAndRestore(str(workdir / "backup"), save_freq=save_freq)
    model = build_model("tiny", 3e-3)
    model.fit(x, y, shuffle=True, callbacks=[tap, backup, tap.notifier()], **fit)
    return 0


if __name__ == "__main__":
    sys.exit(main())

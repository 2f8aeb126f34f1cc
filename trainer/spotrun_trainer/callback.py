"""SpotCheckpoint: the Keras callback that makes training spot-safe and resumable.

As any Keras callback (last in the list)::

    batches = ResumableBatches(x_train, y_train, batch_size=64)
    model.fit(batches, epochs=10, shuffle=False, callbacks=[SpotCheckpoint(data=batches)])

A restarted script restores in ``on_train_begin``, as ``BackupAndRestore`` does: weights,
optimizer, epoch and, because the callback positions ``batches``, the step inside the epoch.
With inputs it cannot position (``model.fit(x, y, shuffle=True)``, a generator) it resumes at
the start of the interrupted epoch and says how many steps it replays. ``spot.fit(model, x, y,
...)`` wraps arrays in a ResumableBatches itself and resumes at the step too.

What a checkpoint holds: every model variable (weights, BatchNorm statistics, dropout seed
state), every optimizer variable (slots and ``iterations``, i.e. the learning-rate schedule
position), the epoch, the step within the epoch and the data order (seed, batch size, sample
count). Only Keras 3's public API is used, but for one hook isolated in fitcontrol.py; it runs
on TensorFlow and on JAX.

Stopped by SIGTERM, it checkpoints at the step boundary and exits with status 75 ("stopped,
not done"), from ``fit``, so that no code after ``fit`` runs on a dying instance; trained to
the end, it writes the completion record the agent requires (protocol.py).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import keras

from . import modelstate
from .data import ResumableBatches
from .fitcontrol import UNSET, ShortEpoch, merge_history, restore_initial_epoch, start_fit_at_epoch
from .lifecycle import TrainerLifecycle
from .logs import log_event
from .modelstate import model_fingerprint
from .store import Checkpoint, CheckpointStore, IncompatibleCheckpoint
from .tfdata import TFDATA_NOT_AS_DATA, ResumableTFDataset, is_dataset, resumable_input

META_FILE = "training.json"
DEFAULT_LOCAL_DIR = "spotrun-checkpoints"


def _log(level: str, event: str, **fields) -> None:
    log_event(level, event, component="callback", **fields)


class _StopRequested(BaseException):
    """Raised inside ``spot.fit`` after the SIGTERM checkpoint is durable, to skip validation."""


class SpotCheckpoint(TrainerLifecycle, keras.callbacks.Callback):
    """Checkpoint on a time interval / every N steps / on SIGTERM (then stop) / on SIGUSR1.

    directory: defaults to ``$SPOTRUN_CHECKPOINT_DIR``, else ``./spotrun-checkpoints``.
    data: the ResumableBatches given to ``model.fit``, so that a resume continues at the step
    (a tf.data input cannot be positioned from a callback: ``spot.fit`` takes one).
    every_seconds: time between checkpoints (None: off). every_steps: steps between them.
    keep: checkpoints kept. async_save: capture the state at the step boundary (save_weights
    to a local temporary file), then checksum, write and fsync it in a background thread.
    seed: the data order's seed for ``spot.fit``.
    exit_on_stop: after the SIGTERM checkpoint, raise SystemExit(75) from ``fit`` so that
    code after it does not run; False: ``fit`` returns with ``stopped_by_signal`` set.
    """

    def __init__(self, directory: str | os.PathLike | None = None, *,
                 data: ResumableBatches | None = None, every_seconds: float | None = 300,
                 every_steps: int | None = None, keep: int = 2, async_save: bool = False,
                 seed: int = 0, exit_on_stop: bool = True, handle_signals: bool = True,
                 progress_file: str | os.PathLike | None = None, commit: str | None = None):
        super().__init__()
        env = os.environ
        self.directory = Path(directory or env.get("SPOTRUN_CHECKPOINT_DIR") or DEFAULT_LOCAL_DIR)
        if every_steps is not None and every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        if data is not None and not isinstance(data, ResumableBatches):
            tfdata = is_dataset(data) or isinstance(data, ResumableTFDataset)
            raise TypeError(f"data must be the ResumableBatches given to fit, got "
                            f"{type(data).__name__}" + (TFDATA_NOT_AS_DATA if tfdata else ""))
        self.data = data
        self.every_seconds, self.every_steps = every_seconds, every_steps
        self.async_save, self.seed = async_save, int(seed)
        self._init_lifecycle(exit_on_stop=exit_on_stop, handle_signals=handle_signals,
                             progress_file=progress_file)
        self.commit = commit or env.get("SPOTRUN_CODE_COMMIT")
        self.store = CheckpointStore(self.directory, keep=keep)
        # Position: the next step to train is (epoch, step_in_epoch); global_step counts steps done.
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.initial_epoch = 0
        self.restored: Checkpoint | None = None
        self.saves = 0
        self.blocked_seconds: list[float] = []  # training-thread time spent in each checkpoint
        self.last_checkpoint_time: float | None = None
        self._resume: tuple[int, int] | None = None  # where the next fit starts, from restore()
        self._restore_tried = False
        self._epoch_offset = 0
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None
        self._last_save_mono = time.monotonic()
        self._inside_fit = False  # spot.fit drives the fit calls
        self._previous_initial_epoch = UNSET
        self._short_epoch = ShortEpoch()
        self._last_saved_step: int | None = None
        self._last_checkpoint: str | None = None  # the newest checkpoint's name

    # ------------------------------------------------------------ restore
    def restore(self, model: keras.Model, dataset: ResumableBatches | None = None) -> Checkpoint | None:
        """Load the newest valid checkpoint into ``model`` (compiled); None on a fresh start.

        The next ``fit`` with this callback starts where the checkpoint left off.
        """
        self._prepare(model)
        self._restore_tried, self._resume = True, None
        checkpoint = self.store.latest_valid(model_fingerprint(model), quarantine=True)
        if checkpoint is None:
            _log("info", "training_fresh_start", directory=str(self.directory))
            return None
        meta = json.loads(checkpoint.read_bytes(META_FILE))
        if dataset is not None and meta.get("data") not in (None, dataset.describe()):
            raise IncompatibleCheckpoint(
                f"{checkpoint.path}: saved with data order {meta['data']}, this run has "
                f"{dataset.describe()}; resume would not see the same batches")
        modelstate.restore(model, checkpoint)  # also reads the older state.npz checkpoints
        steps = meta.get("steps_per_epoch") or 0
        self.epoch, self.step_in_epoch = checkpoint.epoch, checkpoint.step_in_epoch
        if steps and self.step_in_epoch >= steps:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.global_step = checkpoint.step
        self.initial_epoch = self.epoch
        self.restored, self._last_checkpoint = checkpoint, checkpoint.path.name
        self._last_saved_step = self.global_step
        self._resume = (self.epoch, self.step_in_epoch)
        _log("info", "training_resumed", checkpoint=str(checkpoint.path), epoch=self.epoch,
             step_in_epoch=self.step_in_epoch, global_step=self.global_step)
        return checkpoint

    @staticmethod
    def _prepare(model: keras.Model) -> None:
        if not getattr(model, "compiled", False) or model.optimizer is None:
            raise ValueError("compile the model (with an optimizer) before restoring a checkpoint")
        if not model.built:
            raise ValueError("build the model (give it an Input or call model.build) before restoring")
        if not model.optimizer.built:  # slots must exist to receive the saved values
            model.optimizer.build(model.trainable_variables)

    # ------------------------------------------------------------ fit helper
    def fit(self, model: keras.Model, x=None, y=None, *, batch_size: int = 32, epochs: int = 1,
            callbacks: list | None = None, **fit_kwargs) -> keras.callbacks.History | None:
        """``model.fit`` that resumes at the step after the last checkpoint.

        ``x`` is a ResumableBatches, or arrays ``x, y`` that are wrapped in one with this
        callback's seed, or a finite ``tf.data.Dataset`` / ResumableTFDataset (tfdata.py).
        Other keyword arguments go to ``model.fit`` (not ``shuffle``, ``initial_epoch`` or
        ``steps_per_epoch``, which this method owns). Runs as fits in a
        list, in two ``model.fit`` calls when the restart is inside an epoch: that epoch's rest
        (``initial_epoch=e, epochs=e+1``), then the remaining epochs.
        """
        for owned in ("shuffle", "initial_epoch", "steps_per_epoch"):
            if owned in fit_kwargs:
                raise TypeError(f"SpotCheckpoint.fit sets {owned!r} itself")
        dataset = resumable_input(x, y, batch_size, self.seed)
        self.data, self._epochs = dataset, epochs
        # Last, so that the user's callbacks see a step before a SIGTERM stop cuts the epoch.
        all_callbacks = list(callbacks or []) + [self]
        history = None
        self._inside_fit = True
        try:
            self._begin_training()
            self.restore(model, dataset)
            if self.step_in_epoch and self.epoch < epochs:  # finish the interrupted epoch
                dataset.set_position(self.epoch, self.step_in_epoch)
                history = model.fit(**dataset.fit_input(self.epoch + 1),
                                    epochs=self.epoch + 1, initial_epoch=self.epoch,
                                    shuffle=False, callbacks=all_callbacks, **fit_kwargs)
            if self.epoch < epochs and not (self.stopped_by_signal or model.stop_training):
                self._resume = (self.epoch, 0)
                dataset.set_position(self.epoch, 0)
                second = model.fit(**dataset.fit_input(epochs), epochs=epochs,
                                   initial_epoch=self.epoch,
                                   shuffle=False, callbacks=all_callbacks, **fit_kwargs)
                history = merge_history(history, second)
            if not self.stopped_by_signal and self._last_saved_step != self.global_step:
                self._checkpoint(wait=True)  # the finished state: a restart has nothing to redo
        except _StopRequested:
            pass
        finally:
            self._inside_fit, self._resume = False, None
            self.wait_for_save()
            self._end_training(model)
        self._finish()
        return history

    # ------------------------------------------------------------ start / end of training
    def _end_training(self, model: keras.Model | None) -> None:
        self._short_epoch.exit()
        self._restore_signals()
        if model is not None:
            restore_initial_epoch(model, self._previous_initial_epoch)
        self._previous_initial_epoch, self._resume = UNSET, None
        self._training = False

    # ------------------------------------------------------------ Keras hooks
    def on_train_begin(self, logs=None):
        self._last_save_mono = time.monotonic()
        if self._inside_fit:
            return  # spot.fit has restored and positioned the data itself
        steps = (self.params or {}).get("steps")
        if self.data is not None and steps != self.data.steps_per_epoch:
            raise ValueError(
                f"SpotCheckpoint(data=...): fit runs {steps} steps an epoch, the ResumableBatches "
                f"has {self.data.steps_per_epoch}; give fit that ResumableBatches itself, "
                f"without steps_per_epoch")
        model = self.model
        self._begin_training()
        try:
            if not self._restore_tried:
                self.restore(model, self.data)
            if self._resume is not None:
                self._previous_initial_epoch = start_fit_at_epoch(model, self._resume_epoch())
        except BaseException:
            self._end_training(model)  # Keras calls no on_train_end after an error here
            raise

    def _resume_epoch(self) -> int:
        """The epoch the next fit starts at; with data it cannot position, its first step."""
        epoch, step = self._resume
        if step and self.data is None:
            _log("warning", "training_resumed_at_epoch_start", epoch=epoch, replayed_steps=step,
                 checkpoint=self._last_checkpoint,
                 how_to_avoid="give fit a ResumableBatches and SpotCheckpoint(data=it), or "
                              "use spot.fit(model, x, y, ...) (arrays or a tf.data.Dataset): "
                              "both resume at the step")
            self.global_step -= step
            self.step_in_epoch, self._resume = 0, (epoch, 0)
            self._last_saved_step = None  # the replayed steps make a new state
        return epoch

    def on_train_end(self, logs=None):
        if self._inside_fit:
            self.wait_for_save()
            self._write_progress(force=True)
            return
        if self._last_saved_step != self.global_step:
            self._checkpoint(wait=True)  # the last state: a restart has nothing to redo
        self.wait_for_save()
        self._end_training(self.model)
        self._write_progress(force=True)
        self._finish()

    def on_epoch_begin(self, epoch, logs=None):
        offset = 0
        if self._resume is not None:
            resume_epoch, offset = self._resume
            self._resume = None
            if epoch != resume_epoch:
                raise RuntimeError(
                    f"fit started at epoch {epoch}, the checkpoint {self._last_checkpoint} is at "
                    f"epoch {resume_epoch}: do not pass initial_epoch with SpotCheckpoint (it "
                    f"sets the epoch from the checkpoint)")
        if self.data is not None:
            self.data.set_position(epoch, offset)
            if (self.params or {}).get("steps", 0) > len(self.data):
                self._short_epoch.enter()  # fit expects a whole epoch: see fitcontrol.py
        self.epoch, self.step_in_epoch, self._epoch_offset = epoch, offset, offset

    def on_train_batch_end(self, batch, logs=None):
        if logs:
            self.latest_metrics.update(logs)
        done = self._epoch_offset + batch + 1
        self.global_step += done - self.step_in_epoch
        self.step_in_epoch = done
        self._raise_writer_error()
        if self.data is not None and self.data.out_of_order is not None:
            raise ValueError(
                f"fit asked the ResumableBatches for batch {self.data.out_of_order} out of order: "
                f"pass shuffle=False to model.fit (ResumableBatches shuffles the samples itself, "
                f"reproducibly; Keras's batch shuffle could not be replayed on resume)")
        if self._short_epoch.active and self.step_in_epoch == self.data.steps_per_epoch:
            self._short_epoch.last_step_done(self.model)
        if self._stop.is_set():
            self._stop_now()
            return
        due = self._save_now.is_set()
        if self.every_steps and self.global_step % self.every_steps == 0:
            due = True
        if self.every_seconds is not None and time.monotonic() - self._last_save_mono >= self.every_seconds:
            due = True
        if due and not self._save_in_flight():
            self._save_now.clear()
            self._checkpoint(wait=not self.async_save)
        self._write_progress()

    def on_test_begin(self, logs=None):
        self._short_epoch.settle()  # the validation that ends the short epoch

    def on_test_batch_end(self, batch, logs=None):
        # A SIGTERM during the validation that ends an epoch: the training state is the
        # epoch's last step, so checkpoint it now instead of after validating.
        if self._stop.is_set() and self._training and not self.stopped_by_signal:
            self._stop_now()

    def on_epoch_end(self, epoch, logs=None):
        if logs:  # the epoch's own figures, validation included
            self.latest_metrics.update(logs)
        self._short_epoch.settle()
        self._short_epoch.exit()
        if self.data is not None:  # whole again: a later fit reads its length before training
            self.data.set_position(epoch + 1, 0)
        if self._epoch_complete():
            self.epoch, self.step_in_epoch, self._epoch_offset = epoch + 1, 0, 0
        if logs:
            self._write_progress(force=True)

    def _epoch_complete(self) -> bool:
        steps = self._steps_per_epoch()
        if steps:  # EarlyStopping ends fit after a whole epoch; a stop mid-epoch keeps the step
            return self.step_in_epoch >= steps
        return not self.stopped_by_signal and not self.model.stop_training

    def _stop_now(self) -> None:
        """SIGTERM, at a step boundary: checkpoint, then leave fit (exit 75) or stop it."""
        self.stopped_by_signal = True
        if self._last_saved_step != self.global_step:
            self._checkpoint(wait=True)
        self.wait_for_save()
        if self._inside_fit:
            raise _StopRequested()
        if self.exit_on_stop:
            self._write_progress(force=True)
            self._end_training(self.model)
            self._finish()  # raises SystemExit: nothing after fit runs
        self.model.stop_training = True

    # ------------------------------------------------------------ saving
    def _save_in_flight(self) -> bool:
        return self._writer is not None and self._writer.is_alive()

    def wait_for_save(self) -> None:
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        self._raise_writer_error()

    def _raise_writer_error(self) -> None:
        if self._writer_error is not None:
            error, self._writer_error = self._writer_error, None
            raise error

    def _steps_per_epoch(self) -> int | None:
        return self.data.steps_per_epoch if self.data is not None else (self.params or {}).get("steps")

    def _checkpoint(self, wait: bool) -> None:
        """Snapshot the state to host memory now; write it now or in a background thread."""
        started = time.perf_counter()
        self.wait_for_save()  # never two saves at once
        model = self.model
        # On the training thread, at the step boundary: model.weights.h5 (which stock Keras
        # loads) and the seed states, as bytes (modelstate.py). The writer only stores them.
        captured = modelstate.capture(model)
        meta = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "steps_per_epoch": self._steps_per_epoch(),
                "optimizer_iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
                "data": self.data.describe() if self.data is not None else None,
                "keras_version": keras.__version__, "backend": keras.backend.backend()}
        position = dict(step=self.global_step, epoch=self.epoch, step_in_epoch=self.step_in_epoch)
        fingerprint = model_fingerprint(model)
        self._last_save_mono = time.monotonic()
        self._last_saved_step = self.global_step

        def write():
            try:
                files = dict(captured)
                files[META_FILE] = json.dumps(meta, indent=1).encode()
                saved = self.store.save(files, fingerprint=fingerprint, commit=self.commit,
                                        **position)
                self._last_checkpoint = saved.path.name
                self.saves += 1
                self.last_checkpoint_time = time.time()
            except BaseException as exc:  # noqa: BLE001 - surfaced on the training thread
                self._writer_error = exc

        if wait:
            write()
        else:
            self._writer = threading.Thread(target=write, name="spotrun-checkpoint", daemon=True)
            self._writer.start()
        self.blocked_seconds.append(time.perf_counter() - started)
        if wait:
            self._raise_writer_error()


__all__ = ["SpotCheckpoint", "ResumableBatches", "model_fingerprint"]

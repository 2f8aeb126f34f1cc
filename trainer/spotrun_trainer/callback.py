"""SpotCheckpoint: the Keras callback that makes ``fit`` spot-safe and resumable to the step.

Two lines in a training script::

    spot = SpotCheckpoint(every_seconds=300)
    spot.fit(model, x_train, y_train, batch_size=64, epochs=10, validation_data=(x_val, y_val))

What a checkpoint holds: every model variable (weights, BatchNorm statistics, dropout seed
state), every optimizer variable (slots and ``iterations``, i.e. the learning-rate schedule
position), the epoch, the step within the epoch and the data order (seed, batch size, sample
count). Only Keras 3's public API is used, so it runs on TensorFlow and on JAX.

How resume stays exact with ``fit``: ``model.fit`` can only start at an epoch boundary, so
``SpotCheckpoint.fit`` runs the interrupted epoch's remaining batches as one ``fit`` call
(``initial_epoch=e, epochs=e+1``, a ResumableBatches positioned at the next batch) and the
remaining epochs as a second call. Callbacks see the right epoch numbers; the first epoch's
logged metrics cover only the batches trained after the restart.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from .data import ResumableBatches
from .store import (Checkpoint, CheckpointStore, IncompatibleCheckpoint, write_json_atomic,
                    write_progress)
from .store import _log as _store_log

STATE_FILE = "state.npz"
META_FILE = "training.json"
DEFAULT_LOCAL_DIR = "spotrun-checkpoints"
_PROGRESS_EVERY_S = 1.0


def _log(level: str, event: str, **fields) -> None:
    _store_log(level, event, component="trainer.callback", **fields)


class _StopRequested(BaseException):
    """Raised inside ``fit`` after the SIGTERM checkpoint is durable, to skip validation."""


def model_fingerprint(model: keras.Model) -> str:
    """Identity of a model's state layout: variable shapes and dtypes, optimizer class.

    Variable names are left out on purpose: Keras numbers layer names per process
    (``dense_3``), so the same model built twice in one process would differ.
    """
    parts = [f"{tuple(v.shape)}:{v.dtype}" for v in model.variables]
    optimizer = getattr(model, "optimizer", None)
    parts.append(type(optimizer).__name__ if optimizer is not None else "no-optimizer")
    return "keras3-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class SpotCheckpoint(keras.callbacks.Callback):
    """Checkpoint on a time interval / every N steps / on SIGTERM (then stop) / on SIGUSR1.

    directory: defaults to ``$SPOTRUN_CHECKPOINT_DIR``, else ``./spotrun-checkpoints``.
    every_seconds: time between checkpoints (None: off). every_steps: steps between them.
    keep: checkpoints kept. async_save: copy the state to host memory at the step boundary
    and write it in a background thread. seed: the data order's seed (ResumableBatches).
    exit_on_stop: after the SIGTERM checkpoint, ``fit`` raises SystemExit(0) so code after
    it (evaluation, final metrics) does not run on a preempted instance; False makes it
    return with ``stopped_by_signal`` set.
    """

    def __init__(self, directory: str | os.PathLike | None = None, *, every_seconds: float | None = 300,
                 every_steps: int | None = None, keep: int = 2, async_save: bool = False,
                 seed: int = 0, exit_on_stop: bool = True, handle_signals: bool = True,
                 progress_file: str | os.PathLike | None = None, commit: str | None = None):
        super().__init__()
        env = os.environ
        self.directory = Path(directory or env.get("SPOTRUN_CHECKPOINT_DIR") or DEFAULT_LOCAL_DIR)
        if every_steps is not None and every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        self.every_seconds, self.every_steps = every_seconds, every_steps
        self.async_save, self.seed, self.exit_on_stop = async_save, int(seed), exit_on_stop
        self.handle_signals = handle_signals
        progress = progress_file or env.get("SPOTRUN_PROGRESS_FILE")
        self.progress_file = Path(progress) if progress else None
        self.commit = commit or env.get("SPOTRUN_CODE_COMMIT")
        self.store = CheckpointStore(self.directory, keep=keep)
        # Position: the next step to train is (epoch, step_in_epoch); global_step counts steps done.
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.initial_epoch = 0
        self.restored: Checkpoint | None = None
        self.stopped_by_signal = False
        self.saves = 0
        self.blocked_seconds: list[float] = []  # training-thread time spent in each checkpoint
        self.last_checkpoint_time: float | None = None
        self._dataset: ResumableBatches | None = None
        self._epoch_offset = 0
        self._stop = threading.Event()
        self._save_now = threading.Event()
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None
        self._last_save_mono = time.monotonic()
        self._last_progress = 0.0
        self._previous_handlers: dict[int, Any] = {}
        self._inside_fit = False
        self._epochs: int | None = None
        self._last_saved_step: int | None = None

    # ------------------------------------------------------------ restore
    def restore(self, model: keras.Model, dataset: ResumableBatches | None = None) -> Checkpoint | None:
        """Load the newest valid checkpoint into ``model`` (compiled); None on a fresh start."""
        self._prepare(model)
        checkpoint = self.store.latest_valid(model_fingerprint(model))
        if checkpoint is None:
            _log("info", "training_fresh_start", directory=str(self.directory))
            return None
        meta = json.loads(checkpoint.read_bytes(META_FILE))
        with np.load(checkpoint.file(STATE_FILE), allow_pickle=False) as arrays:
            self._assign(model.variables, arrays, "model", checkpoint)
            self._assign(model.optimizer.variables, arrays, "optimizer", checkpoint)
        if dataset is not None and meta.get("data") not in (None, dataset.describe()):
            raise IncompatibleCheckpoint(
                f"{checkpoint.path}: saved with data order {meta['data']}, this run has "
                f"{dataset.describe()}; resume would not see the same batches")
        steps = meta.get("steps_per_epoch") or 0
        self.epoch, self.step_in_epoch = checkpoint.epoch, checkpoint.step_in_epoch
        if steps and self.step_in_epoch >= steps:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.global_step = checkpoint.step
        self.initial_epoch = self.epoch
        self.restored = checkpoint
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

    @staticmethod
    def _assign(variables, arrays, prefix: str, checkpoint: Checkpoint) -> None:
        saved = sorted((k for k in arrays.files if k.startswith(prefix + "_")),
                       key=lambda k: int(k.rsplit("_", 1)[1]))
        if len(saved) != len(variables):
            raise IncompatibleCheckpoint(f"{checkpoint.path}: {len(saved)} {prefix} variables "
                                         f"saved, the model has {len(variables)}")
        for variable, key in zip(variables, saved):
            variable.assign(arrays[key])

    # ------------------------------------------------------------ fit helper
    def fit(self, model: keras.Model, x=None, y=None, *, batch_size: int = 32, epochs: int = 1,
            callbacks: list | None = None, **fit_kwargs) -> keras.callbacks.History | None:
        """``model.fit`` that resumes at the step after the last checkpoint.

        ``x`` is a ResumableBatches, or arrays ``x, y`` that are wrapped in one with this
        callback's seed. Other keyword arguments go to ``model.fit`` (not ``shuffle``,
        ``initial_epoch`` or ``steps_per_epoch``, which this method owns).
        """
        for owned in ("shuffle", "initial_epoch", "steps_per_epoch"):
            if owned in fit_kwargs:
                raise TypeError(f"SpotCheckpoint.fit sets {owned!r} itself")
        dataset = x if isinstance(x, ResumableBatches) else ResumableBatches(x, y, batch_size, self.seed)
        self._dataset, self._epochs = dataset, epochs
        self.restore(model, dataset)
        self._last_saved_step = self.global_step if self.restored else None
        # Last, so that the user's callbacks see a step before a SIGTERM stop cuts the epoch.
        all_callbacks = list(callbacks or []) + [self]
        history = None
        self._inside_fit = True
        self._install_signals()
        try:
            if self.step_in_epoch and self.epoch < epochs:  # finish the interrupted epoch
                dataset.set_position(self.epoch, self.step_in_epoch)
                history = model.fit(dataset, epochs=self.epoch + 1, initial_epoch=self.epoch,
                                    shuffle=False, callbacks=all_callbacks, **fit_kwargs)
            if self.epoch < epochs and not self.stopped_by_signal:
                dataset.set_position(self.epoch, 0)
                second = model.fit(dataset, epochs=epochs, initial_epoch=self.epoch,
                                   shuffle=False, callbacks=all_callbacks, **fit_kwargs)
                history = _merge_history(history, second)
            if not self.stopped_by_signal and self._last_saved_step != self.global_step:
                self._checkpoint(wait=True)  # the finished state: a restart has nothing to redo
        except _StopRequested:
            pass
        finally:
            self._inside_fit = False
            self.wait_for_save()
            self._restore_signals()
        if self.stopped_by_signal and self.exit_on_stop:
            _log("info", "training_stopped_for_interruption", global_step=self.global_step)
            raise SystemExit(0)
        return history

    # ------------------------------------------------------------ signals
    def _install_signals(self) -> None:
        if not self.handle_signals or self._previous_handlers:
            return
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for signum, event in ((signal.SIGTERM, self._stop), (signal.SIGUSR1, self._save_now)):
            self._previous_handlers[signum] = signal.signal(
                signum, lambda _s, _f, event=event: event.set())

    def _restore_signals(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def request_stop(self) -> None:
        """What SIGTERM does: checkpoint at the next step boundary, then stop training."""
        self._stop.set()

    def request_checkpoint(self) -> None:
        """What SIGUSR1 does: checkpoint at the next step boundary and go on."""
        self._save_now.set()

    # ------------------------------------------------------------ Keras hooks
    def on_train_begin(self, logs=None):
        self._install_signals()
        self._last_save_mono = time.monotonic()

    def on_train_end(self, logs=None):
        if not self._inside_fit:
            self._restore_signals()
            if not self.stopped_by_signal and self._last_saved_step != self.global_step:
                self._checkpoint(wait=True)
        self.wait_for_save()
        self._write_progress(force=True)

    def on_epoch_begin(self, epoch, logs=None):
        # Only SpotCheckpoint.fit positions the data mid-epoch; a plain model.fit replays the
        # epoch from its first batch (epoch-granular resume, like BackupAndRestore).
        resumes_mid_epoch = epoch == self.epoch and self._dataset is not None and self._inside_fit
        self._epoch_offset = self.step_in_epoch if resumes_mid_epoch else 0
        if not resumes_mid_epoch and epoch == self.epoch:
            self.global_step -= self.step_in_epoch
        self.epoch, self.step_in_epoch = epoch, self._epoch_offset
        if self._dataset is not None:
            self._dataset.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        done = self._epoch_offset + batch + 1
        self.global_step += done - self.step_in_epoch
        self.step_in_epoch = done
        self._raise_writer_error()
        if self._stop.is_set():
            self.stopped_by_signal = True
            if self._last_saved_step != self.global_step:
                self._checkpoint(wait=True)
            self.wait_for_save()
            self.model.stop_training = True
            if self._inside_fit:
                raise _StopRequested()
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

    def on_test_batch_end(self, batch, logs=None):
        # A SIGTERM during the validation that ends an epoch: the training state is the
        # epoch's last step, so checkpoint it now instead of after validating.
        if self._stop.is_set() and self._inside_fit and not self.stopped_by_signal:
            self.stopped_by_signal = True
            if self._last_saved_step != self.global_step:
                self._checkpoint(wait=True)
            self.wait_for_save()
            raise _StopRequested()

    def on_epoch_end(self, epoch, logs=None):
        if not self.model.stop_training:
            self.epoch, self.step_in_epoch, self._epoch_offset = epoch + 1, 0, 0

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

    def _checkpoint(self, wait: bool) -> None:
        """Snapshot the state to host memory now; write it now or in a background thread."""
        started = time.perf_counter()
        self.wait_for_save()  # never two saves at once
        model = self.model
        # Real copies: a backend may reuse the device buffers at the next step (JAX donates them).
        arrays = {f"model_{i}": _host_copy(v) for i, v in enumerate(model.variables)}
        arrays.update({f"optimizer_{i}": _host_copy(v)
                       for i, v in enumerate(model.optimizer.variables)})
        steps = self._dataset.steps_per_epoch if self._dataset else (self.params or {}).get("steps")
        meta = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "steps_per_epoch": steps,
                "optimizer_iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
                "data": self._dataset.describe() if self._dataset else None,
                "keras_version": keras.__version__, "backend": keras.backend.backend()}
        position = dict(step=self.global_step, epoch=self.epoch, step_in_epoch=self.step_in_epoch)
        fingerprint = model_fingerprint(model)
        self._last_save_mono = time.monotonic()
        self._last_saved_step = self.global_step

        def write():
            try:
                self.store.save({STATE_FILE: _npz_bytes(arrays),
                                 META_FILE: json.dumps(meta, indent=1).encode()},
                                fingerprint=fingerprint, commit=self.commit, **position)
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

    # ------------------------------------------------------------ progress / results
    def _write_progress(self, force: bool = False) -> None:
        if self.progress_file is None:
            return
        now = time.monotonic()
        if not force and now - self._last_progress < _PROGRESS_EVERY_S:
            return
        self._last_progress = now
        params = self.params or {}
        steps = self._dataset.steps_per_epoch if self._dataset else params.get("steps")
        try:
            write_progress(self.progress_file, epoch=self.epoch,
                           epochs=self._epochs or params.get("epochs"), step=self.step_in_epoch,
                           steps_per_epoch=steps, global_step=self.global_step,
                           last_checkpoint_time=self.last_checkpoint_time)
        except OSError as exc:  # progress is a report: never stop training for it
            _log("warning", "progress_write_failed", path=str(self.progress_file), reason=str(exc))

    def write_final_metrics(self, metrics: dict) -> Path:
        """Write ``final_metrics.json`` next to the checkpoints (the completion record reads it)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "final_metrics.json"
        write_json_atomic(path, {k: _plain(v) for k, v in metrics.items()})
        return path


def _npz_bytes(arrays: dict) -> memoryview:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getbuffer()


def _host_copy(variable) -> np.ndarray:
    return np.array(keras.ops.convert_to_numpy(variable), copy=True)


def _plain(value):
    try:
        return float(value) if not isinstance(value, (str, int, bool, type(None))) else value
    except (TypeError, ValueError):
        return str(value)


def _merge_history(first, second):
    if first is None:
        return second
    if second is None:
        return first
    for key, values in second.history.items():
        first.history.setdefault(key, []).extend(values)
    first.epoch.extend(second.epoch)
    return first


__all__ = ["SpotCheckpoint", "ResumableBatches", "model_fingerprint"]

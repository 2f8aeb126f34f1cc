"""What a callback in ``model.fit(..., callbacks=[...])`` needs to resume, beyond Keras's public API.

Two things, kept here so that they are easy to find when Keras changes:

- **The first epoch.** A callback cannot choose where ``fit`` starts through any public name;
  Keras's own ``BackupAndRestore`` sets ``model._initial_epoch`` in ``on_train_begin``, and
  every backend's ``fit`` (keras/src/backend/{jax,tensorflow,torch}/trainer.py in Keras
  3.15.1, the version tested) reads ``initial_epoch = self._initial_epoch or initial_epoch`` right after calling
  ``on_train_begin``, and never resets it. :func:`start_fit_at_epoch` is the only place the
  library touches a private name; the callback checks in ``on_epoch_begin`` that ``fit`` did
  start there, so a Keras that stops honouring it fails loudly instead of training from 0.
- **The shortened first epoch.** ``fit`` reads the number of batches of a ``PyDataset`` once,
  before ``on_train_begin``, but the batches of each epoch are fetched through a fresh
  iterator over ``range(len(dataset))``, created after ``on_epoch_begin``
  (keras/src/trainers/epoch_iterator.py, data_adapters/py_dataset_adapter.py). So a
  ``ResumableBatches`` positioned at step k in ``on_epoch_begin`` yields the remaining
  batches of that epoch and then ends it early, which ``fit`` handles as the end of the epoch
  (validation, ``on_epoch_end``), with one warning that the input "ran out of data" — expected
  here, so it is silenced for that epoch only (:class:`ShortEpoch`). On TensorFlow the pull
  that finds the data exhausted happens inside the compiled train step, and the step's
  stateful ops that do not depend on the batch may still run: ``optimizer.iterations``
  advanced by one (measured: 39 steps trained, ``iterations`` 40, and the weights off from
  there on), as may the seed generators'. So the model and optimizer state after the epoch's
  last real step is kept and put back (``settle``); JAX pulls the batch before its step.
"""
from __future__ import annotations

import warnings

import keras
import numpy as np

UNSET = object()


def start_fit_at_epoch(model: keras.Model, epoch: int):
    """Make the ``fit`` now in ``on_train_begin`` start at ``epoch``; returns the previous value.

    The one use of a private Keras name in the library (see the module docstring).
    """
    if not hasattr(model, "_initial_epoch"):
        raise RuntimeError(
            f"this Keras ({keras.__version__}) has no model._initial_epoch, through which "
            "callbacks (BackupAndRestore, SpotCheckpoint) resume at an epoch; use "
            "SpotCheckpoint.fit(model, ...) instead of model.fit")
    previous = model._initial_epoch
    model._initial_epoch = int(epoch)
    return previous


def restore_initial_epoch(model: keras.Model, previous) -> None:
    """Put back what :func:`start_fit_at_epoch` replaced: Keras never resets it, so a later
    ``fit`` of the same model would otherwise start at the restored epoch too."""
    if previous is not UNSET:
        model._initial_epoch = previous


class ShortEpoch:
    """One deliberately short epoch: Keras's "ran out of data" warning silenced, and the extra
    pull at its end undone."""

    MESSAGE = r"Your input ran out of data"

    def __init__(self):
        self._scope: warnings.catch_warnings | None = None
        self._after_last_step: list | None = None

    @property
    def active(self) -> bool:
        return self._scope is not None

    def last_step_done(self, model: keras.Model) -> None:
        """After the epoch's last batch: the state the extra pull must not change."""
        variables = list(model.variables) + list(model.optimizer.variables)
        self._after_last_step = [(v, np.array(keras.ops.convert_to_numpy(v), copy=True))
                                 for v in variables]

    def settle(self) -> None:
        """Before anything reads the state after the epoch (validation, on_epoch_end)."""
        saved, self._after_last_step = self._after_last_step, None
        for variable, value in saved or ():
            if not np.array_equal(keras.ops.convert_to_numpy(variable), value):
                variable.assign(value)

    def enter(self) -> None:
        if self._scope is None:
            self._scope = warnings.catch_warnings()
            self._scope.__enter__()
            warnings.filterwarnings("ignore", message=self.MESSAGE, category=UserWarning)

    def exit(self) -> None:
        self._after_last_step = None
        if self._scope is not None:
            scope, self._scope = self._scope, None
            scope.__exit__(None, None, None)


def merge_history(first, second):
    """One ``History`` from the two ``fit`` calls of ``SpotCheckpoint.fit``."""
    if first is None:
        return second
    if second is None:
        return first
    for key, values in second.history.items():
        first.history.setdefault(key, []).extend(values)
    first.epoch.extend(second.epoch)
    return first

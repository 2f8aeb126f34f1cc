"""The model part of a checkpoint, in Keras's own weights format.

A checkpoint directory holds ``model.weights.h5``, written by ``model.save_weights``: every
layer's weights and the compiled optimizer's variables (slots, ``iterations``), stored by
object structure (``layers/dense_1/vars/0``, ``optimizer/vars/3``), not by a flat position.
Anyone can open it with stock Keras, without spotrun::

    model = build_and_compile()                       # the same architecture and optimizer
    model.optimizer.build(model.trainable_variables)  # else Keras skips the optimizer part
    model.load_weights("<ckpt dir>/model.weights.h5")

Keras's file leaves out one thing exact resume needs: the random seed generators' states
(Dropout's, any ``keras.random.SeedGenerator`` a layer owns); ``model.extra.npz`` holds them,
and the optimizer's variable count so that a restore can tell whether Keras loaded it.
Checkpoints written before this format (``state.npz``, variables by position) still restore.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile

import keras
import numpy as np

from .store import Checkpoint, CheckpointWriteError, IncompatibleCheckpoint

WEIGHTS_FILE = "model.weights.h5"
EXTRA_FILE = "model.extra.npz"
LEGACY_FILE = "state.npz"
_OPTIMIZER_COUNT = "optimizer_variables"


def model_fingerprint(model: keras.Model) -> str:
    """Identity of a model's state layout: variable shapes and dtypes, optimizer class.

    Variable names are left out on purpose: Keras numbers layer names per process
    (``dense_3``), so the same model built twice in one process would differ.
    """
    parts = [f"{tuple(v.shape)}:{v.dtype}" for v in model.variables]
    optimizer = getattr(model, "optimizer", None)
    parts.append(type(optimizer).__name__ if optimizer is not None else "no-optimizer")
    return "keras3-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def capture(model: keras.Model, tmp_dir: str | os.PathLike | None = None) -> dict[str, bytes]:
    """The model's state at this moment, as checkpoint files ``{name: bytes}``.

    Runs synchronously: the bytes are the values of the current step even if they are written
    to the checkpoint later, from another thread, while training goes on. Keras can only save
    weights to a file path, so they go through a temporary file in ``tmp_dir`` (default: the
    system's, normally local disk): never the checkpoint volume, where the store alone writes.
    CheckpointWriteError when that directory cannot take the file.
    """
    where = tmp_dir or tempfile.gettempdir()
    try:
        with tempfile.TemporaryDirectory(prefix="spotrun-capture-", dir=where) as tmp:
            path = os.path.join(tmp, WEIGHTS_FILE)
            model.save_weights(path)
            with open(path, "rb") as fh:
                weights = fh.read()
    except OSError as exc:
        raise CheckpointWriteError(
            f"could not stage {WEIGHTS_FILE} in {where} ({exc}); set TMPDIR to a local "
            f"directory with room for the model and optimizer state") from exc
    arrays = {f"extra_{i}": _host_copy(v) for i, v in enumerate(_extra_variables(model))}
    optimizer = getattr(model, "optimizer", None)
    arrays[_OPTIMIZER_COUNT] = np.int64(-1 if optimizer is None else len(optimizer.variables))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return {WEIGHTS_FILE: weights, EXTRA_FILE: buffer.getvalue()}


def restore(model: keras.Model, checkpoint: Checkpoint) -> None:
    """Load ``checkpoint``'s model and optimizer state into ``model`` (built; compiled to
    restore the optimizer too). IncompatibleCheckpoint, naming the checkpoint, when its
    structure does not fit the model."""
    files = checkpoint.manifest.get("files", {})
    if WEIGHTS_FILE in files:
        _restore_keras(model, checkpoint)
    elif LEGACY_FILE in files:
        _restore_legacy(model, checkpoint)
    else:
        raise IncompatibleCheckpoint(
            f"{checkpoint.path}: holds neither {WEIGHTS_FILE} nor {LEGACY_FILE}; it was not "
            f"written by SpotCheckpoint")


def _extra_variables(model: keras.Model) -> list:
    # model.weights is what save_weights stores; model.variables adds the seed generators'
    # states. Identity, not ==: a backend variable's == compares values elementwise.
    saved = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in saved]


def _build_optimizer(model: keras.Model):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:  # its slots must exist to be loaded
        optimizer.build(model.trainable_variables)
    return optimizer


def _restore_keras(model: keras.Model, checkpoint: Checkpoint) -> None:
    optimizer = _build_optimizer(model)
    weights = checkpoint.file(WEIGHTS_FILE)
    try:
        model.load_weights(str(weights))
    except ValueError as exc:  # what Keras raises when a layer's variables do not fit
        reason = str(exc).strip().splitlines()[-1][:400]
        raise IncompatibleCheckpoint(
            f"{weights}: does not fit this model ({reason}); restore the model definition "
            f"that wrote it, or point the job at a fresh checkpoint directory") from exc
    with np.load(checkpoint.file(EXTRA_FILE), allow_pickle=False) as arrays:
        saved_count = int(arrays[_OPTIMIZER_COUNT])
        # Keras only warns, and loads nothing, when the optimizer's variable count differs.
        if optimizer is not None and saved_count != len(optimizer.variables):
            raise IncompatibleCheckpoint(
                f"{weights}: saved with {saved_count} optimizer variables, this model's "
                f"{type(optimizer).__name__} has {len(optimizer.variables)}; compile it with "
                f"the optimizer that wrote the checkpoint")
        extras = _extra_variables(model)
        saved = sorted((k for k in arrays.files if k.startswith("extra_")),
                       key=lambda k: int(k.split("_", 1)[1]))
        if len(saved) != len(extras):
            raise IncompatibleCheckpoint(
                f"{checkpoint.path / EXTRA_FILE}: {len(saved)} seed-generator states saved, "
                f"this model has {len(extras)}")
        _assign(extras, [arrays[k] for k in saved], checkpoint.path / EXTRA_FILE)


def _restore_legacy(model: keras.Model, checkpoint: Checkpoint) -> None:
    optimizer = _build_optimizer(model)
    with np.load(checkpoint.file(LEGACY_FILE), allow_pickle=False) as arrays:
        groups = [("model", model.variables)]
        if optimizer is not None:
            groups.append(("optimizer", optimizer.variables))
        for prefix, variables in groups:
            keys = sorted((k for k in arrays.files if k.startswith(prefix + "_")),
                          key=lambda k: int(k.rsplit("_", 1)[1]))
            if len(keys) != len(variables):
                raise IncompatibleCheckpoint(
                    f"{checkpoint.path / LEGACY_FILE}: {len(keys)} {prefix} variables saved, "
                    f"the model has {len(variables)}")
            _assign(variables, [arrays[k] for k in keys], checkpoint.path / LEGACY_FILE)


def _assign(variables, values, source) -> None:
    for variable, value in zip(variables, values):
        if tuple(variable.shape) != tuple(value.shape):
            raise IncompatibleCheckpoint(
                f"{source}: {variable.path} has shape {tuple(variable.shape)}, the checkpoint "
                f"holds {tuple(value.shape)}")
        variable.assign(value)


def _host_copy(variable) -> np.ndarray:
    # A real copy: JAX donates a variable's buffer to the next step.
    return np.array(keras.ops.convert_to_numpy(variable), copy=True)

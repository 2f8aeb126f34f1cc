"""The model part of a checkpoint: Keras's own ``model.weights.h5``, openable without spotrun.

The backend tests run in subprocesses (this test process's Keras is fixed to JAX by
conftest.py); the mismatch and legacy tests run here, on JAX.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from spotrun_trainer import modelstate
from spotrun_trainer.store import CheckpointStore, CheckpointWriteError, IncompatibleCheckpoint
from tests.trainer.test_resume import TOTAL_STEPS, final_weights, run_job

# The model both the spotrun side and the stock-Keras side build: Dense, BatchNormalization
# (non-trainable statistics), Dropout (a seed generator), Adam with a schedule (slots and
# iterations). Plain Keras only, so that the stock script can use it without spotrun.
MODEL_CODE = textwrap.dedent("""
    import keras
    def build_model(seed=1234, units=16, optimizer="adam", dropout=True):
        keras.utils.set_random_seed(seed)
        layers = [keras.Input((12,)), keras.layers.Dense(units, activation="relu"),
                  keras.layers.BatchNormalization()]
        if dropout:
            layers.append(keras.layers.Dropout(0.25))
        model = keras.Sequential(layers + [keras.layers.Dense(3)])
        if optimizer == "adam":
            schedule = keras.optimizers.schedules.ExponentialDecay(0.02, 5, 0.9)
            opt = keras.optimizers.Adam(schedule)
        else:
            opt = keras.optimizers.SGD(0.1)
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True))
        return model
    def train(model, steps, seed=7):
        import numpy as np
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 3, 16 * steps)
        x = rng.normal(size=(16 * steps, 12)).astype("float32") + y[:, None]
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    def state(model):
        # Everything the next step depends on, by role: weights, optimizer, seed states.
        import numpy as np
        to_np = lambda v: np.array(keras.ops.convert_to_numpy(v))
        out = {f"weight_{i}": to_np(v) for i, v in enumerate(model.weights)}
        out.update({f"optimizer_{i}": to_np(v) for i, v in enumerate(model.optimizer.variables)})
        weights = {id(v) for v in model.weights}
        out.update({f"other_{i}": to_np(v) for i, v in
                    enumerate(v for v in model.variables if id(v) not in weights)})
        return out
""")
_model_ns: dict = {}
exec(MODEL_CODE, _model_ns)  # noqa: S102 - the same code the subprocesses run
build_model, train, state = _model_ns["build_model"], _model_ns["train"], _model_ns["state"]

# With spotrun: train, capture, train on (the capture must keep the values of its moment),
# checkpoint, restore into a differently initialised model.
SPOTRUN_SIDE = MODEL_CODE + textwrap.dedent("""
    import sys, numpy as np
    from spotrun_trainer import modelstate
    from spotrun_trainer.store import CheckpointStore
    ckpt_dir, out = sys.argv[1], sys.argv[2]
    model = build_model()
    train(model, 6)
    files = modelstate.capture(model)
    np.savez(out + "/captured.npz", **state(model))
    train(model, 3, seed=8)
    checkpoint = CheckpointStore(ckpt_dir).save(files, step=6, epoch=0, step_in_epoch=6)
    other = build_model(seed=99)
    modelstate.restore(other, CheckpointStore(ckpt_dir).latest_valid())
    np.savez(out + "/restored.npz", **state(other))
    print(checkpoint.path)
""")

# Without spotrun: what a user does with a checkpoint directory and stock Keras.
STOCK_SIDE = MODEL_CODE + textwrap.dedent("""
    import sys, numpy as np
    model = build_model(seed=5)
    model.optimizer.build(model.trainable_variables)  # else Keras skips the optimizer part
    model.load_weights(sys.argv[1] + "/model.weights.h5")
    assert not any(m.startswith("spotrun") for m in sys.modules), "spotrun was imported"
    np.savez(sys.argv[2] + "/stock.npz", **state(model))
""")


# keras_job.py's model, written out again: keras_job imports spotrun_trainer.
STOCK_KERAS_JOB = textwrap.dedent("""
    import json, sys, keras, numpy as np
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dropout(0.25), keras.layers.Dense(3)])
    schedule = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=5, decay_rate=0.9)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss="sparse_categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    model.load_weights(sys.argv[1])
    assert not any(m.startswith("spotrun") for m in sys.modules), "spotrun was imported"
    np.savez(sys.argv[2], *[keras.ops.convert_to_numpy(v) for v in model.weights])
    print(json.dumps({"iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations))}))
""")


def _run(code: str, backend: str, *args: str) -> str:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
               TF_DETERMINISTIC_OPS="1")
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _load(path: Path) -> dict:
    with np.load(path) as arrays:
        return {k: arrays[k] for k in arrays.files}


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_checkpoint_restores_everything_and_opens_with_stock_keras(tmp_path, backend):
    ckpt = Path(_run(SPOTRUN_SIDE, backend, str(tmp_path / "ck"), str(tmp_path))
                .strip().splitlines()[-1])
    captured, restored = _load(tmp_path / "captured.npz"), _load(tmp_path / "restored.npz")
    assert captured.keys() == restored.keys()
    assert any(k.startswith("other_") for k in captured), "the Dropout seed state is missing"
    for key in captured:  # weights, optimizer slots and iterations, seed state: all of them
        np.testing.assert_array_equal(restored[key], captured[key], err_msg=key)
    assert int(restored["optimizer_0"]) == 6  # iterations: the capture's, not the 9 after it
    assert any(np.abs(v).sum() > 0 for k, v in restored.items() if k.startswith("optimizer_")
               and v.ndim)

    assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json", modelstate.EXTRA_FILE,
                                                     modelstate.WEIGHTS_FILE]
    _run(STOCK_SIDE, backend, str(ckpt), str(tmp_path))
    stock = _load(tmp_path / "stock.npz")
    for key in (k for k in captured if not k.startswith("other_")):
        np.testing.assert_array_equal(stock[key], captured[key], err_msg=key)


@pytest.mark.parametrize("backend", ["jax", pytest.param("tensorflow", marks=pytest.mark.slow)])
def test_spot_fit_checkpoints_open_with_stock_keras(tmp_path, backend):
    """The product path: the last checkpoint of a spot.fit run, loaded by a plain script."""
    run_job(tmp_path, "run", backend)
    final = CheckpointStore(tmp_path / "run").latest_valid()
    out = _run(STOCK_KERAS_JOB, backend, str(final.path / modelstate.WEIGHTS_FILE),
               str(tmp_path / "stock.npz"))
    assert json.loads(out.strip().splitlines()[-1])["iterations"] == TOTAL_STEPS
    stock = list(_load(tmp_path / "stock.npz").values())
    want = final_weights(tmp_path, "run")  # what the training process held after fit
    assert len(stock) == len(want)
    for got, expected in zip(stock, want):
        np.testing.assert_array_equal(got, expected)


def _checkpoint(tmp_path: Path, model, name="ck"):
    store = CheckpointStore(tmp_path / name)
    store.save(modelstate.capture(model), step=3, epoch=0, step_in_epoch=3)
    return store.latest_valid()


@pytest.fixture(scope="module")
def trained():
    model = build_model()
    train(model, 3)
    return model


@pytest.mark.parametrize("other, words", [
    (dict(units=17), "does not fit this model"),           # a layer's shape (Keras raises)
    (dict(optimizer="sgd"), "optimizer variables"),         # Keras only warns and loads nothing
    (dict(dropout=False), "seed-generator states"),         # a Dropout more or less
])
def test_a_checkpoint_of_another_model_is_refused_naming_it(tmp_path, trained, other, words):
    checkpoint = _checkpoint(tmp_path, trained)
    with pytest.raises(IncompatibleCheckpoint, match=words) as raised:
        modelstate.restore(build_model(**other), checkpoint)
    assert str(checkpoint.path) in str(raised.value)


def test_restore_takes_an_unbuilt_optimizer_and_builds_it(tmp_path, trained):
    checkpoint = _checkpoint(tmp_path, trained)
    model = build_model(seed=3)
    assert not model.optimizer.built
    modelstate.restore(model, checkpoint)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 3
    for key, value in state(trained).items():
        np.testing.assert_array_equal(state(model)[key], value, err_msg=key)


def test_checkpoints_of_the_previous_format_still_restore(tmp_path, trained):
    # state.npz as SpotCheckpoint wrote it before model.weights.h5: variables by position.
    arrays = {f"model_{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(trained.variables)}
    arrays.update({f"optimizer_{i}": keras.ops.convert_to_numpy(v)
                   for i, v in enumerate(trained.optimizer.variables)})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    store = CheckpointStore(tmp_path / "old")
    store.save({"state.npz": buffer.getvalue(), "training.json": json.dumps({}).encode()},
               step=3, epoch=0, step_in_epoch=3)
    model = build_model(seed=3)
    modelstate.restore(model, store.latest_valid())
    for key, value in state(trained).items():
        np.testing.assert_array_equal(state(model)[key], value, err_msg=key)

    with pytest.raises(IncompatibleCheckpoint, match="model variables saved"):
        modelstate.restore(build_model(dropout=False), store.latest_valid())


def test_capture_says_where_it_could_not_stage_the_weights(tmp_path, trained):
    with pytest.raises(CheckpointWriteError, match=f"{tmp_path / 'missing'}.*TMPDIR"):
        modelstate.capture(trained, tmp_dir=tmp_path / "missing")


def test_a_checkpoint_without_model_state_is_refused(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    store.save({"notes.txt": b"x"}, step=1, epoch=0, step_in_epoch=1)
    with pytest.raises(IncompatibleCheckpoint, match="neither model.weights.h5 nor state.npz"):
        modelstate.restore(build_model(), store.latest_valid())

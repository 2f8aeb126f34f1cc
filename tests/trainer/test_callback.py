"""SpotCheckpoint and ResumableBatches in-process (JAX backend, see conftest.py)."""
from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from spotrun_trainer import IncompatibleCheckpoint, ResumableBatches, SpotCheckpoint
from spotrun_trainer.callback import model_fingerprint


def make_model(width=8, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(width, activation="relu"),
                              keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def arrays(n=40):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    return rng.normal(size=(n, 4)).astype("float32") + y[:, None], y


def test_batches_order_is_a_function_of_seed_and_epoch_and_can_start_mid_epoch():
    x, y = np.arange(10)[:, None], np.arange(10)
    a, b = ResumableBatches(x, y, 3, seed=5), ResumableBatches(x, y, 3, seed=5)
    assert len(a) == 4 and a.steps_per_epoch == 4
    a.epoch = b.epoch = 1
    assert [list(a[i][1]) for i in range(4)] == [list(b[i][1]) for i in range(4)]
    a.epoch = 2
    assert sorted(np.concatenate([a[i][1] for i in range(4)])) == list(range(10))
    epoch2 = [list(a[i][1]) for i in range(4)]
    b.set_position(2, 2)
    assert len(b) == 2 and [list(b[i][1]) for i in range(2)] == epoch2[2:]
    with pytest.raises(IndexError):
        b[2]
    with pytest.raises(ValueError, match="start_step"):
        b.set_position(0, 4)
    with pytest.raises(ValueError, match="samples"):
        ResumableBatches(x, y[:3], 3)


def test_plain_model_fit_checkpoints_and_restore_roundtrips(tmp_path):
    x, y = arrays()
    model = make_model()
    progress = tmp_path / "progress.json"
    spot = SpotCheckpoint(tmp_path, every_seconds=None, every_steps=3, progress_file=progress)
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[spot], verbose=0)
    latest = spot.store.latest_valid()
    assert latest.step == 10 and latest.epoch == 2 and latest.step_in_epoch == 0
    assert json.loads(progress.read_text())["global_step"] == 10
    fresh = make_model(seed=1)
    restored = SpotCheckpoint(tmp_path)
    assert restored.restore(fresh).step == 10
    assert restored.initial_epoch == 2
    for a, b in zip(model.variables + model.optimizer.variables,
                    fresh.variables + fresh.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    assert int(keras.ops.convert_to_numpy(fresh.optimizer.iterations)) == 10


def test_other_model_is_refused_with_the_checkpoint_named(tmp_path):
    x, y = arrays()
    SpotCheckpoint(tmp_path, every_seconds=None).fit(make_model(), x, y, batch_size=8, epochs=1,
                                                     verbose=0)
    other = make_model(width=16)
    assert model_fingerprint(other) != model_fingerprint(make_model())
    with pytest.raises(IncompatibleCheckpoint, match=r"spotrun/ckpt-\d{12}: written for model"):
        SpotCheckpoint(tmp_path).restore(other)


def test_request_stop_saves_and_fit_returns_when_exit_disabled(tmp_path):
    x, y = arrays(80)

    class StopAtStep(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                spot.request_stop()

    spot = SpotCheckpoint(tmp_path, every_seconds=None, exit_on_stop=False)
    model = make_model()
    spot.fit(model, x, y, batch_size=8, epochs=3, callbacks=[StopAtStep()], verbose=0)
    assert spot.stopped_by_signal
    latest = spot.store.latest_valid()
    assert (latest.epoch, latest.step_in_epoch, latest.step) == (0, 3, 3)
    # The next run (same process here) continues at epoch 0, step 3.
    again = SpotCheckpoint(tmp_path, every_seconds=None)
    model2 = make_model()
    again.fit(model2, x, y, batch_size=8, epochs=3, verbose=0)
    assert again.global_step == 30 and again.store.latest_valid().step == 30


def test_fit_refuses_arguments_it_owns(tmp_path):
    x, y = arrays()
    with pytest.raises(TypeError, match="initial_epoch"):
        SpotCheckpoint(tmp_path).fit(make_model(), x, y, initial_epoch=1)
    with pytest.raises(ValueError, match="compile"):
        SpotCheckpoint(tmp_path).restore(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))


def test_stop_during_validation_checkpoints_the_finished_epoch(tmp_path):
    x, y = arrays(40)

    class StopWhileValidating(keras.callbacks.Callback):
        def on_test_batch_end(self, batch, logs=None):
            spot.request_stop()

    spot = SpotCheckpoint(tmp_path, every_seconds=None, exit_on_stop=False)
    history = spot.fit(make_model(), x, y, batch_size=8, epochs=3, validation_data=(x, y),
                       callbacks=[StopWhileValidating()], verbose=0)
    assert spot.stopped_by_signal and history is None  # stopped inside the first epoch's fit
    latest = spot.store.latest_valid()
    assert (latest.epoch, latest.step_in_epoch, latest.step) == (0, 5, 5)
    resumed = SpotCheckpoint(tmp_path, every_seconds=None)
    resumed.restore(make_model())
    assert (resumed.epoch, resumed.step_in_epoch, resumed.initial_epoch) == (1, 0, 1)

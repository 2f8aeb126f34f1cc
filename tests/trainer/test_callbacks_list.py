"""``model.fit(..., callbacks=[SpotCheckpoint(...)])``, in-process (JAX backend, see conftest.py).

A stop here is ``spot.request_stop()`` from a callback, what the SIGTERM handler does; the real
signals, in fresh processes and on both backends, are in test_resume.py.
"""
from __future__ import annotations

import json
import logging

import keras
import numpy as np
import pytest

from spotrun_trainer import ResumableBatches, SpotCheckpoint
from spotrun_trainer.protocol import COMPLETION_FILE, STOPPED_EXIT_CODE

N, BATCH, EPOCHS = 40, 8, 3  # 5 steps an epoch, 15 in all


def make_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dropout(0.2), keras.layers.Dense(2)])
    schedule = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=3, decay_rate=0.8)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def arrays(n=N):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    return rng.normal(size=(n, 4)).astype("float32") + y[:, None], y


def values(model):
    return [keras.ops.convert_to_numpy(v) for v in model.variables + model.optimizer.variables]


def iterations(model):
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


@pytest.fixture
def library_events():
    """The library's log records, taken at its own logger: under the agent's environment its
    records do not propagate to the root logger, where caplog listens."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("spotrun_trainer")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


class StopAt(keras.callbacks.Callback):
    """Asks ``spot`` to stop after this fit's ``step``-th step, as its SIGTERM handler does."""

    def __init__(self, spot, step):
        super().__init__()
        self.spot, self.step, self.trained = spot, step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.trained += 1
        if self.trained == self.step:
            self.spot.request_stop()


def test_a_second_run_restores_weights_optimizer_and_epoch(tmp_path):
    """Regression (issue 16): the callbacks-list use never restored; a rerun trained from 0."""
    x, y = arrays()
    first = make_model(seed=0)
    first.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[SpotCheckpoint(tmp_path)])
    # The same job rerun (a fresh process would build a fresh model): nothing left to train.
    again, spot = make_model(seed=1), SpotCheckpoint(tmp_path)
    history = again.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[spot])
    assert spot.restored is not None and history.epoch == []
    for a, b in zip(values(first), values(again)):
        np.testing.assert_array_equal(a, b)
    # More epochs asked for: it goes on at epoch 2, with the optimizer's step count carried on.
    more = make_model(seed=2)
    history = more.fit(x, y, batch_size=BATCH, epochs=3, verbose=0, callbacks=[SpotCheckpoint(tmp_path)])
    assert history.epoch == [2] and iterations(more) == 15
    # The hook is put back: a later plain fit of the same model starts where it is told.
    assert more.fit(x, y, batch_size=BATCH, epochs=1, verbose=0).epoch == [0]


def test_a_stop_mid_epoch_exits_75_and_a_positioned_resume_is_exact(tmp_path, recwarn):
    x, y = arrays()
    straight = make_model()
    batches = ResumableBatches(x, y, BATCH, seed=3)
    straight.fit(batches, epochs=EPOCHS, shuffle=False, verbose=0,
                 callbacks=[SpotCheckpoint(tmp_path / "straight", data=batches, every_seconds=None)])

    batches = ResumableBatches(x, y, BATCH, seed=3)
    spot = SpotCheckpoint(tmp_path / "run", data=batches, every_seconds=None)
    with pytest.raises(SystemExit) as stopped:  # from fit: no code after it runs
        make_model().fit(batches, epochs=EPOCHS, shuffle=False, verbose=0,
                         callbacks=[StopAt(spot, 8), spot])
    assert stopped.value.code == STOPPED_EXIT_CODE == 75
    assert (spot.store.latest_valid().epoch, spot.store.latest_valid().step_in_epoch) == (1, 3)
    assert not (tmp_path / "run" / COMPLETION_FILE).exists()

    resumed, batches = make_model(seed=9), ResumableBatches(x, y, BATCH, seed=3)
    spot = SpotCheckpoint(tmp_path / "run", data=batches, every_seconds=None)
    history = resumed.fit(batches, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[spot])
    assert history.epoch == [1, 2] and spot.global_step == 15 and iterations(resumed) == 15
    for a, b in zip(values(straight), values(resumed)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # The short first epoch ends by running out of batches; Keras's warning about it is ours.
    assert not [w for w in recwarn if "ran out of data" in str(w.message)]
    assert json.loads((tmp_path / "run" / COMPLETION_FILE).read_text())["global_step"] == 15


def test_arrays_resume_at_the_epoch_start_and_say_how_many_steps_are_replayed(tmp_path,
                                                                              library_events):
    x, y = arrays()
    spot = SpotCheckpoint(tmp_path, every_seconds=None)
    with pytest.raises(SystemExit):
        make_model().fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0,
                         callbacks=[StopAt(spot, 7), spot])
    model, spot = make_model(), SpotCheckpoint(tmp_path, every_seconds=None)
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0, callbacks=[spot])
    (warning,) = [r for r in library_events if r.getMessage() == "training_resumed_at_epoch_start"]
    assert warning.levelname == "WARNING"
    assert warning.spotrun_fields["replayed_steps"] == 2 and warning.spotrun_fields["epoch"] == 1
    assert "ResumableBatches" in warning.spotrun_fields["how_to_avoid"]
    # Epoch 1 trained whole again: the 2 steps done before the stop are done twice.
    assert history.epoch == [1, 2] and iterations(model) == 15 + 2
    assert spot.global_step == 15 and spot.store.latest_valid().step == 15


def test_keras_shuffling_the_batches_is_refused(tmp_path):
    x, y = arrays(200)  # 25 batches: the first shuffled request is batch 0 with p = 1/25
    batches = ResumableBatches(x, y, BATCH)
    with pytest.raises(ValueError, match="shuffle=False"):
        make_model().fit(batches, epochs=1, verbose=0,  # shuffle=True, Keras's default
                         callbacks=[SpotCheckpoint(tmp_path, data=batches, every_seconds=None)])


def test_data_that_is_not_the_fits_input_is_refused(tmp_path):
    x, y = arrays()
    with pytest.raises(ValueError, match="5 steps an epoch, the ResumableBatches has 3"):
        make_model().fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[
            SpotCheckpoint(tmp_path, data=ResumableBatches(x[:24], y[:24], BATCH))])
    with pytest.raises(TypeError, match="data must be the ResumableBatches"):
        SpotCheckpoint(tmp_path, data=(x, y))


def test_initial_epoch_against_the_checkpoint_is_an_error_not_a_silent_skip(tmp_path):
    x, y = arrays()
    spot = SpotCheckpoint(tmp_path, every_seconds=None, exit_on_stop=False)
    make_model().fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0, callbacks=[StopAt(spot, 3), spot])
    with pytest.raises(RuntimeError, match="do not pass initial_epoch"):
        make_model().fit(x, y, batch_size=BATCH, epochs=EPOCHS, initial_epoch=2, verbose=0,
                         callbacks=[SpotCheckpoint(tmp_path)])


def test_exit_on_stop_false_returns_and_leaves_no_completion_record(tmp_path):
    x, y = arrays()
    record = tmp_path / COMPLETION_FILE
    record.write_text("{}")  # an earlier run's: this one did not finish
    spot = SpotCheckpoint(tmp_path, every_seconds=None, exit_on_stop=False)
    history = make_model().fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0,
                               validation_data=(x, y), callbacks=[StopAt(spot, 7), spot])
    assert spot.stopped_by_signal and history.epoch == [0, 1]
    assert spot.store.latest_valid().step == 7 and not record.exists()


def test_early_stopping_is_a_normal_end(tmp_path):
    x, y = arrays()
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=100)  # after epoch 2
    spot = SpotCheckpoint(tmp_path, every_seconds=None)
    history = make_model().fit(x, y, batch_size=BATCH, epochs=10, verbose=0, callbacks=[stop, spot])
    assert history.epoch == [0, 1]
    record = json.loads((tmp_path / COMPLETION_FILE).read_text())
    assert (record["global_step"], record["epoch"]) == (10, 2)
    assert record["checkpoint"] == spot.store.latest_valid().path.name


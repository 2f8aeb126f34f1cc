"""What SpotCheckpoint tells the agent (protocol.py): the hello when training starts, the
completion record at a normal end, nothing of the kind while training or after a stop.
In-process, JAX backend (conftest.py); test_resume.py has the same with real signals."""
from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from spotrun_trainer import SpotCheckpoint
from spotrun_trainer.protocol import COMPLETION_ENV, COMPLETION_FILE, HELLO_ENV


def make_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def arrays(n=32):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype("float32"), rng.integers(0, 2, n)


class Look(keras.callbacks.Callback):
    """What an observer sees at the first step: the files as they are while training."""

    def __init__(self, *paths):
        super().__init__()
        self.paths, self.seen = paths, None

    def on_train_batch_begin(self, batch, logs=None):
        if self.seen is None:
            self.seen = [json.loads(p.read_text()) if p.exists() else None for p in self.paths]


@pytest.fixture
def agent_env(tmp_path, monkeypatch):
    hello, done = tmp_path / "agent" / "hello.json", tmp_path / "agent" / "done.json"
    monkeypatch.setenv(HELLO_ENV, str(hello))
    monkeypatch.setenv(COMPLETION_ENV, str(done))
    return hello, done


@pytest.mark.parametrize("handle_signals", [True, False])
def test_hello_is_written_as_training_starts_and_lists_the_signals_handled(tmp_path, agent_env,
                                                                          handle_signals):
    hello, _ = agent_env
    x, y = arrays()
    look = Look(hello)
    make_model().fit(x, y, epochs=1, verbose=0, callbacks=[
        look, SpotCheckpoint(tmp_path / "ck", handle_signals=handle_signals)])
    (seen,) = look.seen
    assert seen is not None, "no hello when the first step began"
    assert seen["handles"] == (["SIGTERM", "SIGUSR1"] if handle_signals else [])
    assert seen["protocol"] == 1 and seen["library"] == "spotrun_trainer"


def test_no_hello_without_the_agent(tmp_path, monkeypatch):
    monkeypatch.delenv(HELLO_ENV, raising=False)
    monkeypatch.delenv(COMPLETION_ENV, raising=False)
    x, y = arrays()
    make_model().fit(x, y, epochs=1, verbose=0, callbacks=[SpotCheckpoint(tmp_path)])
    # Outside the agent the completion record still goes next to the checkpoints; no hello.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [COMPLETION_FILE]


def test_completion_record_at_a_normal_end_withdrawn_while_training(tmp_path, agent_env):
    _, done = agent_env
    done.parent.mkdir()
    done.write_text(json.dumps({"protocol": 1, "time": 0, "global_step": 999}))  # stale
    x, y = arrays()
    look = Look(done)
    spot = SpotCheckpoint(tmp_path / "ck", every_seconds=None)
    spot.fit(make_model(), x, y, batch_size=8, epochs=2, callbacks=[look], verbose=0)
    assert look.seen == [None], "a completion record must not exist while training"
    record = json.loads(done.read_text())
    assert (record["global_step"], record["epoch"]) == (8, 2)
    assert record["checkpoint"] == spot.store.latest_valid().path.name
    assert "final_metrics" not in record
    spot.write_final_metrics({"test_accuracy": np.float32(0.75)})
    assert json.loads(done.read_text())["final_metrics"] == {"test_accuracy": 0.75}


def test_a_stop_withdraws_the_completion_record_of_an_earlier_fit(tmp_path, agent_env):
    _, done = agent_env
    x, y = arrays()
    spot = SpotCheckpoint(tmp_path / "ck", every_seconds=None, exit_on_stop=False)
    model = make_model()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[spot])
    assert done.exists() and spot.completion["global_step"] == 4
    spot.request_stop()  # a SIGTERM between two fits of one script
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[spot])
    assert spot.stopped_by_signal and not done.exists() and spot.completion is None
    spot.write_final_metrics({"loss": 1.0})  # the script goes on: still not done
    assert not done.exists()

"""tf.data input: exact resume for a deterministic pipeline, a warning where it cannot be exact.

The resume tests run keras_job.py (the same job, model and samples as test_resume.py's, fed
through tf.data) on the TensorFlow backend with a real SIGTERM at a random step.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow as tf

from spotrun_trainer import SpotCheckpoint
from spotrun_trainer.protocol import STOPPED_EXIT_CODE
from spotrun_trainer.tfdata import ResumableTFDataset, is_dataset
from tests.trainer.test_resume import (ATOL, STEPS_PER_EPOCH, TOTAL_STEPS, final_weights,
                                       interrupted_then_resumed, journal_events, protocol_env,
                                       random_mid_epoch_step, run_job, steps_trained)


def numbers(n=10):
    return tf.data.Dataset.range(n)


def batches(dataset) -> list[list[int]]:
    return [b.tolist() for b in dataset.as_numpy_iterator()]


@pytest.fixture
def warnings_logged(caplog):
    caplog.set_level(logging.WARNING, logger="spotrun_trainer")
    return lambda: [r for r in caplog.records if r.getMessage() == "tfdata_resume_not_exact"]


def test_a_fixed_dataset_is_positioned_by_skipping(warnings_logged):
    data = ResumableTFDataset(numbers().shuffle(10, seed=3, reshuffle_each_iteration=False)
                              .batch(4))
    order = batches(data.dataset_for(0))
    assert data.steps_per_epoch == 3 and len(order) == 3
    data.set_position(5, 2)
    assert len(data) == 1
    assert batches(data.fit_input(6)["x"]) == order[2:]
    data.set_position(6, 0)
    whole = data.fit_input(9)
    assert "steps_per_epoch" not in whole  # Keras iterates the dataset once per epoch
    assert batches(whole["x"]) == order
    assert data.describe() == {"kind": "tf.data", "per_epoch": False, "name": None,
                               "steps_per_epoch": 3,
                               "element_spec": repr(tf.TensorSpec((None,), tf.int64))}
    assert warnings_logged() == []


def test_an_epoch_function_gives_each_epoch_its_own_order(warnings_logged):
    def make(epoch):
        return numbers().shuffle(10, seed=100 + epoch).batch(4)
    data = ResumableTFDataset(make)
    assert data.describe()["per_epoch"] is True
    data.set_position(2, 1)
    assert batches(data.fit_input(3)["x"]) == batches(make(2))[1:]
    data.set_position(2, 0)
    rest = data.fit_input(5)
    assert rest["steps_per_epoch"] == 3  # the epoch boundaries inside the concatenation
    assert batches(rest["x"]) == batches(make(2)) + batches(make(3)) + batches(make(4))
    assert batches(make(2)) != batches(make(3))
    assert warnings_logged() == []
    with pytest.raises(ValueError, match="only that epoch"):
        data.set_position(1, 2)
        data.fit_input(3)


@pytest.mark.parametrize("dataset, words", [
    (numbers().repeat().batch(4), "infinite"),
    (numbers().filter(lambda v: v > 2).batch(4), "unknown number of batches"),
    (numbers().take(0), "empty"),
])
def test_a_dataset_without_a_known_length_is_refused(dataset, words):
    with pytest.raises(ValueError, match=words):
        ResumableTFDataset(dataset)


def test_an_epoch_function_must_keep_the_epoch_length():
    data = ResumableTFDataset(lambda epoch: numbers(10 + 4 * epoch).batch(4))
    with pytest.raises(ValueError, match="the dataset of epoch 1 has 4 batches, epoch 0's has 3"):
        data.dataset_for(1)
    with pytest.raises(TypeError, match="returned list for epoch 0"):
        ResumableTFDataset(lambda epoch: [1, 2])
    with pytest.raises(TypeError, match="tf.data.Dataset or a function"):
        ResumableTFDataset(np.arange(3))


def test_reshuffling_and_unseeded_shuffles_are_warned_about(warnings_logged):
    tf.random.set_seed(None)  # no global seed (another test may have set one): seeds as written
    reshuffled = numbers().shuffle(10, seed=3).batch(4)  # reshuffle_each_iteration defaults on
    assert ResumableTFDataset(reshuffled).not_exact
    (record,) = warnings_logged()
    assert "reshuffles on each pass" in str(record.spotrun_fields["reasons"])
    unseeded = ResumableTFDataset(lambda epoch: numbers().shuffle(10).batch(4))
    assert any("has no seed" in reason for reason in unseeded.not_exact)
    # Why the first is not exact: a pass's order depends on the passes made before it in this
    # process, and a restarted process starts counting again (a new object, the same seed).
    first, second = batches(reshuffled), batches(reshuffled)
    assert first != second
    assert batches(numbers().shuffle(10, seed=3).batch(4)) == first


@pytest.mark.parametrize("data", [numbers().batch(4), ResumableTFDataset(numbers().batch(4))])
def test_a_tfdata_input_as_the_callbacks_data_is_refused_naming_spot_fit(tmp_path, data):
    """Keras iterates a dataset given to model.fit through its own iterator, made before
    on_train_begin: the callback cannot start it at a step, spot.fit can."""
    with pytest.raises(TypeError, match=r"data must be the ResumableBatches .* tf\.data input "
                                        r"resumes at the step through spot\.fit\(model, dataset"):
        SpotCheckpoint(tmp_path, data=data)


def test_is_dataset_needs_no_tensorflow_import():
    assert is_dataset(numbers()) and not is_dataset([1, 2]) and not is_dataset(np.arange(3))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tfdata", "tfdata-epochs"])
def test_sigterm_mid_epoch_then_resume_matches_uninterrupted(tmp_path, mode):
    run_job(tmp_path, "ref", "tensorflow", "--mode", mode)
    assert steps_trained(tmp_path, "ref") == [TOTAL_STEPS]
    sigterm_at, runs = interrupted_then_resumed(tmp_path, "tensorflow", "--mode", mode)
    assert len(runs) == 2 and runs[0] in (sigterm_at, sigterm_at + 1), runs
    assert TOTAL_STEPS <= sum(runs) <= TOTAL_STEPS + 1, runs
    for got, want in zip(final_weights(tmp_path, "run"), final_weights(tmp_path, "ref")):
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_model_fit_with_a_dataset_replays_the_interrupted_epoch_and_says_how_many_steps(tmp_path):
    """model.fit(dataset, callbacks=[..., SpotCheckpoint()]): restored at the epoch boundary,
    the steps of the interrupted epoch trained again, the count in a warning."""
    sigterm_at, epoch, in_epoch = random_mid_epoch_step()
    env = protocol_env(tmp_path)
    run_job(tmp_path, "run", "tensorflow", "--mode", "tfdata-callbacks", "--sigterm-at-step",
            str(sigterm_at), expect_rc=STOPPED_EXIT_CODE, env=env)
    second = run_job(tmp_path, "run", "tensorflow", "--mode", "tfdata-callbacks", env=env)
    first_run, second_run = steps_trained(tmp_path, "run")
    replayed = first_run - epoch * STEPS_PER_EPOCH
    assert replayed in (in_epoch, in_epoch + 1)
    assert second_run == TOTAL_STEPS - epoch * STEPS_PER_EPOCH  # its epoch whole, then the rest
    (warning,) = [fields for prio, fields in journal_events(second.stderr)
                  if fields["event"] == "training_resumed_at_epoch_start" and prio == 4]
    assert warning["replayed_steps"] == replayed and warning["epoch"] == epoch
    assert "tf.data.Dataset" in warning["how_to_avoid"]


@pytest.mark.slow
def test_a_reshuffling_dataset_resumes_at_the_step_with_a_warning(tmp_path):
    """Not exact (another permutation after the restart), but nothing is replayed: the
    documented replay count for a tf.data input is 0 steps, as for the exact inputs."""
    _, runs = interrupted_then_resumed(tmp_path, "tensorflow", "--mode", "tfdata-reshuffle")
    assert TOTAL_STEPS <= sum(runs) <= TOTAL_STEPS + 1, runs
    # Started once more on the finished checkpoints: it trains nothing, and says at start
    # that this input does not resume exactly.
    proc = run_job(tmp_path, "again", "tensorflow", "--mode", "tfdata-reshuffle", ckpt="run")
    assert "tfdata_resume_not_exact" in proc.stdout + proc.stderr
    assert not (tmp_path / "again.json").exists()

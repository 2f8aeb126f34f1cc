"""Figure 2's count (bench/schemes.py): every scheme counted by the trainer's witness — batches
run per process and each run's data start, the optimizer's restored iteration count as a
second count — with the SIGTERM sent from outside the trainer; and a planted fault (a resume
from step 0) that the count must show. Real trainer processes (Keras 3 on JAX), a 12-step job."""
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench import schemes

JOB = schemes.Job(epochs=3, samples=128, batch_size=32, save_steps=2, interruptions=1, positions=(5,))


def _forget_checkpoints(index: int, directory: Path) -> None:
    """The planted fault: the replacement finds no checkpoint and trains from step 0."""
    if index == 1:
        shutil.rmtree(directory)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("schemes")
    jobs = {"spotrun": ("spotrun", None), "bnr-term": ("bnr-term", None),
            "restarts-from-0": ("spotrun", _forget_checkpoints)}
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {key: pool.submit(schemes.run_scheme, scheme, JOB, work / key, 240.0, hook)
                   for key, (scheme, hook) in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def _consistent(run: schemes.SchemeRun) -> None:
    first, second = run.runs
    assert first["sigterm_sent_at"] >= JOB.schedule()[0]  # sent from outside, once reached
    assert first["reached"] >= first["sigterm_sent_at"]  # trained on until the signal landed
    assert second["resumed_at"] <= first["reached"]
    assert second["resumed_at_iterations"] <= first["reached_iterations"]
    for entry in run.runs:  # the Keras epoch count agrees with the run's data start
        assert entry["resumed_at_by_epoch_end"] in (None, entry["resumed_at"])
    assert second["reached"] == JOB.total_steps == run.finished_at
    assert run.executed == first["batches_run"] + second["batches_run"] >= JOB.total_steps
    assert sum(run.redone) == run.redone_total == run.executed - JOB.total_steps


@pytest.mark.bench
def test_spotrun_resumes_at_the_step_it_reached_by_the_witness_count(results):
    run = results["spotrun"]
    _consistent(run)
    first, second = run.runs
    assert first["returncode"] == 75  # stopped, not done: it checkpointed on the SIGTERM
    assert second["resumed_at"] == first["reached"]
    assert second["resumed_at_iterations"] == first["reached_iterations"]
    assert run.redone == run.redone_by_iterations == [0]


@pytest.mark.bench
def test_backup_and_restore_with_a_sigterm_save_keeps_the_step_but_replays_the_epoch(results):
    """bnr-term: the optimizer count says nothing lost, the data stream says the epoch so far
    was fed again — the two counts differ by design, and the figure takes the data's."""
    run = results["bnr-term"]
    _consistent(run)
    first, second = run.runs
    assert first["returncode"] == 0  # the handler backed up and exited
    assert run.redone_by_iterations == [0]
    epoch_start = first["reached"] - (first["reached"] - 1) % JOB.steps_per_epoch - 1
    assert second["resumed_at"] == epoch_start
    assert run.redone == [first["reached"] - epoch_start] and run.redone[0] >= 1


@pytest.mark.bench
def test_a_resume_from_step_0_shows_every_step_reached_as_redone(results):
    run = results["restarts-from-0"]
    _consistent(run)
    first, second = run.runs
    assert (second["resumed_at"], second["resumed_at_iterations"]) == (0, 0)
    assert run.redone == [first["reached"]] and run.redone_by_iterations == [first["reached_iterations"]]
    assert run.executed == JOB.total_steps + first["reached"]
    assert run.redone[0] > 1  # spotrun's goal (<= 1 step redone) is missed, as it must be

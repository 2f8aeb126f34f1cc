"""Resume after a real SIGTERM, on JAX and TensorFlow; Keras BackupAndRestore for comparison.

Each run is a subprocess (tests/trainer/keras_job.py): 3 epochs of 13 steps = 39 steps. Exact
(final weights equal within atol=1e-6, observed bit-identical on CPU): ``spot.fit`` and
``model.fit(batches, callbacks=[..., SpotCheckpoint(data=batches)])``, both compared with the
same uninterrupted ``spot.fit`` run. Replayed, as documented: ``model.fit(x, y, shuffle=True,
callbacks=[SpotCheckpoint()])`` trains the interrupted epoch again from its start.
A SIGTERMed trainer exits 75 ("stopped, not done") with no completion record; one that
trains to the end writes the record and exits 0 (protocol.py).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spotrun_trainer.protocol import COMPLETION_ENV, HELLO_ENV, STOPPED_EXIT_CODE, read_completion

JOB = Path(__file__).with_name("keras_job.py")
TOTAL_STEPS = 39
STEPS_PER_EPOCH = 13
ATOL = 1e-6


def run_job(tmp: Path, name: str, backend: str, *extra: str, ckpt: str | None = None,
            expect_rc: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    argv = [sys.executable, str(JOB), "--ckpt", str(tmp / (ckpt or name)),
            "--out", str(tmp / f"{name}.json"), *extra]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def steps_trained(tmp: Path, name: str) -> list[int]:
    runs = json.loads((tmp / f"{name}.json").read_text())
    return [runs[k] for k in sorted(runs, key=int)]


def final_weights(tmp: Path, name: str) -> list[np.ndarray]:
    with np.load(tmp / f"{name}.npz") as arrays:
        return [arrays[k] for k in arrays.files]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's final weights, per backend (computed once)."""
    cache: dict[str, list[np.ndarray]] = {}

    def get(backend: str) -> list[np.ndarray]:
        if backend not in cache:
            tmp = tmp_path_factory.mktemp(f"reference-{backend}")
            run_job(tmp, "ref", backend)
            assert steps_trained(tmp, "ref") == [TOTAL_STEPS]
            cache[backend] = final_weights(tmp, "ref")
        return cache[backend]
    return get


def random_mid_epoch_step() -> tuple[int, int, int]:
    """A random step strictly inside an epoch (not its first or last), so resume must skip
    into the middle of an epoch. Printed so a failure can be replayed."""
    rng = random.Random()
    epoch, in_epoch = rng.randrange(0, 3), rng.randrange(2, STEPS_PER_EPOCH - 1)
    sigterm_at = epoch * STEPS_PER_EPOCH + in_epoch
    print(f"SIGTERM after step {sigterm_at} (epoch {epoch}, step {in_epoch})")
    return sigterm_at, epoch, in_epoch


def protocol_env(tmp: Path) -> dict:
    """As the agent runs a trainer: its job id, the hello and completion files' paths."""
    return {"SPOTRUN_JOB_ID": "job-test", HELLO_ENV: str(tmp / "hello.json"),
            COMPLETION_ENV: str(tmp / "completed.json")}


def journal_events(stderr: str) -> list[tuple[int, dict]]:
    """The ``<prio>{json}`` lines the library prints under the agent ($SPOTRUN_JOB_ID)."""
    events = []
    for line in stderr.splitlines():
        if line.startswith("<") and ">{" in line:
            prio, body = line[1:].split(">", 1)
            events.append((int(prio), json.loads(body)))
    return events


def interrupted_then_resumed(tmp: Path, backend: str, *extra: str) -> tuple[int, list[int]]:
    sigterm_at, _, _ = random_mid_epoch_step()
    env = protocol_env(tmp)
    first = run_job(tmp, "run", backend, "--sigterm-at-step", str(sigterm_at), *extra,
                    expect_rc=STOPPED_EXIT_CODE, env=env)
    assert "training_stopped_for_interruption" in first.stdout + first.stderr
    assert not (tmp / "run.npz").exists(), "a SIGTERMed run must not reach the code after fit"
    assert not (tmp / "completed.json").exists(), "stopped is not done"
    assert json.loads((tmp / "hello.json").read_text())["handles"] == ["SIGTERM", "SIGUSR1"]
    run_job(tmp, "run", backend, *extra, env=env)
    record = json.loads((tmp / "completed.json").read_text())
    assert record["global_step"] == TOTAL_STEPS and record["epoch"] == 3
    return sigterm_at, steps_trained(tmp, "run")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_sigterm_mid_epoch_then_resume_matches_uninterrupted(tmp_path, backend, reference):
    sigterm_at, runs = interrupted_then_resumed(tmp_path, backend)
    assert len(runs) == 2
    # The signal arrives during step sigterm_at's callbacks; the checkpoint is taken at the
    # next step boundary, so the first run trains sigterm_at or sigterm_at + 1 steps.
    assert runs[0] in (sigterm_at, sigterm_at + 1)
    assert TOTAL_STEPS <= sum(runs) <= TOTAL_STEPS + 1, runs
    for got, want in zip(final_weights(tmp_path, "run"), reference(backend)):
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_callbacks_list_with_resumable_batches_resumes_exactly(tmp_path, backend, reference):
    """model.fit(batches, callbacks=[..., SpotCheckpoint(data=batches)]): the restore in
    on_train_begin (Keras's model._initial_epoch hook) and the positioned first epoch, on each
    backend, end with the weights of an uninterrupted spot.fit run."""
    sigterm_at, runs = interrupted_then_resumed(tmp_path, backend, "--mode", "callbacks")
    assert len(runs) == 2 and runs[0] in (sigterm_at, sigterm_at + 1)
    assert sum(runs) == TOTAL_STEPS, runs  # nothing replayed
    for got, want in zip(final_weights(tmp_path, "run"), reference(backend)):
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend", ["jax", pytest.param("tensorflow", marks=pytest.mark.slow)])
def test_callbacks_list_with_arrays_replays_the_interrupted_epoch_and_warns(tmp_path, backend):
    """model.fit(x, y, shuffle=True, callbacks=[..., SpotCheckpoint()]): Keras's shuffle cannot
    be replayed, so the restart restores the checkpoint and trains its epoch from the start,
    saying so in a warning that reaches the journal with only the trainer library installed."""
    sigterm_at, epoch, in_epoch = random_mid_epoch_step()
    env = protocol_env(tmp_path)
    args = ("--mode", "arrays", "--without-agent-package")
    run_job(tmp_path, "run", backend, "--sigterm-at-step", str(sigterm_at), *args,
            expect_rc=STOPPED_EXIT_CODE, env=env)
    assert not (tmp_path / "completed.json").exists()
    second = run_job(tmp_path, "run", backend, *args, env=env)
    assert json.loads(second.stdout.strip().splitlines()[-1])["agent_package_loaded"] is False
    first_run, second_run = steps_trained(tmp_path, "run")
    replayed = first_run - epoch * STEPS_PER_EPOCH  # the checkpoint: the stop's step or one after
    assert replayed in (in_epoch, in_epoch + 1)
    assert second_run == TOTAL_STEPS - epoch * STEPS_PER_EPOCH  # its epoch whole, then the rest
    events = journal_events(second.stderr)
    (warning,) = [fields for prio, fields in events
                  if fields["event"] == "training_resumed_at_epoch_start" and prio == 4]
    assert warning["replayed_steps"] == replayed and warning["epoch"] == epoch
    assert warning["level"] == "warning" and "ResumableBatches" in warning["how_to_avoid"]
    assert any(prio == 6 and f["event"] == "training_resumed" for prio, f in events)
    assert any(prio == 6 and f["event"] == "checkpoint_saved" for prio, f in events)
    assert json.loads((tmp_path / "completed.json").read_text())["global_step"] == TOTAL_STEPS


@pytest.mark.parametrize("mode", ["spot", "callbacks"])
@pytest.mark.parametrize("ended_by", ["sigterm_after_the_last_step", "record_lost"])
def test_a_restart_after_the_last_step_confirms_the_finish_without_training(
        tmp_path, mode, ended_by, reference):
    """The next boot confirms a real finish: with the final checkpoint present and no
    completion record (the agent drained right at the end, so the trainer exited 75; or the
    record was withdrawn or lost), a restart trains nothing, writes a fresh record, exits 0."""
    from spotrun_trainer.store import CheckpointStore
    env, record = protocol_env(tmp_path), tmp_path / "completed.json"
    if ended_by == "record_lost":
        run_job(tmp_path, "run", "jax", "--mode", mode, env=env)
        record.unlink()
    else:
        run_job(tmp_path, "run", "jax", "--mode", mode, "--sigterm-at-step", str(TOTAL_STEPS),
                expect_rc=STOPPED_EXIT_CODE, env=env)
        assert not record.exists()
    final = CheckpointStore(tmp_path / "run").latest_valid()
    assert final.step == TOTAL_STEPS

    started = time.time()
    again = run_job(tmp_path, "run", "jax", "--mode", mode, env=env)
    assert json.loads(again.stdout.strip().splitlines()[-1])["trained"] == 0
    fresh = read_completion(record, since=started)
    assert fresh is not None, "no completion record written by the confirming run"
    assert (fresh["global_step"], fresh["epoch"], fresh["checkpoint"]) == (
        TOTAL_STEPS, 3, final.path.name)
    assert CheckpointStore(tmp_path / "run").latest_valid().path == final.path  # no new save
    for got, want in zip(final_weights(tmp_path, "run"), reference("jax")):
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_async_save_resume_is_exact_too(tmp_path, reference):
    _, runs = interrupted_then_resumed(tmp_path, "jax", "--async-save", "--every-steps", "1")
    assert TOTAL_STEPS <= sum(runs) <= TOTAL_STEPS + 1, runs
    for got, want in zip(final_weights(tmp_path, "run"), reference("jax")):
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_keras_backup_and_restore_redoes_the_interrupted_epoch(tmp_path, record_property):
    """BackupAndRestore(save_freq=N) saves mid-epoch but restores only the epoch number, so the
    restart replays the interrupted epoch from its first batch; its default SIGTERM handling
    (none) also loses everything since the last save."""
    epoch, in_epoch = 1, 9  # fixed so the expected replay is known: 13 + 9 steps trained in epoch 1
    sigterm_at = epoch * STEPS_PER_EPOCH + in_epoch
    run_job(tmp_path, "bar", "jax", "--mode", "backup", "--sigterm-at-step", str(sigterm_at),
            expect_rc=-signal.SIGTERM)
    run_job(tmp_path, "bar", "jax", "--mode", "backup")
    runs = steps_trained(tmp_path, "bar")
    redone = sum(runs) - TOTAL_STEPS
    record_property("backup_and_restore_redone_steps", redone)
    print(f"BackupAndRestore(save_freq=4): {runs} steps trained, {redone} redone "
          f"(spotrun: at most 1)")
    assert redone == in_epoch  # the whole interrupted part of epoch 1 is trained again
    assert redone > 1


def test_external_sigusr1_saves_and_continues_then_sigterm_stops(tmp_path):
    """The agent's side of the protocol: signals from another process, progress file."""
    progress = tmp_path / "progress.json"
    env = dict(os.environ, KERAS_BACKEND="jax", SPOTRUN_PROGRESS_FILE=str(progress),
               SPOTRUN_CODE_COMMIT="c0ffee", **protocol_env(tmp_path))
    code = (
        "import sys; sys.argv[1:] = ['--ckpt', sys.argv[1], '--out', sys.argv[2]];"
        "import keras_job as j; j.EPOCHS = 100000; sys.exit(j.main())")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "ck"),
                             str(tmp_path / "out.json")], env=env, cwd=JOB.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def wait_for(predicate, what, timeout=90):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                assert proc.poll() is None, proc.stdout.read()
                value = predicate()
                if value:
                    return value
                time.sleep(0.05)  # polling the real condition (the progress file)
            raise AssertionError(f"timed out waiting for {what}")

        def progress_step():
            try:
                return json.loads(progress.read_text())
            except (OSError, ValueError):
                return None
        first = wait_for(progress_step, "a progress file")
        # The hello, written as training started: SIGUSR1 is safe to send to this trainer.
        hello = json.loads((tmp_path / "hello.json").read_text())
        assert hello["handles"] == ["SIGTERM", "SIGUSR1"] and hello["pid"] == proc.pid
        assert set(first) == {"epoch", "epochs", "step", "steps_per_epoch", "global_step",
                              "time", "last_checkpoint_time", "metrics"}
        # What Keras logged for the batches so far: the agent publishes it as a learning curve.
        assert set(first["metrics"]) >= {"loss"} and first["metrics"]["loss"] >= 0
        assert first["epochs"] == 100000 and first["steps_per_epoch"] == STEPS_PER_EPOCH
        from spotrun_trainer.store import CheckpointStore
        store = CheckpointStore(tmp_path / "ck")
        proc.send_signal(signal.SIGUSR1)
        ckpt = wait_for(store.latest_valid, "a checkpoint after SIGUSR1")
        assert ckpt.manifest["commit"] == "c0ffee"
        assert proc.poll() is None  # SIGUSR1: it goes on training
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - sent
        assert proc.returncode == STOPPED_EXIT_CODE, out[-3000:]  # stopped, not done
        assert not (tmp_path / "completed.json").exists()
        final = store.latest_valid()
        assert final.step > ckpt.step
        assert "training_stopped_for_interruption" in out
        print(f"SIGTERM → exit in {took:.2f}s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_callback_runs_on_each_backend(tmp_path, backend):
    """Quick (not slow) check of both backends; the slow tests above also resume on both."""
    from spotrun_trainer.store import CheckpointStore
    out = run_job(tmp_path, backend, backend).stdout
    assert json.loads(out.strip().splitlines()[-1])["backend"] == backend
    assert steps_trained(tmp_path, backend) == [TOTAL_STEPS]
    final = CheckpointStore(tmp_path / backend).latest_valid()
    meta = json.loads(final.read_bytes("training.json"))
    assert meta["backend"] == backend and final.step == TOTAL_STEPS
    assert meta["optimizer_iterations"] == TOTAL_STEPS

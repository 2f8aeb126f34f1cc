"""Figures 2 and 3: work lost per interruption and goodput, for spotrun's callback, the seed's
scheme, Keras BackupAndRestore (epoch, every N steps) and the control BackupAndRestore(every N
steps) plus a SIGTERM handler, on the same interruption points, counted the same way for all.

Each scheme runs as real trainer processes (bench/scheme_trainer.py), restarted on the same
directory (what the next instance sees on the migrated volume) until the job is done. The
interruption comes from outside: the trainer reports its position after every batch on a pipe,
and when it reaches the schedule's point this runner sends SIGTERM to the process while it
trains on, as a real notice finds it; what happens next is the scheme's own doing. The agent is
not in this loop — the figure is what each scheme keeps when its process is told to stop; the
agent's part (the notice reaching the trainer) is figure 1, the replacement's boot figure 3b.

The counts come from the trainer's witness callback (scheme_trainer.Interrupter), never from a
scheme's own step count:
  (a) batches run: on_train_batch_end calls in each process, on record before the scheme's
      own batch-end code runs. Steps run = their sum; steps redone in all = steps run − the
      job's steps. Per interruption: the data-stream position the interrupted run reached
      (its data start + its batches) − the data start of the run after it.
  (b) the optimizer's iteration count in the restored state, read at each run's first batch:
      steps redone by the optimizer's count = the iterations the interrupted run reached −
      those the next run restored. Equal to (a) for a scheme that resumes its data where its
      weights are; bnr-step and bnr-term restore the weights of a later step than the one
      their data restarts at (the epoch's first), so (a) > (b) for them, by design. The
      figure is (a): what was fed again.
goodput = the job's steps ÷ all steps run; wall time = the trainer processes' wall time summed
(start-up and compilation included, replacement instances excluded).
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
SCHEMES = ("spotrun", "seed", "bnr-epoch", "bnr-step", "bnr-term")


@dataclass
class Job:
    epochs: int = 6
    samples: int = 1024
    batch_size: int = 32
    save_steps: int = 8  # BackupAndRestore(save_freq=N), bnr-step and bnr-term
    interruptions: int = 4
    seed: int = 7
    positions: tuple[int, ...] | None = None  # the schedule, given instead of drawn

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.samples // self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def schedule(self) -> list[int]:
        """Interruption positions, drawn once (seeded) and used for every scheme: one in each
        of ``interruptions`` equal stretches of the job, never on a checkpoint boundary's
        first step so no scheme is lucky by construction."""
        if self.positions is not None:
            return list(self.positions)
        rng = random.Random(self.seed)
        stretch = self.total_steps // (self.interruptions + 1)
        return [i * stretch + rng.randint(2, stretch - 1) for i in range(1, self.interruptions + 1)]


@dataclass
class SchemeRun:
    scheme: str
    runs: list[dict] = field(default_factory=list)
    redone: list[int] = field(default_factory=list)  # (a), per interruption: the figure
    redone_by_iterations: list[int] = field(default_factory=list)  # (b), per interruption
    executed: int = 0  # (a) summed
    wall_s: float = 0.0
    finished_at: int | None = None

    @property
    def redone_total(self) -> int:
        """Steps run beyond the job's: from the batch counts alone."""
        return self.executed - (self.finished_at or 0)


def _events(path: Path) -> list[dict]:
    from spotrun.jsonlines import read_jsonl

    # A line torn by the SIGTERM that killed the writer is a batch not on record: dropped.
    return read_jsonl(path, skip_torn_last=True)


def _first(events: list[dict], name: str) -> dict | None:
    return next((e for e in events if e["event"] == name), None)


def _last(events: list[dict], name: str) -> dict | None:
    return next((e for e in reversed(events) if e["event"] == name), None)


def _run_process(argv: list[str], env: dict, stderr_path: Path, sigterm_at: int | None,
                 timeout_s: float) -> dict:
    """One trainer process; SIGTERM from here once it reports ``sigterm_at`` reached."""
    read_fd, write_fd = os.pipe()
    started = time.monotonic()
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen([*argv, "--notify-fd", str(write_fd)], env=env, stdout=subprocess.DEVNULL,
                                stderr=stderr, pass_fds=(write_fd,))
    os.close(write_fd)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    sent = None
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            for line in pipe:  # EOF when the process is gone
                if sigterm_at is not None and sent is None and int(line) >= sigterm_at:
                    proc.send_signal(signal.SIGTERM)
                    sent = {"position_seen": int(line), "wall": time.time()}
        returncode = proc.wait()
    finally:
        timer.cancel()
    return {"returncode": returncode, "wall_s": time.monotonic() - started, "sigterm": sent,
            "timed_out": timed_out.is_set()}


def _run_entry(events: list[dict], job: Job, proc: dict) -> dict:
    start, last = _first(events, "run_start"), _last(events, "batch_end")
    batches = last["batches"] if last else 0
    first_epoch_end = _first(events, "epoch_end")
    # (a)'s own check of data_start: the Keras epoch that ended and the batches run before it.
    anchor = ((first_epoch_end["epoch"] + 1) * job.steps_per_epoch - first_epoch_end["batches"]
              if first_epoch_end else None)
    sent, exit_event = proc["sigterm"], _last(events, "exit")
    return {
        "resumed_at": start["data_start"],  # data stream: where this run's first batch is
        "resumed_at_by_epoch_end": anchor,
        "resumed_at_iterations": start["iterations"],  # (b): restored optimizer state
        "batches_run": batches,  # (a)
        "reached": start["data_start"] + batches,  # the last batch completed, data stream
        "reached_iterations": start["iterations"] + batches,
        "sigterm_sent_at": sent["position_seen"] if sent else None,
        "returncode": proc["returncode"], "wall_s": round(proc["wall_s"], 2),
        "sigterm_to_exit_s": round(exit_event["wall"] - sent["wall"], 4) if sent and exit_event else None,
    }


def run_scheme(scheme: str, job: Job, workdir: Path, timeout_s: float = 300.0,
               before_run: Callable[[int, Path], None] | None = None) -> SchemeRun:
    """``before_run(index, directory)``: for tests that plant a fault between runs."""
    result = SchemeRun(scheme)
    schedule = job.schedule()
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    directory = workdir / scheme
    workdir.mkdir(parents=True, exist_ok=True)
    for index in range(len(schedule) + 1):
        if before_run is not None:
            before_run(index, directory)
        events_path = workdir / f"{scheme}-{index}.jsonl"
        argv = [sys.executable, str(HERE / "scheme_trainer.py"), "--scheme", scheme, "--dir", str(directory),
                "--epochs", str(job.epochs), "--samples", str(job.samples),
                "--batch-size", str(job.batch_size), "--save-steps", str(job.save_steps),
                "--events", str(events_path)]
        sigterm_at = schedule[index] if index < len(schedule) else None
        proc = _run_process(argv, env, workdir / f"{scheme}-{index}.stderr", sigterm_at, timeout_s)
        events = _events(events_path)
        where = f"bench {scheme} run {index} (see {workdir})"
        if proc["timed_out"]:
            raise RuntimeError(f"{where}: killed after {timeout_s:g} s")
        if _first(events, "run_start") is None:
            stderr = (workdir / f"{scheme}-{index}.stderr").read_bytes().decode(errors="replace")
            raise RuntimeError(f"{where} did not start training (exit {proc['returncode']}): {stderr[-800:]}")
        entry = _run_entry(events, job, proc)
        if entry["resumed_at_by_epoch_end"] not in (None, entry["resumed_at"]):
            raise RuntimeError(f"{where}: data start {entry['resumed_at']} by the Keras loop/optimizer, "
                               f"{entry['resumed_at_by_epoch_end']} by the batches before the first epoch end")
        if sigterm_at is not None and entry["sigterm_sent_at"] is None:
            raise RuntimeError(f"{where}: ended at {entry['reached']} (exit {proc['returncode']}) before "
                               f"reaching the interruption point {sigterm_at}")
        if not result.runs and (entry["resumed_at"], entry["resumed_at_iterations"]) != (0, 0):
            raise RuntimeError(f"{where}: a fresh job started at step {entry['resumed_at']} "
                               f"(iterations {entry['resumed_at_iterations']}): {directory} was not empty")
        if result.runs:
            previous = result.runs[-1]
            if entry["resumed_at"] > previous["reached"]:
                raise RuntimeError(f"{where}: resumed at step {entry['resumed_at']}, past the "
                                   f"{previous['reached']} the run before reached: steps skipped")
            result.redone.append(previous["reached"] - entry["resumed_at"])
            result.redone_by_iterations.append(previous["reached_iterations"] - entry["resumed_at_iterations"])
        result.executed += entry["batches_run"]
        result.wall_s += proc["wall_s"]
        result.runs.append(entry)
    result.finished_at = result.runs[-1]["reached"]
    if result.finished_at != job.total_steps:
        raise RuntimeError(f"bench {scheme}: the job ended at step {result.finished_at}, "
                           f"not {job.total_steps}; see {workdir}")
    return result


def run(job: Job, workdir: Path, schemes=SCHEMES) -> dict[str, SchemeRun]:
    """The schemes side by side (one process each at a time): they share the machine's load
    alike, so their wall times compare, and the suite fits its time budget."""
    from concurrent.futures import ThreadPoolExecutor

    workdir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=len(schemes), thread_name_prefix="bench-scheme") as pool:
        futures = {scheme: pool.submit(run_scheme, scheme, job, workdir) for scheme in schemes}
        return {scheme: future.result() for scheme, future in futures.items()}

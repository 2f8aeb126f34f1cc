"""Figures 2 and 3: work lost per interruption and goodput, for spotrun's callback, the seed's
scheme and Keras BackupAndRestore (epoch and every-N-steps), on the same interruption points.

Each scheme runs as real trainer processes (bench/scheme_trainer.py): interrupted by SIGTERM at
each point of the schedule, restarted on the same directory (what the next instance sees on the
migrated volume), until the job is done. The agent is not in this loop — the figure is about
what each scheme keeps when its process is told to stop; the agent's part (the notice reaching
the trainer) is figure 1, and the replacement's boot is figure 3b.

steps redone at an interruption = position reached by the interrupted run − position the next
run resumed at; goodput = the job's steps ÷ all steps run; wall time = the trainer processes'
wall time summed (start-up and compilation included, replacement instances excluded).
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCHEMES = ("spotrun", "seed", "bnr-epoch", "bnr-step")


@dataclass
class Job:
    epochs: int = 6
    samples: int = 1024
    batch_size: int = 32
    save_steps: int = 8  # BackupAndRestore(save_freq=N)
    interruptions: int = 4
    seed: int = 7

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
        rng = random.Random(self.seed)
        stretch = self.total_steps // (self.interruptions + 1)
        return [i * stretch + rng.randint(2, stretch - 1) for i in range(1, self.interruptions + 1)]


@dataclass
class SchemeRun:
    scheme: str
    runs: list[dict] = field(default_factory=list)
    redone: list[int] = field(default_factory=list)
    executed: int = 0
    wall_s: float = 0.0
    finished_at: int | None = None


def _events(path: Path) -> list[dict]:
    from spotrun.jsonlines import read_jsonl

    try:  # all or nothing: a line still being written makes this read count as none
        return read_jsonl(path, skip_torn_last=False)
    except (OSError, ValueError):
        return []


def run_scheme(scheme: str, job: Job, workdir: Path, timeout_s: float = 300.0) -> SchemeRun:
    result = SchemeRun(scheme)
    schedule = job.schedule()
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    directory = workdir / scheme
    previous_end = None
    for index in range(len(schedule) + 1):
        events_path = workdir / f"{scheme}-{index}.jsonl"
        argv = [sys.executable, str(HERE / "scheme_trainer.py"), "--scheme", scheme, "--dir", str(directory),
                "--epochs", str(job.epochs), "--samples", str(job.samples),
                "--batch-size", str(job.batch_size), "--save-steps", str(job.save_steps),
                "--events", str(events_path)]
        if index < len(schedule):
            argv += ["--sigterm-at", str(schedule[index])]
        started = time.monotonic()
        proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=timeout_s)
        wall = time.monotonic() - started
        events = {e["event"]: e for e in _events(events_path)}
        if "run_start" not in events:
            raise RuntimeError(f"bench {scheme} run {index} did not start training (exit {proc.returncode}): "
                               f"{proc.stderr.decode(errors='replace')[-800:]}")
        start = events["run_start"]["position"]
        end_event = events.get("exit") or events.get("train_end") or events.get("sigterm_sent")
        end = end_event["position"]
        if previous_end is not None:
            result.redone.append(previous_end - start)
        result.executed += end - start
        result.wall_s += wall
        result.runs.append({"resumed_at": start, "reached": end, "returncode": proc.returncode,
                            "wall_s": round(wall, 2),
                            "sigterm_to_exit_s": round(events["exit"]["wall"] - events["sigterm_sent"]["wall"], 4)
                            if "exit" in events and "sigterm_sent" in events else None})
        previous_end = end
        if index == len(schedule):
            result.finished_at = end
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

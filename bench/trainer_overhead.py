"""Throughput cost of SpotCheckpoint: no checkpoints vs every N s, synchronous vs asynchronous.

    .venv/bin/python bench/trainer_overhead.py                       # tiny model, this CPU
    KERAS_BACKEND=jax python bench/trainer_overhead.py --model resnet50 --batch-size 128
                                                                     # a GPU machine (Keras 3, JAX)

Each mode trains the same model for --seconds (after a warm-up that compiles the step) on
random data shaped like CIFAR-10, and counts steps. Checkpoints go to a temporary directory
on --dir's filesystem (put it on the disk you care about, e.g. the EBS volume). Prints a
table and one JSON object (last line). "ckpts" includes the final checkpoint written after
the measured window; "blocked ms/ckpt" is the median time the training thread waited per
checkpoint (snapshot + write when synchronous, snapshot only when asynchronous), which a busy
shared machine blurs less than steps/s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from spotrun_trainer import ResumableBatches, SpotCheckpoint  # noqa: E402
from spotrun_trainer.resnet_cifar import build_model  # noqa: E402


class StopAfter(keras.callbacks.Callback):
    """Stops after a wall-clock budget, counting the steps and the time spent checkpointing."""

    def __init__(self, seconds: float, warmup_steps: int):
        super().__init__()
        self.seconds, self.warmup_steps = seconds, warmup_steps
        self.steps = 0
        self.started = None
        self.elapsed = 0.0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps == self.warmup_steps:
            self.started = time.perf_counter()
        elif self.started is not None:
            self.elapsed = time.perf_counter() - self.started
            if self.elapsed >= self.seconds:
                self.model.stop_training = True


def run_mode(mode: str, args, x, y, workdir: Path) -> dict:
    keras.utils.set_random_seed(0)
    model = build_model(args.model, 1e-3)
    stopper = StopAfter(args.seconds, args.warmup_steps)
    callbacks = [stopper]
    spot = None
    ckpt_dir = workdir / mode
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    if mode != "none":
        spot = SpotCheckpoint(ckpt_dir, every_seconds=args.interval, async_save=(mode == "async"),
                              handle_signals=False)
    epochs = 10_000  # stopped by StopAfter
    if spot is not None:
        spot.fit(model, x, y, batch_size=args.batch_size, epochs=epochs, callbacks=callbacks, verbose=0)
        spot.wait_for_save()
    else:  # the same input pipeline, without the callback
        model.fit(ResumableBatches(x, y, args.batch_size, seed=0), epochs=epochs,
                  callbacks=callbacks, shuffle=False, verbose=0)
    measured = stopper.steps - args.warmup_steps
    size = sum(f.stat().st_size for f in ckpt_dir.rglob("*") if f.is_file()) if ckpt_dir.exists() else 0
    return {"mode": mode, "steps": measured, "seconds": round(stopper.elapsed, 2),
            "steps_per_s": round(measured / stopper.elapsed, 2) if stopper.elapsed else None,
            "samples_per_s": round(measured * args.batch_size / stopper.elapsed, 1)
            if stopper.elapsed else None,
            "checkpoints": spot.saves if spot else 0,
            # Robust to noisy neighbours: how long the training thread waited per checkpoint.
            "blocked_ms_per_checkpoint": round(1000 * float(np.median(spot.blocked_seconds)), 2)
            if spot and spot.blocked_seconds else 0.0,
            "checkpoint_mib_on_disk": round(size / 2**20, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "resnet50"], default="tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=65.0, help="measured time per mode")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between checkpoints")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--modes", default="none,sync,async")
    parser.add_argument("--rounds", type=int, default=1, help="runs per mode; the median is reported")
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.random((args.samples, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, args.samples)
    workdir = Path(tempfile.mkdtemp(prefix="spotrun-bench-", dir=args.dir))
    modes = args.modes.split(",")
    try:  # rounds interleave the modes, so a noisy neighbour hits them all alike
        runs = [run_mode(mode, args, x, y, workdir / f"r{i}") for i in range(args.rounds)
                for mode in modes]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = [_median_run([r for r in runs if r["mode"] == mode]) for mode in modes]
    base = next((r["steps_per_s"] for r in results if r["mode"] == "none"), None)
    for r in results:
        r["overhead_pct"] = round(100 * (1 - r["steps_per_s"] / base), 2) if base and r["steps_per_s"] else None
    device = _device()
    print(f"model={args.model} batch={args.batch_size} interval={args.interval}s "
          f"backend={keras.backend.backend()} device={device}")
    print(f"{'mode':6} {'steps/s':>9} {'samples/s':>10} {'ckpts':>6} {'MiB':>7} {'overhead':>9} "
          f"{'blocked ms/ckpt':>16}")
    for r in results:
        print(f"{r['mode']:6} {r['steps_per_s']:>9} {r['samples_per_s']:>10} {r['checkpoints']:>6} "
              f"{r['checkpoint_mib_on_disk']:>7} {str(r['overhead_pct']) + '%':>9} "
              f"{r['blocked_ms_per_checkpoint']:>16}")
    print(json.dumps({"benchmark": "trainer_overhead", "model": args.model, "batch_size": args.batch_size,
                      "interval_s": args.interval, "seconds_per_mode": args.seconds,
                      "backend": keras.backend.backend(), "keras": keras.__version__,
                      "device": device, "results": results}))
    return 0


def _median_run(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda r: r["steps_per_s"] or 0)
    chosen = dict(ordered[len(ordered) // 2])
    chosen["rounds_steps_per_s"] = [r["steps_per_s"] for r in runs]
    return chosen


def _device() -> str:
    if keras.backend.backend() == "jax":
        import jax
        return str(jax.devices()[0].device_kind)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())

"""A tiny deterministic training job run as a subprocess by the resume tests.

    python keras_job.py --ckpt DIR --out RESULT.json [--mode spot|callbacks|arrays|backup]
                        [--sigterm-at-step K] [--without-agent-package]

Trains a small MLP on fixed synthetic data, the same batches in the modes spot (``spot.fit``)
and callbacks (``model.fit(batches, callbacks=[..., SpotCheckpoint(data=batches)])``);
arrays is ``model.fit(x, y, shuffle=True, callbacks=[..., SpotCheckpoint()])``, backup Keras's
BackupAndRestore; the tfdata modes feed tf.data, through ``spot.fit`` or (tfdata-callbacks)
``model.fit(dataset, callbacks=[..., SpotCheckpoint()])``. ``--sigterm-at-step K`` makes the process send itself a real SIGTERM after
global step K (the kernel delivers it; the Python handler runs between bytecodes, as with the
agent's signal). Appends, to RESULT.json, the steps this process trained; writes the final
weights to RESULT.npz when training finishes, from code after ``fit``, and prints a JSON line
with the backend and the steps trained.
``--without-agent-package`` makes ``import spotrun`` fail, as where only the packaged trainer
library is installed (the AMI's conda env).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if "--without-agent-package" in sys.argv:
    sys.modules["spotrun"] = None  # any `import spotrun...` now raises ImportError

import keras  # noqa: E402
import numpy as np  # noqa: E402

from spotrun_trainer import ResumableBatches, SpotCheckpoint  # noqa: E402

SAMPLES, BATCH, EPOCHS = 200, 16, 3  # 13 steps per epoch (the last batch smaller), 39 in all


class Recorder(keras.callbacks.Callback):
    """Counts the steps this process trains; sends SIGTERM to itself at a chosen step."""

    def __init__(self, result_path: Path, sigterm_at: int | None, start: int):
        super().__init__()
        self.result_path, self.sigterm_at, self.trained, self.start = result_path, sigterm_at, 0, start

    def on_train_batch_end(self, batch, logs=None):
        self.trained += 1
        self._flush()
        if self.sigterm_at is not None and self.trained == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)

    def _flush(self):
        runs = json.loads(self.result_path.read_text()) if self.result_path.exists() else {}
        runs[str(self.start)] = self.trained
        self.result_path.write_text(json.dumps(runs))


def build_model():
    keras.utils.set_random_seed(1234)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dropout(0.25), keras.layers.Dense(3)])
    schedule = keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=5, decay_rate=0.9)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def data():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 3, SAMPLES)
    x = rng.normal(size=(SAMPLES, 12)).astype("float32") + y[:, None].astype("float32")
    return x, y


def tf_epoch(x, y, seed: int, reshuffle: bool = False):
    import tensorflow as tf
    return (tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(SAMPLES, seed=seed, reshuffle_each_iteration=reshuffle).batch(BATCH))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", default="spot", choices=[
        "spot", "callbacks", "arrays", "backup", "tfdata", "tfdata-epochs", "tfdata-reshuffle",
        "tfdata-callbacks"])
    parser.add_argument("--sigterm-at-step", type=int)
    parser.add_argument("--every-steps", type=int, default=4)
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--without-agent-package", action="store_true")
    args = parser.parse_args()
    result = Path(args.out)
    x, y = data()
    model = build_model()
    recorder = Recorder(result, args.sigterm_at_step, start=len(json.loads(result.read_text()))
                        if result.exists() else 0)
    options = dict(every_seconds=None, every_steps=args.every_steps, async_save=args.async_save)
    if args.mode == "spot":
        spot = SpotCheckpoint(args.ckpt, seed=99, **options)
        spot.fit(model, x, y, batch_size=BATCH, epochs=EPOCHS, callbacks=[recorder], verbose=0)
    elif args.mode == "callbacks":  # the same batches as spot.fit's, through model.fit
        batches = ResumableBatches(x, y, BATCH, seed=99)
        model.fit(batches, epochs=EPOCHS, shuffle=False, verbose=0,
                  callbacks=[recorder, SpotCheckpoint(args.ckpt, data=batches, **options)])
    elif args.mode == "tfdata-callbacks":  # model.fit(dataset): the callback cannot position it
        model.fit(tf_epoch(x, y, seed=99), epochs=EPOCHS, verbose=0,
                  callbacks=[recorder, SpotCheckpoint(args.ckpt, **options)])
    elif args.mode.startswith("tfdata"):  # spot.fit fed by tf.data (tests/trainer/test_tfdata.py)
        from spotrun_trainer.tfdata import ResumableTFDataset
        source = {"tfdata": lambda: tf_epoch(x, y, seed=99),  # the same order every epoch
                  "tfdata-epochs": lambda: ResumableTFDataset(lambda e: tf_epoch(x, y, 99 + e)),
                  "tfdata-reshuffle": lambda: tf_epoch(x, y, 99, reshuffle=True)}[args.mode]()
        spot = SpotCheckpoint(args.ckpt, **options)
        spot.fit(model, source, epochs=EPOCHS, callbacks=[recorder], verbose=0)
    elif args.mode == "arrays":
        model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=True, verbose=0,
                  callbacks=[recorder, SpotCheckpoint(args.ckpt, **options)])
    else:
        # Keras's own scheme, for comparison: no SIGTERM handler, so the signal kills the process
        # (as it would on a spot instance), and the restart replays the interrupted epoch.
        backup = keras.callbacks.BackupAndRestore(args.ckpt, save_freq=args.every_steps)
        model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=True,
                  callbacks=[backup, recorder], verbose=0)
    np.savez(result.with_suffix(".npz"), *[keras.ops.convert_to_numpy(v) for v in model.weights])
    print(json.dumps({"done": True, "backend": keras.backend.backend(), "trained": recorder.trained,
                      "agent_package_loaded": "spotrun.log" in sys.modules}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

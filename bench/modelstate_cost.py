"""What a checkpoint's model part costs: Keras's weights file (model.weights.h5) vs the old npz.

    .venv/bin/python bench/modelstate_cost.py [--models mlp,resblocks,resnet50] [--repeat 5]

Per model (Adam, optimizer built, so the state is weights + 2 slots each), the median of
--repeat runs of:
  * snapshot: what the training thread waits for when saving asynchronously. npz: copy
    every variable to host memory; h5: modelstate.capture (save_weights to a temporary
    file, read back), which is synchronous by design.
  * serialise: npz only, np.savez of the host copies (done in the writer thread).
  * store save: CheckpointStore.save of the resulting files (sha256, fsync, rename) to --dir.
  * sync total: what a synchronous save blocks for (snapshot + serialise + store save).
Prints one line per model and a JSON object (last line).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from spotrun_trainer import modelstate  # noqa: E402
from spotrun_trainer.store import CheckpointStore  # noqa: E402


def mlp() -> keras.Model:  # tests/trainer/keras_job.py's model
    return keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.Dropout(0.25), keras.layers.Dense(3)])


def resblocks() -> keras.Model:
    """A small CIFAR ResNet: 3 stages (32, 64, 128 channels) of 2 basic blocks."""
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(32, 3, padding="same", use_bias=False)(inputs)
    for stage, filters in enumerate((32, 64, 128)):
        for block in range(2):
            strides = 2 if stage and not block else 1
            shortcut = x
            y = keras.layers.Conv2D(filters, 3, strides, padding="same", use_bias=False)(x)
            y = keras.layers.Activation("relu")(keras.layers.BatchNormalization()(y))
            y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
            y = keras.layers.BatchNormalization()(y)
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = keras.layers.Conv2D(filters, 1, strides, use_bias=False)(shortcut)
            x = keras.layers.Activation("relu")(keras.layers.Add()([y, shortcut]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Dropout(0.2)(x)))


def resnet50() -> keras.Model:
    return keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)


MODELS = {"mlp": mlp, "resblocks": resblocks, "resnet50": resnet50}


def npz_snapshot(model):
    arrays = {f"model_{i}": modelstate._host_copy(v) for i, v in enumerate(model.variables)}
    arrays.update({f"optimizer_{i}": modelstate._host_copy(v)
                   for i, v in enumerate(model.optimizer.variables)})
    return arrays


def npz_serialise(arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


def measure(name: str, repeat: int, directory: Path) -> dict:
    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.optimizer.build(model.trainable_variables)
    store = CheckpointStore(directory / name, keep=1)
    rows = {k: [] for k in ("npz_snapshot", "npz_serialise", "npz_store", "h5_snapshot",
                            "h5_store")}
    sizes = {}
    for i in range(repeat):
        arrays, t = timed(npz_snapshot, model)
        rows["npz_snapshot"].append(t)
        data, t = timed(npz_serialise, arrays)
        rows["npz_serialise"].append(t)
        _, t = timed(lambda: store.save({"state.npz": data}, step=2 * i, epoch=0,
                                        step_in_epoch=2 * i))
        rows["npz_store"].append(t)
        files, t = timed(modelstate.capture, model)
        rows["h5_snapshot"].append(t)
        _, t = timed(lambda: store.save(files, step=2 * i + 1, epoch=0, step_in_epoch=2 * i + 1))
        rows["h5_store"].append(t)
        sizes = {"npz_bytes": len(data), "h5_bytes": sum(len(b) for b in files.values())}
    ms = {k: round(1000 * statistics.median(v), 1) for k, v in rows.items()}
    ms["npz_sync_total"] = round(ms["npz_snapshot"] + ms["npz_serialise"] + ms["npz_store"], 1)
    ms["h5_sync_total"] = round(ms["h5_snapshot"] + ms["h5_store"], 1)
    params = sum(int(np.prod(v.shape)) for v in model.variables)
    return {"model": name, "params": params, **sizes, **ms}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mlp,resblocks")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None, help="filesystem for the store saves")
    args = parser.parse_args()
    logging.getLogger("spotrun_trainer").setLevel(logging.WARNING)  # one checkpoint_saved per save
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name in args.models.split(","):
            r = measure(name, args.repeat, Path(tmp))
            results.append(r)
            print(f"{r['model']:>10} {r['params']:>9} params  npz {r['npz_bytes'] / 2**20:7.2f} MiB"
                  f"  h5 {r['h5_bytes'] / 2**20:7.2f} MiB | snapshot npz {r['npz_snapshot']:7.1f}"
                  f" ms  h5 {r['h5_snapshot']:7.1f} ms | sync total npz {r['npz_sync_total']:7.1f}"
                  f" ms  h5 {r['h5_sync_total']:7.1f} ms")
    print(json.dumps({"backend": keras.backend.backend(), "keras": keras.__version__,
                      "machine": platform.machine(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The seed's job done right: ResNet50 on CIFAR-10, spot-safe and resumable to the step.

    python -m spotrun_trainer.resnet_cifar [--model resnet50|tiny] [--epochs 100]
        [--batch-size 32] [--lr 1e-4] [--limit N] [--data-dir DIR] [--checkpoint-dir DIR]

As in the AWS blog's ec2_spot_keras_training.py: ResNet50 from keras.applications with no
pretrained weights, channels-last 32x32x3 inputs scaled to [0, 1] (x / 255), RMSprop at 1e-4,
batch 32. Unlike it: checkpoints every ``--checkpoint-every`` seconds to the step (not once per
epoch, in place), SIGTERM → checkpoint and exit, resume at the next step with the same data
order, mixed precision on GPUs that support it, all local GPUs through the backend's own
data-parallel distribution, a CSV and a log line per epoch, and the final test metrics in
``final_metrics.json`` next to the checkpoints for the agent's completion record.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import keras

from .callback import SpotCheckpoint
from .datasets import DatasetError, is_synthetic, load_cifar10
from .logs import log_event
from .store import CheckpointError

NUM_CLASSES = 10


def _log(level: str, event: str, **fields) -> None:
    log_event(level, event, component="resnet_cifar", **fields)


def build_model(name: str, learning_rate: float) -> keras.Model:
    inputs = keras.Input((32, 32, 3))
    if name == "resnet50":
        backbone = keras.applications.ResNet50(include_top=True, weights=None, input_tensor=inputs,
                                               classes=NUM_CLASSES, classifier_activation=None)
        outputs = backbone.output
    elif name == "tiny":  # trains in seconds on a CPU: tests and the demo
        x = keras.layers.Conv2D(16, 3, activation="relu")(inputs)
        x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Conv2D(32, 3, activation="relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(NUM_CLASSES)(x)
    else:
        raise ValueError(f"--model must be resnet50 or tiny, got {name!r}")
    # Logits out, float32 loss: stable under mixed precision.
    outputs = keras.layers.Activation("linear", dtype="float32")(outputs)
    model = keras.Model(inputs, outputs, name=f"{name}_cifar10")
    model.compile(optimizer=keras.optimizers.RMSprop(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def _gpus() -> list[tuple[str, str | None]]:
    """(device, compute capability) of the local GPUs, asked of the active backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax
        return [(str(d), getattr(d, "compute_capability", None)) for d in jax.devices()
                if d.platform == "gpu"]
    if backend == "tensorflow":
        import tensorflow as tf
        return [(g.name, ".".join(map(str, tf.config.experimental.get_device_details(g)
                                      .get("compute_capability", ()) or ())) or None)
                for g in tf.config.list_physical_devices("GPU")]
    return []


def configure_devices(mixed_precision: str) -> tuple[int, object]:
    """Mixed precision where the GPU has fast float16 (compute capability >= 7.0), and
    data parallelism over all local GPUs: keras.distribution on JAX, MirroredStrategy on TF.
    Returns (replicas, a context manager to build the model in)."""
    import contextlib
    gpus = _gpus()
    capable = bool(gpus) and all(cc and float(cc) >= 7.0 for _, cc in gpus)
    if mixed_precision == "on" or (mixed_precision == "auto" and capable):
        keras.mixed_precision.set_global_policy("mixed_float16")
    scope = contextlib.nullcontext()
    if len(gpus) > 1:
        if keras.backend.backend() == "jax":
            keras.distribution.set_distribution(
                keras.distribution.DataParallel(devices=keras.distribution.list_devices("gpu")))
        elif keras.backend.backend() == "tensorflow":
            import tensorflow as tf
            scope = tf.distribute.MirroredStrategy().scope()
    _log("info", "devices_configured", gpus=[g for g, _ in gpus],
         policy=keras.mixed_precision.global_policy().name, replicas=max(1, len(gpus)))
    return max(1, len(gpus)), scope


class EpochLog(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self._started = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        _log("info", "epoch_end", epoch=epoch + 1, seconds=round(time.monotonic() - self._started, 2),
             **{k: round(float(v), 5) for k, v in (logs or {}).items()})


class Pace(keras.callbacks.Callback):
    """A fixed sleep after each step. The tiny model trains a step in milliseconds, faster than
    the once-a-second progress file that a rehearsal watches to time its notice."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(self.seconds)


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m spotrun_trainer.resnet_cifar",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["resnet50", "tiny"], default="resnet50")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default 1e-4 for resnet50, as the seed; 3e-3 for tiny)")
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first N training and N test samples (tests, demos)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    parser.add_argument("--data-dir", default=env.get("SPOTRUN_DATA_DIR", "/dltraining/datasets"))
    parser.add_argument("--checkpoint-dir",
                        default=env.get("SPOTRUN_CHECKPOINT_DIR", "/dltraining/checkpoints"))
    parser.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds")
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--mixed-precision", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity")
    parser.add_argument("--step-seconds", type=float, default=0.0,
                        help="sleep after each training step: paces the tiny model so that a "
                             "demo's spot notice lands mid-epoch (the numbers do not change)")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.step_seconds < 0:
        parser.error("--step-seconds must be >= 0")
    if args.lr is None:
        args.lr = 1e-4 if args.model == "resnet50" else 3e-3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        (x_train, y_train), (x_test, y_test) = load_cifar10(args.data_dir)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.limit:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
        x_test, y_test = x_test[: args.limit], y_test[: args.limit]
    # Normalisation as the seed: float32 in [0, 1].
    x_train, x_test = (x.astype("float32") / 255.0 for x in (x_train, x_test))
    replicas, scope = configure_devices(args.mixed_precision)
    if args.batch_size % replicas:
        print(f"error: --batch-size {args.batch_size} is not a multiple of the {replicas} GPUs",
              file=sys.stderr)
        return 1
    keras.utils.set_random_seed(args.seed)
    with scope:
        model = build_model(args.model, args.lr)
    checkpoint_dir = Path(args.checkpoint_dir)
    spot = SpotCheckpoint(checkpoint_dir, every_seconds=args.checkpoint_every,
                          async_save=args.async_save, seed=args.seed)
    csv = keras.callbacks.CSVLogger(str(checkpoint_dir / "training_log.csv"), append=True)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    _log("info", "training_start", model=args.model, epochs=args.epochs, samples=len(x_train),
         batch_size=args.batch_size, synthetic_data=is_synthetic(args.data_dir))
    callbacks = [csv, EpochLog()] + ([Pace(args.step_seconds)] if args.step_seconds else [])
    try:
        spot.fit(model, x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
                 validation_data=(x_test, y_test), callbacks=callbacks,
                 verbose=args.verbose)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    scores = model.evaluate(x_test, y_test, batch_size=args.batch_size, verbose=0,
                            return_dict=True)
    metrics = {"test_" + k: float(v) for k, v in scores.items()}
    metrics.update(model=args.model, epochs=args.epochs, global_step=spot.global_step,
                   train_samples=int(len(x_train)), test_samples=int(len(x_test)),
                   synthetic_data=is_synthetic(args.data_dir), backend=keras.backend.backend())
    path = spot.write_final_metrics(metrics)
    _log("info", "training_complete", final_metrics=str(path),
         **{k: v for k, v in metrics.items() if k.startswith("test_")})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The seed's training scheme, faithfully, for comparison with spotrun's callback.

Source: the AWS blog post "Train deep learning models on GPUs using Amazon EC2 Spot
Instances" (Japanese translation in the seed, /work/shared/seed/000_18943e10f556dcd8.txt,
step 5) and its ec2_spot_keras_training.py. The post quotes the scheme, not the whole file;
what it says, kept here:
  - "load the data from the mounted EBS volume" (seed: /dltraining/datasets);
  - "check for a checkpoint; if there is one, load it and update the epoch number to resume
    training; otherwise define the model and start from scratch" (load_checkpoint_model():
    the highest-numbered file wins);
  - Keras's ModelCheckpoint saves the model "at the end of each epoch" to numbered files in
    /dltraining/checkpoints/ (written in place: an interruption loses up to an epoch and can
    leave a torn file -- the weakness spotrun fixes);
  - a callback checks for the termination notice and, if there is one, pauses (sleeps) so
    that no checkpoint is being written when the instance goes.
ResNet50 from keras.applications (weights=None), inputs scaled by 1/255, one-hot labels,
categorical cross-entropy, RMSprop(lr=1e-4), batch 32, 100 epochs, shuffle=True.

Differences, all forced: Keras 3 (the post used TF 1.12's Keras) saves whole models as
`.keras` (not `.h5`) and RMSprop has no `decay`; the paths come from SPOTRUN_DATA_DIR /
SPOTRUN_CHECKPOINT_DIR when set (so it runs under the agent unchanged); CIFAR-10 is read from
the python batches on the volume (the post's first run downloaded it with
keras.datasets.cifar10); the notice poll is opt-in (--poll-imds), because off AWS each poll
would wait for a timeout. It knows nothing of spotrun's protocol: SIGTERM kills it.

    python examples/seed_style/train.py [--model resnet50|tiny] [--epochs 100]
        [--keras-backup-and-restore epoch|N]    # Keras BackupAndRestore instead (benchmarks)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pickle
import re
import time
import urllib.request

import keras
import numpy as np

DATA_DIR = os.environ.get("SPOTRUN_DATA_DIR", "/dltraining/datasets")
CHECKPOINT_PATH = os.path.join(os.environ.get("SPOTRUN_CHECKPOINT_DIR", "/dltraining/checkpoints"),
                               "cifar10")
CHECKPOINT_NAMES = "cifar10_model.{epoch:03d}.keras"  # seed: 'cifar10_model.{epoch:03d}.h5'


def load_batch(path):
    with open(path, "rb") as fh:
        batch = pickle.load(fh, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return data, np.asarray(batch[b"labels"])


def load_data():
    root = os.path.join(DATA_DIR, "cifar-10-batches-py")
    parts = [load_batch(os.path.join(root, f"data_batch_{i}")) for i in range(1, 6)]
    x_test, y_test = load_batch(os.path.join(root, "test_batch"))
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])), (x_test, y_test)


def load_checkpoint_model(checkpoint_path, checkpoint_names):
    # As the seed: the highest epoch number among the files wins; no check that it is complete.
    list_of_checkpoint_files = glob.glob(os.path.join(checkpoint_path, "*"))
    checkpoint_epoch_number = max(int(re.findall(r"\.(\d+)\.", f)[0]) for f in list_of_checkpoint_files)
    checkpoint_epoch_path = os.path.join(checkpoint_path,
                                         checkpoint_names.format(epoch=checkpoint_epoch_number))
    resume_model = keras.models.load_model(checkpoint_epoch_path)
    return resume_model, checkpoint_epoch_number


class SpotTermination(keras.callbacks.Callback):
    """The seed's notice check: on a notice, sleep so no checkpoint is mid-write at the end."""

    def __init__(self, imds):
        super().__init__()
        self.imds = imds

    def on_batch_begin(self, batch, logs=None):
        try:
            urllib.request.urlopen(f"{self.imds}/latest/meta-data/spot/instance-action", timeout=1)
            time.sleep(150)  # the seed's answer to a notice: stop doing anything
        except Exception:  # noqa: BLE001 - 404 (no notice) or unreachable: keep training
            pass


def define_model(input_shape, num_classes, name):
    if name == "resnet50":
        model = keras.applications.ResNet50(include_top=True, weights=None,
                                            input_shape=input_shape, classes=num_classes)
    else:  # small enough for a CPU (tests, the local rehearsal)
        model = keras.Sequential([keras.Input(input_shape), keras.layers.Conv2D(16, 3, activation="relu"),
                                  keras.layers.MaxPooling2D(), keras.layers.Conv2D(32, 3, activation="relu"),
                                  keras.layers.GlobalAveragePooling2D(),
                                  keras.layers.Dense(num_classes, activation="softmax")])
    opt = keras.optimizers.RMSprop(learning_rate=0.0001)  # seed: rmsprop(lr=0.0001, decay=1e-6)
    model.compile(loss="categorical_crossentropy", optimizer=opt, metrics=["accuracy"])
    return model


def main():
    parser = argparse.ArgumentParser(description="the seed's training scheme")
    parser.add_argument("--model", choices=["resnet50", "tiny"], default="resnet50")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="first N train/test samples")
    parser.add_argument("--poll-imds", metavar="URL", default=None,
                        help="poll this metadata endpoint for the notice, as the seed did")
    parser.add_argument("--keras-backup-and-restore", metavar="epoch|N", default=None,
                        help="use Keras BackupAndRestore(save_freq=...) instead of the seed's scheme")
    args = parser.parse_args()
    num_classes = 10

    (x_train, y_train), (x_test, y_test) = load_data()
    if args.limit:
        x_train, y_train, x_test, y_test = (a[: args.limit] for a in (x_train, y_train, x_test, y_test))
    x_train = x_train.astype("float32") / 255
    x_test = x_test.astype("float32") / 255
    y_train = keras.utils.to_categorical(y_train, num_classes)
    y_test = keras.utils.to_categorical(y_test, num_classes)

    os.makedirs(CHECKPOINT_PATH, exist_ok=True)
    callbacks_list = []
    if args.keras_backup_and_restore:
        freq = args.keras_backup_and_restore
        save_freq = "epoch" if freq == "epoch" else int(freq)
        callbacks_list.append(keras.callbacks.BackupAndRestore(
            os.path.join(CHECKPOINT_PATH, "backup"), save_freq=save_freq, delete_checkpoint=False))
        model, epoch_number = define_model(x_train.shape[1:], num_classes, args.model), 0
    else:
        full_checkpoint_path = os.path.join(CHECKPOINT_PATH, CHECKPOINT_NAMES)
        callbacks_list.append(keras.callbacks.ModelCheckpoint(
            full_checkpoint_path, monitor="val_loss", verbose=1, save_best_only=False,
            save_weights_only=False, mode="auto", save_freq="epoch"))
        if not os.listdir(CHECKPOINT_PATH):
            model = define_model(x_train.shape[1:], num_classes, args.model)
            epoch_number = 0
        else:
            model, epoch_number = load_checkpoint_model(CHECKPOINT_PATH, CHECKPOINT_NAMES)
    if args.poll_imds:
        callbacks_list.append(SpotTermination(args.poll_imds))

    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
              validation_data=(x_test, y_test), shuffle=True, callbacks=callbacks_list,
              initial_epoch=epoch_number)
    scores = model.evaluate(x_test, y_test, verbose=1)
    print("Test loss:", scores[0])
    print("Test accuracy:", scores[1])
    # Not in the seed: the agent copies this into the completion record if it exists.
    with open(os.path.join(os.path.dirname(CHECKPOINT_PATH), "final_metrics.json"), "w") as fh:
        json.dump({"test_loss": float(scores[0]), "test_accuracy": float(scores[1])}, fh)


if __name__ == "__main__":
    main()

"""A training script as the seed's readers write one, knowing nothing of spotrun: hard-coded
/dltraining paths, Keras's ModelCheckpoint writing one numbered file per epoch in place, resume
from the highest-numbered file that loads, no signal handling (SIGTERM kills it), no progress
file. The README's "Rehearse your own script" runs it (tests/e2e/test_rehearse_plain_script_e2e.py
runs that command). Tiny model and data; each batch waits 0.25 s to stand for a GPU's work, so
an epoch takes about 2 s and the rehearsal's notices land mid-training.

    python train.py        # EPOCHS=16 by default
"""
import glob
import os
import re
import time

import keras
import numpy as np

CHECKPOINTS = "/dltraining/checkpoints"
EPOCHS = int(os.environ.get("EPOCHS", "16"))


def load_latest():
    numbered = sorted(((int(re.findall(r"\.(\d+)\.keras$", f)[0]), f)
                       for f in glob.glob(os.path.join(CHECKPOINTS, "cifar10_model.*.keras"))),
                      reverse=True)
    for epoch, path in numbered:
        try:
            return keras.models.load_model(path), epoch
        except Exception as exc:  # torn by a kill mid-save: the one before it will do
            print(f"cannot load {path}: {exc}", flush=True)
    return None, 0


class GpuWork(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        time.sleep(0.25)


os.makedirs(CHECKPOINTS, exist_ok=True)
rng = np.random.default_rng(0)
x = rng.normal(size=(256, 8)).astype("float32")
y = (x.sum(axis=1) > 0).astype("float32")
model, initial_epoch = load_latest()
print(f"starting at epoch {initial_epoch + 1}", flush=True)
if model is None:
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer="rmsprop", loss="binary_crossentropy", metrics=["accuracy"])
model.fit(x, y, batch_size=32, epochs=EPOCHS, initial_epoch=initial_epoch, verbose=2,
          callbacks=[keras.callbacks.ModelCheckpoint(
              os.path.join(CHECKPOINTS, "cifar10_model.{epoch:03d}.keras")), GpuWork()])

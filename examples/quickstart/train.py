"""The smallest spot-safe Keras script: the two spotrun lines are marked.

    python examples/quickstart/train.py          # run it, `kill -TERM` it, run it again

It checkpoints every 60 s and on SIGTERM (what the spotrun agent sends on a spot notice), then
exits with status 75 ("stopped, not done"); a rerun continues at the step after the last
checkpoint, with the same data order, and ends with the weights an uninterrupted run has.
Without the agent, checkpoints go to ./spotrun-checkpoints (or $SPOTRUN_CHECKPOINT_DIR).
Ctrl-C is no checkpoint: a rerun then resumes from the last timed one.
"""
import os

import keras
import numpy as np

from spotrun_trainer import ResumableBatches, SpotCheckpoint

EPOCHS = int(os.environ.get("QUICKSTART_EPOCHS", "20"))

keras.utils.set_random_seed(0)  # same initial weights on every start (then overwritten on resume)
rng = np.random.default_rng(0)
y = rng.integers(0, 3, 3000)
x = rng.normal(size=(3000, 20)).astype("float32") + y[:, None]

model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, activation="relu"),
                          keras.layers.Dense(3)])
model.compile(optimizer="adam", metrics=["accuracy"],
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

batches = ResumableBatches(x, y, batch_size=32)                  # spotrun line 1: it shuffles
spot = SpotCheckpoint(data=batches, every_seconds=60)            # spotrun line 2
model.fit(batches, epochs=EPOCHS, shuffle=False, callbacks=[spot], verbose=2)

# Only after a whole training: a SIGTERM ends the script inside fit.
spot.write_final_metrics(model.evaluate(x, y, verbose=0, return_dict=True))

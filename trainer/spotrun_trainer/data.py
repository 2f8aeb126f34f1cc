"""A batch sequence whose order is a pure function of (seed, epoch), so resume can skip exactly.

Keras's own ``shuffle=True`` draws a fresh permutation from a global RNG each epoch: after a
restart the order of the interrupted epoch cannot be reproduced, so the batches already
trained on cannot be told apart from the rest. Here the permutation of epoch ``e`` is
``numpy.random.default_rng([seed, e]).permutation(n)``: the same in every process, and
``set_position(epoch, start_step)`` makes the sequence begin at any batch of any epoch.

Give it to ``model.fit`` with ``shuffle=False`` (it shuffles the samples itself) and to the
callback as ``SpotCheckpoint(data=batches)``, which sets the epoch and, on resume, the step.
Keras's ``shuffle=True`` would also permute the batch indices, with a global RNG a restart
cannot replay; the requests are watched so that the callback can refuse it (``out_of_order``).
"""
from __future__ import annotations

import math

import keras
import numpy as np


class ResumableBatches(keras.utils.PyDataset):
    """``(x, y)`` arrays cut into batches in a reproducible per-epoch order.

    ``x`` and ``y`` are NumPy arrays (or anything indexable by an integer index array) with the
    same first dimension. The last, smaller batch is kept, as ``model.fit`` does.
    """

    def __init__(self, x, y, batch_size: int, seed: int = 0, shuffle: bool = True,
                 sample_weight=None, **pydataset_kwargs):
        if pydataset_kwargs.get("use_multiprocessing"):
            # Worker processes would not see the epoch the callback sets on this object.
            raise ValueError("ResumableBatches does not support use_multiprocessing=True; "
                             "use workers=N (threads)")
        super().__init__(**pydataset_kwargs)
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(x) == 0:
            raise ValueError("no training samples")
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.samples = len(x)
        self.steps_per_epoch = math.ceil(self.samples / self.batch_size)
        self.epoch = 0
        self.start_step = 0
        self._cache = None
        # Keras fetches batch i, i+1, ... from one thread; with a thread pool (workers > 1)
        # a few may start out of order, never more than the pool and its queue hold.
        self._slack = 0 if self.workers <= 1 else self.workers + self.max_queue_size
        self._next_request = 0
        self.out_of_order: int | None = None

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        """Make the sequence epoch ``epoch``'s batches from ``start_step`` on."""
        if not 0 <= start_step < self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps_per_epoch - 1}")
        self.epoch, self.start_step = int(epoch), int(start_step)
        self._next_request, self.out_of_order = 0, None

    def order(self, epoch: int) -> np.ndarray:
        cached = self._cache  # one tuple, read once: safe against a prefetch thread
        if cached is not None and cached[0] == epoch:
            return cached[1]
        if self.shuffle:
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(self.samples)
        else:
            order = np.arange(self.samples)
        self._cache = (epoch, order)
        return order

    def fit_input(self, epochs: int) -> dict:
        """``model.fit``'s input from the current position (as ``ResumableTFDataset``'s):
        the sequence itself, whose epoch the callback sets as ``fit`` goes."""
        return {"x": self}

    def describe(self) -> dict:
        """What a checkpoint records to check that resume sees the same data order."""
        return {"seed": self.seed, "shuffle": self.shuffle, "samples": self.samples,
                "batch_size": self.batch_size, "steps_per_epoch": self.steps_per_epoch}

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __getitem__(self, index: int):
        index = int(index)
        step = self.start_step + index
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"batch {index} out of range")
        if index > self._next_request + self._slack and self.out_of_order is None:
            self.out_of_order = index  # a batch far ahead of the sequence: fit shuffles
        self._next_request = max(self._next_request, index + 1)
        idx = self.order(self.epoch)[step * self.batch_size:(step + 1) * self.batch_size]
        batch = (self.x[idx], self.y[idx])
        if self.sample_weight is not None:
            batch = batch + (self.sample_weight[idx],)
        return batch

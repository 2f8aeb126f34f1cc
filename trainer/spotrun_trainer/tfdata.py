"""tf.data input that ``SpotCheckpoint.fit`` can start at any step of any epoch.

Resume positions a ``tf.data`` pipeline by skipping: the rest of epoch ``e`` from step ``k``
is ``dataset_for(e).skip(k)``. That is exact when the pipeline yields the same batches in the
same order in every process, which holds for two shapes of input:

- **one dataset whose every pass is the same sequence** (no shuffle, or
  ``shuffle(n, seed=S, reshuffle_each_iteration=False)``): every epoch sees that order;
- **a function ``epoch -> dataset``** that builds epoch ``e``'s pipeline with its own seeds
  (``shuffle(n, seed=S + epoch, reshuffle_each_iteration=False)``): a new order each epoch,
  the same in every process. Each epoch's pipeline is a new object, so reshuffling adds
  nothing; leave it off, since under a ``tf.distribute`` strategy Keras reads one batch
  through a first iterator before training, which would make training a second pass. The
  function is called for every remaining epoch when a ``fit`` starts (they are concatenated).

Not exact, and warned about at start (event ``tfdata_resume_not_exact``): a single dataset
with ``shuffle(..., reshuffle_each_iteration=True)`` (the default of ``shuffle``). Its order
on pass ``i`` depends on how many passes the process has made, and a restarted process starts
counting at 0: the rest of the interrupted epoch is cut from another permutation (within that
epoch some examples come twice and others not at all), and later epochs see other orders.
The step count, the epoch boundaries and the learning-rate schedule stay exact. A shuffle
without any seed (no ``seed=`` and no global seed) is not reproducible in any form, and is
warned about too. Other sources of nondeterminism (``deterministic=False`` in ``map`` /
``interleave``, random ops in a ``map``, ``sample_from_datasets`` without a seed) make any two
runs differ; only the first is detected. The cost of resuming at step ``k`` is reading and
discarding ``k`` batches of input (no training).

TensorFlow is imported only when a dataset is actually used, so the JAX-only user does not
pay for it.
"""
from __future__ import annotations

import sys
from typing import Any

from .logs import log_event

# Why SpotCheckpoint(data=...) takes no tf.data input: Keras iterates a dataset given to
# model.fit through its own iterator, made before any callback runs, so a callback cannot start
# it at a step. spot.fit builds the input of each of its fits itself.
TFDATA_NOT_AS_DATA = ("; a tf.data input resumes at the step through spot.fit(model, dataset, "
                      "epochs=...), not model.fit (there SpotCheckpoint() without data replays "
                      "the interrupted epoch)")

_SHUFFLE_OPS = ("ShuffleDataset", "ShuffleDatasetV2", "ShuffleDatasetV3",
                "ShuffleAndRepeatDataset", "ShuffleAndRepeatDatasetV2")


def is_dataset(value: Any) -> bool:
    """True for a ``tf.data.Dataset``, without importing TensorFlow when it is not loaded."""
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(value, tf.data.Dataset)


class ResumableTFDataset:
    """A finite ``tf.data`` input, or a function ``epoch -> dataset``, positioned by skipping.

    ``SpotCheckpoint.fit`` wraps a ``tf.data.Dataset`` given as ``x`` in one of these itself;
    wrap a function yourself: ``spot.fit(model, ResumableTFDataset(make_dataset), epochs=...)``.
    Each element is one batch (``(x, y)`` or ``(x, y, sample_weight)``), as for ``model.fit``.
    ``name`` is recorded with each checkpoint and must match on resume.
    """

    out_of_order = None  # what the callback checks of a ResumableBatches: Keras iterates this

    def __init__(self, dataset, name: str | None = None):
        tf = _tf()
        if isinstance(dataset, tf.data.Dataset):
            self._fixed, self._make = dataset, None
        elif callable(dataset):
            self._fixed, self._make = None, dataset
        else:
            raise TypeError("ResumableTFDataset takes a tf.data.Dataset or a function "
                            f"epoch -> tf.data.Dataset, got {type(dataset).__name__}")
        self.name = name
        first = self._fixed if self._make is None else self._call(0)
        self.steps_per_epoch = _steps(first, "the dataset" if self._make is None
                                      else "the dataset of epoch 0")
        self.element_spec = repr(first.element_spec)
        self.epoch = 0
        self.start_step = 0
        self.not_exact = _order_problems(first, per_epoch=self._make is not None)
        if self.not_exact:
            log_event("warning", "tfdata_resume_not_exact", component="trainer.tfdata",
                      reasons=self.not_exact, steps_per_epoch=self.steps_per_epoch,
                      fix="give every shuffle a seed, and either pass a function epoch -> "
                          "dataset (seed=base + epoch) or use reshuffle_each_iteration=False")

    def _call(self, epoch: int):
        dataset = self._make(epoch)
        if not is_dataset(dataset):
            raise TypeError(f"the dataset function returned {type(dataset).__name__} for "
                            f"epoch {epoch}, not a tf.data.Dataset")
        return dataset

    def dataset_for(self, epoch: int):
        """Epoch ``epoch``'s full dataset (a new pipeline each call in the function form)."""
        if self._make is None:
            return self._fixed
        dataset = self._call(epoch)
        steps = _steps(dataset, f"the dataset of epoch {epoch}")
        if steps != self.steps_per_epoch:
            raise ValueError(f"the dataset of epoch {epoch} has {steps} batches, epoch 0's has "
                             f"{self.steps_per_epoch}; every epoch must have the same number")
        return dataset

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        """The next ``fit_input`` starts at batch ``start_step`` of epoch ``epoch``."""
        if not 0 <= start_step < self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps_per_epoch - 1}")
        self.epoch, self.start_step = int(epoch), int(start_step)

    def fit_input(self, epochs: int) -> dict:
        """Keyword arguments for ``model.fit(..., initial_epoch=self.epoch, epochs=epochs)``.

        From a mid-epoch position: that epoch's rest only (``epochs`` must be epoch + 1, since
        ``fit`` cannot give one epoch fewer steps than the next). From an epoch boundary: the
        fixed dataset itself (Keras iterates it once per epoch), or the function's datasets
        for each epoch concatenated, with ``steps_per_epoch`` marking the boundaries.
        """
        if self.start_step:
            if epochs != self.epoch + 1:
                raise ValueError(f"from step {self.start_step} of epoch {self.epoch} only that "
                                 f"epoch can be fed (epochs={self.epoch + 1}), not epochs={epochs}")
            return {"x": self.dataset_for(self.epoch).skip(self.start_step)}
        if self._make is None:
            return {"x": self._fixed}
        parts = [self.dataset_for(e) for e in range(self.epoch, epochs)]
        while len(parts) > 1:  # pairwise, so that many epochs nest log2(n) deep, not n
            parts = [parts[i].concatenate(parts[i + 1]) if i + 1 < len(parts) else parts[i]
                     for i in range(0, len(parts), 2)]
        return {"x": parts[0], "steps_per_epoch": self.steps_per_epoch}

    def describe(self) -> dict:
        """What a checkpoint records to check that resume sees the same batches."""
        return {"kind": "tf.data", "per_epoch": self._make is not None, "name": self.name,
                "steps_per_epoch": self.steps_per_epoch, "element_spec": self.element_spec}

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step


def resumable_input(x, y, batch_size: int, seed: int):
    """What ``SpotCheckpoint.fit`` can position, from its ``x, y``: arrays become a
    ResumableBatches (order from ``seed``), a ``tf.data.Dataset`` a ResumableTFDataset; either
    kind given as is is kept. Both have ``set_position`` and ``fit_input``."""
    from .data import ResumableBatches  # Keras; tfdata itself needs only TensorFlow, lazily
    if isinstance(x, (ResumableBatches, ResumableTFDataset)):
        return x
    if is_dataset(x):
        if y is not None:
            raise TypeError("a tf.data.Dataset yields (x, y) batches itself: pass no y")
        return ResumableTFDataset(x)
    return ResumableBatches(x, y, batch_size, seed)


def _tf():
    import tensorflow as tf
    return tf


def _steps(dataset, what: str) -> int:
    tf = _tf()
    steps = int(dataset.cardinality())
    if steps == int(tf.data.INFINITE_CARDINALITY):
        raise ValueError(f"{what} is infinite (repeat()): give one epoch's dataset, without "
                         "repeat, so that resume knows where an epoch ends")
    if steps == int(tf.data.UNKNOWN_CARDINALITY):
        raise ValueError(f"{what} has an unknown number of batches (filter, from_generator, "
                         "TFRecordDataset without a count...): state it with "
                         "dataset.apply(tf.data.experimental.assert_cardinality(N)) after batch()")
    if steps == 0:
        raise ValueError(f"{what} is empty")
    return steps


def _order_problems(dataset, per_epoch: bool) -> list[str]:
    """Why this dataset's order would differ in a restarted process (best effort)."""
    problems = []
    for node, consts in _top_level_nodes(dataset):
        if node.op not in _SHUFFLE_OPS:
            continue
        seeds = [consts.get(name.split(":")[0].lstrip("^")) for name in node.input[2:4]]
        if seeds == [0, 0]:
            problems.append(f"{node.op} has no seed: its order differs in every process")
        reshuffles = ("reshuffle_each_iteration" not in node.attr
                      or node.attr["reshuffle_each_iteration"].b)
        if reshuffles and not per_epoch:
            problems.append(f"{node.op} reshuffles on each pass "
                            "(reshuffle_each_iteration=True): a restarted process starts "
                            "again from the first pass's order")
    return problems


def _top_level_nodes(dataset):
    """(node, {const name: int}) for the dataset graph's outer nodes; nothing if unavailable.

    ``_as_serialized_graph`` is TensorFlow's private hook for a dataset's graph (tf.distribute
    and tf.data's own service use it); there is no public one. It only feeds the warning
    above, so if a TensorFlow release drops it, the check is skipped, never training.
    Shuffles inside ``interleave``/``flat_map`` functions are left out on purpose: each of
    their instances is a new pipeline, so reshuffling does not apply to them.
    """
    tf = _tf()
    try:
        from tensorflow.core.framework import graph_pb2
        graph = graph_pb2.GraphDef.FromString(dataset._as_serialized_graph().numpy())
    except Exception:  # noqa: BLE001 - see the docstring
        return []
    consts = {}
    for node in graph.node:
        if (node.op == "Const" and "value" in node.attr
                and tf.dtypes.as_dtype(node.attr["dtype"].type).is_integer):
            value = tf.make_ndarray(node.attr["value"].tensor)
            if value.shape == ():
                consts[node.name] = int(value)
    return [(node, consts) for node in graph.node]


__all__ = ["ResumableTFDataset", "is_dataset", "resumable_input"]

"""spotrun's Keras integration: spot-safe checkpoints and exact resume.

``import spotrun_trainer`` stays light: the checkpoint store is standard-library only (the
agent imports it), and the Keras parts load on first use of their names.
"""
from __future__ import annotations

_LAZY = {
    "SpotCheckpoint": "callback",
    "model_fingerprint": "modelstate",
    "ResumableBatches": "data",
    "ResumableTFDataset": "tfdata",
    "CheckpointStore": "store",
    "Checkpoint": "store",
    "CheckpointError": "store",
    "CheckpointWriteError": "store",
    "IncompatibleCheckpoint": "store",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

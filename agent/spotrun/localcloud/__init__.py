"""The local spot cloud: the whole spot lifecycle on one machine, no AWS account.

``LocalCloud`` and ``TimingModel`` are imported lazily so that ``spotrun --help`` and the
metadata emulator do not pay for importing moto.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Instance", "LocalCloud", "TimingModel"]


def __getattr__(name: str) -> Any:
    if name == "LocalCloud":
        from spotrun.localcloud.cloud import LocalCloud
        return LocalCloud
    if name == "Instance":
        from spotrun.localcloud.instance import Instance
        return Instance
    if name == "TimingModel":
        from spotrun.localcloud.timing import TimingModel
        return TimingModel
    raise AttributeError(f"module 'spotrun.localcloud' has no attribute {name!r}")

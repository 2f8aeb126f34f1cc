"""How long the local cloud's EC2 state transitions take.

AWS's EBS control plane is asynchronous: a volume is ``creating`` before ``available``, a
snapshot is ``pending`` (with a progress percentage) before ``completed``, an attachment is
``attaching`` before ``attached`` and ``detaching`` before it is gone, and the volumes of a
terminated instance stay ``in-use`` for a while after the instance is gone. Code that skips
the waits works against moto (which is synchronous) and breaks on EC2, so the local cloud
replays these delays. ``fast()`` keeps every wait sub-second for tests; ``aws_like()`` uses
durations in the range observed on EC2 for small gp3 volumes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class TimingModel:
    volume_create_s: float = 0.3
    # A snapshot stays ``pending`` this long; its progress grows linearly to 100%.
    snapshot_s: float = 0.6
    attach_s: float = 0.2
    detach_s: float = 0.2
    # A terminated instance's volumes stay attached/``in-use`` this long before ``available``.
    detach_after_terminate_s: float = 1.0
    # How often pending transitions are re-checked (a busy detach waits for the unmount).
    poll_s: float = 0.05

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"TimingModel.{field.name}: must be a number >= 0, got {value!r}")
        if self.poll_s <= 0:
            raise ValueError("TimingModel.poll_s: must be > 0")

    @classmethod
    def fast(cls) -> "TimingModel":
        """Sub-second transitions, for tests."""
        return cls()

    @classmethod
    def instant(cls) -> "TimingModel":
        """No modelled delays at all (still asynchronous: states change on the next poll)."""
        return cls(volume_create_s=0, snapshot_s=0, attach_s=0, detach_s=0,
                   detach_after_terminate_s=0, poll_s=0.02)

    @classmethod
    def aws_like(cls) -> "TimingModel":
        """Durations of the order seen on EC2 for a small gp3 volume."""
        return cls(volume_create_s=5.0, snapshot_s=60.0, attach_s=5.0, detach_s=10.0,
                   detach_after_terminate_s=60.0, poll_s=0.5)

    def scaled(self, factor: float) -> "TimingModel":
        """Every duration multiplied by ``factor`` (the poll interval too, within limits)."""
        if factor < 0:
            raise ValueError(f"TimingModel.scaled: factor must be >= 0, got {factor!r}")
        changes = {f.name: getattr(self, f.name) * factor for f in dataclasses.fields(self)}
        changes["poll_s"] = min(max(self.poll_s * factor, 0.02), 1.0)
        return dataclasses.replace(self, **changes)

    @classmethod
    def named(cls, name: str) -> "TimingModel":
        """``fast`` | ``aws`` (``aws_like``) | ``instant``, for the CLI."""
        choices = {"fast": cls.fast, "aws": cls.aws_like, "aws_like": cls.aws_like,
                   "aws-like": cls.aws_like, "instant": cls.instant}
        if name not in choices:
            raise ValueError(f"timing: unknown model {name!r} (choose fast, aws or instant)")
        return choices[name]()

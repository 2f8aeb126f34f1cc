"""What a local Spot Fleet launches and where: the request's launch specification, the AZ
policy that places each instance, and the record the fleet keeps of each member."""
from __future__ import annotations

import dataclasses
import random
import subprocess
from typing import Any, Mapping


@dataclasses.dataclass
class LaunchSpec:
    """What each fleet instance is launched with (the request's launch specification)."""

    instance_type: str = "p3.2xlarge"
    image_id: str | None = None  # None: the local cloud's default AMI
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    user_data: bytes | None = None

    @classmethod
    def of(cls, launch: "LaunchSpec | Mapping[str, Any] | None") -> "LaunchSpec":
        if launch is None:
            return cls()
        if isinstance(launch, LaunchSpec):
            return launch
        unknown = set(launch) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"launch: unknown keys {sorted(unknown)}")
        return cls(**launch)


class AzPolicy:
    """Where the next instance goes: ``random``, ``round-robin`` or ``fixed:<az>``."""

    def __init__(self, spec: str, azs: list[str], seed: int | None = None):
        self.spec = spec
        self.azs = list(azs)
        self._rng = random.Random(seed)
        self._next = 0
        if spec.startswith("fixed:"):
            self.fixed: str | None = spec.split(":", 1)[1]
            if self.fixed not in self.azs:
                raise ValueError(f"az_policy: {self.fixed!r} is not one of {', '.join(self.azs)}")
        elif spec in ("random", "round-robin"):
            self.fixed = None
        else:
            raise ValueError(f"az_policy must be random, round-robin or fixed:<az>, not {spec!r}")

    def choose(self) -> str:
        if self.fixed:
            return self.fixed
        if self.spec == "random":
            return self._rng.choice(self.azs)
        az = self.azs[self._next % len(self.azs)]
        self._next += 1
        return az


@dataclasses.dataclass
class FleetMember:
    instance: Any
    az: str
    launched_at: float
    process: subprocess.Popen | None = None
    gone_at: float | None = None

    @property
    def instance_id(self) -> str:
        return self.instance.instance_id

"""Figure 1's stand-in for the volume edge is called by the real drain: it must take what the
drain passes (the bench's quick run once died on `release(final_tags=...)`)."""
import inspect

from bench.reaction import _NoVolume
from spotrun.volumes import VolumeManager


def test_the_stand_in_accepts_every_argument_the_drain_passes():
    for name in ("release", "record", "job_volumes"):
        real = inspect.signature(getattr(VolumeManager, name)).parameters
        stand_in = inspect.signature(getattr(_NoVolume, name)).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in stand_in.values())
        missing = [p for p in real if p != "self" and p not in stand_in and not takes_any]
        assert missing == [], f"_NoVolume.{name} lacks {missing}"

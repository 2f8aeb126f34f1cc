"""c2_agent.py with test-only hooks for the race tests of issue 21, set by environment:

- ``RACE_PAUSE_AT=<crash point>`` and ``RACE_GO_FILE=<path>``: at that point of the volume
  code, create ``<path>.paused`` and wait until ``<path>`` exists (the test acts meanwhile).
- ``RACE_NOT_FOUND=<instance id>[,...]`` (``RACE_NOT_FOUND_TIMES``, default 1): this process's
  DescribeInstances of those instances is answered InvalidInstanceID.NotFound that many times,
  as EC2 may for an instance launched moments ago (flaky_ec2.NotFoundFor).

The loser's bound is the config's ``lease.loser_wait_s``.

Then runs c2_agent.main() with the same arguments, after the test launcher's hooks
(spotrun.localcloud.faultagent: the recording of AWS calls c2_cloud asks for).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import c2_agent  # noqa: E402
from flaky_ec2 import NotFoundFor  # noqa: E402

from spotrun import crashpoints  # noqa: E402
from spotrun import ec2 as ec2mod  # noqa: E402
from spotrun.localcloud import faultagent  # noqa: E402


class PauseAt(crashpoints.NoFaults):
    """Fault hooks: at crash point ``point``, create ``<go>.paused`` and wait for ``go``;
    every point is passed on to the hooks installed before (``then``)."""

    def __init__(self, point: str, go: Path, then):
        if point not in crashpoints.CRASHPOINTS:
            raise ValueError(f"RACE_PAUSE_AT={point!r}: not a crash point")
        self.point, self.go, self.then = point, go, then

    def crash(self, name: str) -> None:
        self.then.crash(name)
        if name == self.point:
            Path(f"{self.go}.paused").touch()
            deadline = time.monotonic() + 300
            while not self.go.exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    def pause(self, name: str) -> None:
        self.then.pause(name)


def install_pause(point: str, go: Path) -> None:
    crashpoints.install(PauseAt(point, go, crashpoints.HOOKS))


def install_not_found(ids: list[str], times: int) -> None:
    answer = NotFoundFor(ids, times=times)
    original = ec2mod.client

    def client(service, *args, **kwargs):
        made = original(service, *args, **kwargs)
        if service == "ec2":
            answer.install(made)
        return made

    ec2mod.client = client


if __name__ == "__main__":
    faultagent.install_from_env()
    if os.environ.get("RACE_PAUSE_AT"):
        install_pause(os.environ["RACE_PAUSE_AT"], Path(os.environ["RACE_GO_FILE"]))
    if os.environ.get("RACE_NOT_FOUND"):
        install_not_found(os.environ["RACE_NOT_FOUND"].split(","),
                          int(os.environ.get("RACE_NOT_FOUND_TIMES", "1")))
    raise SystemExit(c2_agent.main())

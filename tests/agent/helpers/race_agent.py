"""c2_agent.py with test-only hooks for the race tests of issue 21, set by environment:

- ``RACE_PAUSE_AT=<crash point>`` and ``RACE_GO_FILE=<path>``: at that point of the volume
  code, create ``<path>.paused`` and wait until ``<path>`` exists (the test acts meanwhile).
- ``RACE_NOT_FOUND=<instance id>[,...]`` (``RACE_NOT_FOUND_TIMES``, default 1): this process's
  DescribeInstances of those instances is answered InvalidInstanceID.NotFound that many times,
  as EC2 may for an instance launched moments ago (flaky_ec2.NotFoundFor).

The loser's bound is the config's ``lease.loser_wait_s``.

Then runs c2_agent.main() with the same arguments.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import c2_agent  # noqa: E402
from flaky_ec2 import NotFoundFor  # noqa: E402

from spotrun import ec2 as ec2mod  # noqa: E402
from spotrun import migration, volumes  # noqa: E402


def install_pause(point: str, go: Path) -> None:
    original = migration.crashpoint

    def crashpoint(name: str) -> None:
        original(name)
        if name == point:
            Path(f"{go}.paused").touch()
            deadline = time.monotonic() + 300
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    migration.crashpoint = crashpoint
    volumes.crashpoint = crashpoint


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
    if os.environ.get("RACE_PAUSE_AT"):
        install_pause(os.environ["RACE_PAUSE_AT"], Path(os.environ["RACE_GO_FILE"]))
    if os.environ.get("RACE_NOT_FOUND"):
        install_not_found(os.environ["RACE_NOT_FOUND"].split(","),
                          int(os.environ.get("RACE_NOT_FOUND_TIMES", "1")))
    raise SystemExit(c2_agent.main())

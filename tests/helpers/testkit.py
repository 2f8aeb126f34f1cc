"""Helpers shared across the suite (tests/conftest.py puts this folder on sys.path; tests/ has
no packages, so the module name is unique): polling a real condition with a deadline, and the
metadata emulator's instance, optionally with reads of some paths held until the test says.
"""
from __future__ import annotations

import collections
import json
import threading
from typing import Callable, TypeVar

from spotrun import waiting
from spotrun.localcloud.imds import InstanceMetadata, MetadataServer
from spotrun.localcloud.imdshttp import VERSIONED

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; fail (an
    AssertionError naming ``what``) after ``timeout`` seconds."""
    return waiting.wait_until(predicate, timeout, interval_s=interval, what=what, error=lambda: AssertionError(
        f"timed out after {timeout} s waiting for {what}"))


def instance_metadata(**overrides) -> InstanceMetadata:
    """The tests' instance, as its metadata service describes it (``overrides``: any field)."""
    values = dict(instance_id="i-0123456789abcdef0", instance_type="p3.2xlarge",
                  availability_zone="us-east-1b", availability_zone_id="use1-az2",
                  region="us-east-1", account_id="123456789012", ami_id="ami-0abcdef1234567890",
                  private_ip="10.0.1.23", tags={"Name": "trainer"}, user_data=b"[job]\nid = \"x\"\n")
    values.update(overrides)
    return InstanceMetadata(**values)


class HeldPaths:
    """GETs of the given metadata paths (``meta-data/...``) wait inside the emulator until
    :meth:`release`: a read that stays outstanding exactly as long as the test decides, where a
    ``slow`` fault would only make it last some seconds."""

    def __init__(self, *paths: str):
        self.paths = frozenset(path.strip("/") for path in paths)
        self._released = threading.Event()
        self._changed = threading.Condition()
        self._waiting: collections.Counter[str] = collections.Counter()

    def hold(self, path: str) -> None:
        """In the emulator's request thread: wait here if ``path`` is held."""
        if path not in self.paths or self._released.is_set():
            return
        with self._changed:
            self._waiting[path] += 1
            self._changed.notify_all()
        try:
            self._released.wait()
        finally:
            with self._changed:
                self._waiting[path] -= 1
                self._changed.notify_all()

    def waiting(self, path: str) -> int:
        """GETs of ``path`` held right now."""
        with self._changed:
            return self._waiting[path]

    def await_held(self, *paths: str, timeout: float = 10.0) -> None:
        """Until a GET of each of ``paths`` is being held."""
        with self._changed:
            held = self._changed.wait_for(lambda: all(self._waiting[p] for p in paths), timeout)
            missing = [p for p in paths if not self._waiting[p]]
        assert held, f"no GET of {', '.join(missing)} held within {timeout} s"

    def release(self) -> None:
        self._released.set()

    @property
    def released(self) -> bool:
        return self._released.is_set()


class HoldingMetadataServer(MetadataServer):
    """The local cloud's metadata emulator, whose GETs of ``held.paths`` wait for ``held``
    (after the token check, before the answer is made)."""

    def __init__(self, md: InstanceMetadata, *args, held: HeldPaths, **kwargs):
        super().__init__(md, *args, **kwargs)
        self.held = held

    def resolve(self, path: str):
        match = VERSIONED.match(path)
        if match:
            self.held.hold((match.group(2) or "").strip("/"))
        return super().resolve(path)


def trainer_log_events(inst) -> list[dict]:
    """The trainer's own JSON lines with an ``event`` in an instance's trainer.log (where the
    agent sends the trainer's output), the journal priority prefix ``<N>`` dropped."""
    try:
        text = (inst.state_dir / "trainer.log").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        body = line.split(">", 1)[1] if line.startswith("<") and ">{" in line else line
        try:
            item = json.loads(body)
        except ValueError:
            continue
        if isinstance(item, dict) and "event" in item:
            out.append(item)
    return out


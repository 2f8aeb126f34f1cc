"""EC2's eventual consistency for resources just created, on request.

EC2 documents that a volume or snapshot may be reported ``InvalidVolume.NotFound`` /
``InvalidSnapshot.NotFound`` on a Describe by id, and be missing from listed Describes, for
a while after the call that created it succeeded. moto shows everything at once, so agents
that treat "not found" as "gone" pass against it and crash against EC2. The fault proxy
(never the checker's proxy) asks this module to hide each new resource for the fault plan's
``not_found_after_create_s``.

A resource is hidden once, from its first creation answer: a CreateVolume replayed by its
ClientToken returns the same volume and does not hide it again.

Instances too, on request (:meth:`Visibility.hide_instance`, ``cloud.instance_not_found``):
EC2 documents that a just-launched instance may be unknown to DescribeInstances for a while,
and a lookup of another job's lease holder must not take one such answer for "gone". A rule
names the instance, optionally the callers it misleads (by their access key: one agent's
view, not the holder's own), and how long it lasts: the next ``lookups`` DescribeInstances
naming it, and/or ``seconds`` from now.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from spotrun.localcloud.ec2xml import (Ec2Response, child, child_text, error_response,
                                       numbered)

# action -> (id element in the create answer / describe item, id parameter, NotFound code, noun)
_KINDS = {
    "volume": ("volumeId", "VolumeId", "InvalidVolume.NotFound", "volume"),
    "snapshot": ("snapshotId", "SnapshotId", "InvalidSnapshot.NotFound", "snapshot"),
}
_CREATES = {"CreateVolume": "volume", "CreateSnapshot": "snapshot"}
_DESCRIBES = {"DescribeVolumes": ("volume", "volumeSet"),
              "DescribeSnapshots": ("snapshot", "snapshotSet")}
_ACCESS_KEY = re.compile(r"Credential=([^/,\s]+)/")


@dataclass
class _InstanceRule:
    lookups: int | None      # answers left (None: no count limit)
    until: float | None      # monotonic end (None: no time limit)
    callers: frozenset[str] | None  # access key ids misled (None: every caller)

    def live(self, now: float) -> bool:
        return (self.lookups is None or self.lookups > 0) and (self.until is None or now < self.until)


def caller_key(headers: list[tuple[str, str]] | None) -> str | None:
    """The access key id a request was signed with."""
    for key, value in headers or ():
        if key.lower() == "authorization":
            found = _ACCESS_KEY.search(value)
            return found.group(1) if found else None
    return None


class Visibility:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._visible_at: dict[str, float] = {}
        self._instances: dict[str, _InstanceRule] = {}

    def hide_instance(self, instance_id: str, *, lookups: int | None = None,
                      seconds: float | None = None, callers: set[str] | None = None) -> None:
        """Answer DescribeInstances naming ``instance_id`` InvalidInstanceID.NotFound for the
        next ``lookups`` such calls and/or ``seconds`` from now (at least one is required),
        to ``callers`` (access key ids; None: anyone). Replaces the instance's earlier rule."""
        if lookups is None and seconds is None:
            raise ValueError("instance_not_found: give lookups, seconds or both")
        if lookups is not None and (isinstance(lookups, bool) or not isinstance(lookups, int)
                                    or lookups < 1):
            raise ValueError(f"instance_not_found: lookups must be an integer >= 1, got {lookups!r}")
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                    or seconds <= 0):
            raise ValueError(f"instance_not_found: seconds must be > 0, got {seconds!r}")
        with self._lock:
            self._instances[instance_id] = _InstanceRule(
                lookups, None if seconds is None else time.monotonic() + seconds,
                None if callers is None else frozenset(callers))

    def _instance_refusal(self, params: dict, caller: str | None) -> Ec2Response | None:
        now = time.monotonic()
        with self._lock:
            named = [i for i in sorted(numbered(params, "InstanceId")) if i in self._instances]
            hidden = [i for i in named if self._instances[i].live(now) and (
                self._instances[i].callers is None or caller in self._instances[i].callers)]
            if not hidden:
                return None
            for instance_id in hidden:  # one answer spends one lookup of each rule it used
                rule = self._instances[instance_id]
                if rule.lookups is not None:
                    rule.lookups -= 1
        return error_response(400, "InvalidInstanceID.NotFound",
                              f"The instance ID '{hidden[0]}' does not exist")

    def created(self, action: str, response: Ec2Response, window_s: float) -> None:
        """Note a successful create (before any fault replaces its answer)."""
        kind = _CREATES.get(action)
        if kind is None or window_s <= 0 or response.status != 200:
            return
        resource_id = child_text(response.xml(), _KINDS[kind][0])
        if resource_id:
            with self._lock:
                self._visible_at.setdefault(resource_id, time.monotonic() + window_s)

    def _hidden(self, resource_id: str, now: float) -> bool:
        return self._visible_at.get(resource_id, 0.0) > now

    def refusal(self, action: str, params: dict,
                headers: list[tuple[str, str]] | None = None) -> Ec2Response | None:
        """A Describe by id that names a hidden resource: EC2's NotFound for it."""
        if action == "DescribeInstances":
            return self._instance_refusal(params, caller_key(headers))
        if action not in _DESCRIBES:
            return None
        element, parameter, code, noun = _KINDS[_DESCRIBES[action][0]]
        now = time.monotonic()
        with self._lock:
            hidden = sorted(i for i in numbered(params, parameter) if self._hidden(i, now))
        if not hidden:
            return None
        return error_response(400, code, f"The {noun} '{hidden[0]}' does not exist.")

    def filtered(self, action: str, response: Ec2Response) -> Ec2Response:
        """A listed Describe without the hidden resources."""
        if action not in _DESCRIBES or response.status != 200:
            return response
        kind, set_name = _DESCRIBES[action]
        now = time.monotonic()
        with self._lock:
            if not any(self._hidden(i, now) for i in self._visible_at):
                return response
            root = response.xml()
            items = child(root, set_name)
            if items is None:
                return response
            for item in list(items):
                if self._hidden(child_text(item, _KINDS[kind][0]), now):
                    items.remove(item)
        return response.with_xml(root)

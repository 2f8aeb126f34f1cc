"""EC2's eventual consistency for resources just created, on request.

EC2 documents that a volume or snapshot may be reported ``InvalidVolume.NotFound`` /
``InvalidSnapshot.NotFound`` on a Describe by id, and be missing from listed Describes, for
a while after the call that created it succeeded. moto shows everything at once, so agents
that treat "not found" as "gone" pass against it and crash against EC2. The fault proxy
(never the checker's proxy) asks this module to hide each new resource for the fault plan's
``not_found_after_create_s``.

A resource is hidden once, from its first creation answer: a CreateVolume replayed by its
ClientToken returns the same volume and does not hide it again.
"""
from __future__ import annotations

import threading
import time

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


class Visibility:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._visible_at: dict[str, float] = {}

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

    def refusal(self, action: str, params: dict) -> Ec2Response | None:
        """A Describe by id that names a hidden resource: EC2's NotFound for it."""
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

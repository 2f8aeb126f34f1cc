"""A transient "not found" from DescribeInstances, as EC2 documents it for an instance launched
moments ago (eventual consistency), for one boto3 client: the answer is EC2's error shape
(HTTP 400, InvalidInstanceID.NotFound), given instead of sending the request. The local
cloud's fault proxy injects throttling and 5xx only, hence this narrow hook."""
from __future__ import annotations

import threading
import types


class NotFoundFor:
    """Answer DescribeInstances of any of ``instance_ids`` with NotFound, ``times`` times
    (None = always); ``lookups`` counts the lookups of those instances, answered or not."""

    def __init__(self, instance_ids, times: int | None = 1):
        self.instance_ids = set(instance_ids)
        self.left = times
        self.lookups = 0
        self.injected = 0
        self._lock = threading.Lock()

    def install(self, client) -> "NotFoundFor":
        client.meta.events.register("before-call.ec2.DescribeInstances", self._before_call)
        return self

    def _before_call(self, params=None, **_):
        body = (params or {}).get("body") or {}
        asked = {v for k, v in (body.items() if isinstance(body, dict) else [])
                 if k.startswith("InstanceId.")}
        if not asked or not asked <= self.instance_ids:
            return None
        with self._lock:
            self.lookups += 1
            if self.left is not None and self.left <= 0:
                return None
            if self.left is not None:
                self.left -= 1
            self.injected += 1
        ids = ", ".join(sorted(asked))
        http = types.SimpleNamespace(status_code=400, headers={}, text="", content=b"")
        return http, {"Error": {"Code": "InvalidInstanceID.NotFound",
                                "Message": f"The instance ID '{ids}' does not exist"},
                      "ResponseMetadata": {"HTTPStatusCode": 400}}

"""The local cloud's call ledger: what every AWS request that reached the proxy asked and got.

Checkers judge the agent on this file, never on its logs: the cloud writes it and the agent is
never told its path. One JSON object a line, appended with one ``write`` under a lock, so a
reader sees whole records only. The fields are listed in docs/internals.md ("The call ledger").
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl, urlsplit

from spotrun.jsonlines import read_jsonl

_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/[^/]*/([^/]*)/([^/]+)/")
# Resource ids the checkers follow; ami-/subnet-/sg- ids are not the job's resources.
_ID_VALUE = re.compile(r"^(?:vol|snap|i|fleet|sfr|lt|sir)-[0-9a-fA-F][0-9a-fA-F-]{6,}$")
_ID_PARAM = re.compile(
    r"(?:^|\.)(?:VolumeId|SnapshotId|SourceSnapshotId|InstanceId|InstanceIds|ResourceId|FleetId|"
    r"FleetIds|SpotFleetRequestId|SpotFleetRequestIds|SpotInstanceRequestId|LaunchTemplateId|"
    r"LaunchTemplateName|AutoScalingGroupName|AutoScalingGroupNames)(?:\.(?:member\.)?\d+)?$")
_TAG_KEY = re.compile(r"^(?:(TagSpecification\.\d+\.)?Tag\.\d+|Tags\.member\.\d+)\.Key$")
# Answer elements holding what a successful call created (searched anywhere in the XML).
_CREATED = {"CreateVolume": ("volumeId",), "CreateSnapshot": ("snapshotId",),
            "CopySnapshot": ("snapshotId",), "CreateSnapshots": ("snapshotId",),
            "RunInstances": ("instanceId",), "CreateFleet": ("fleetId", "instanceIds"),
            "RequestSpotFleet": ("spotFleetRequestId",),
            "RequestSpotInstances": ("spotInstanceRequestId",),
            "CreateLaunchTemplate": ("launchTemplateId",), "CreateImage": ("imageId",),
            "CopyImage": ("imageId",), "RegisterImage": ("imageId",)}
# Created by name: the name is in the request, the answer is empty.
_CREATED_BY_NAME = {"CreateAutoScalingGroup": "AutoScalingGroupName", "CreateTable": "TableName"}
READ_ONLY_PREFIXES = ("Describe", "Get", "List", "Query", "Scan", "BatchGet", "TransactGet",
                      "Search", "Lookup", "Simulate")


def is_mutating(service: str | None, action: str | None, method: str = "POST") -> bool:
    """Whether the call can change the cloud's state (DynamoDB PutItem, EC2 CreateTags, ...).

    Everything that is not a read is mutating, including calls the rule does not know:
    a checker must rather see a harmless call than miss a harmful one."""
    if not action:
        return method.upper() not in ("GET", "HEAD", "OPTIONS")
    return not action.startswith(READ_ONLY_PREFIXES)


class Ledger:
    """Append-only JSON lines, one per request, written by the proxies' threads."""

    def __init__(self, path: str | Path, instance_of: Callable[[str], str | None]):
        self.path = Path(path)
        self._instance_of = instance_of
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._seq = 0
        self._last_t = 0.0

    def open(self) -> None:
        with self._lock:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def record(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes, *,
               status: int, answer: bytes, t0: float, checker: bool = False,
               injected: dict | None = None, performed_answer: bytes | None = None) -> dict:
        """Describe one answered request and append it. ``performed_answer`` is moto's 200
        answer when a fault replaced it after the action was performed."""
        entry = describe(method, path, headers, body, status=status, answer=answer,
                         injected=injected, performed_answer=performed_answer)
        entry["instance"] = self._instance_of(entry["caller"]) if entry["caller"] else None
        entry["checker"] = checker
        entry["t0"] = t0
        with self._lock:
            self._seq += 1
            self._last_t = max(time.time(), self._last_t)
            line = json.dumps({"seq": self._seq, "t": self._last_t, **entry},
                              separators=(",", ":"), default=str) + "\n"
            if self._fd is not None:
                os.write(self._fd, line.encode())
        return entry


def describe(method: str, path: str, headers: list[tuple[str, str]], body: bytes, *,
             status: int, answer: bytes, injected: dict | None = None,
             performed_answer: bytes | None = None) -> dict[str, Any]:
    lowered = {k.lower(): v for k, v in headers}
    credential = _CREDENTIAL.search(lowered.get("authorization", ""))
    caller, region, service = credential.groups() if credential else (None, None, None)
    entry: dict[str, Any] = {"service": service, "action": None, "caller": caller,
                             "region": region, "method": method, "resources": [], "tags": {},
                             "created": [], "status": status, "error": None,
                             "injected": injected}
    target = lowered.get("x-amz-target", "")
    params: dict[str, str] = {}
    if target:
        entry["action"] = target.rsplit(".", 1)[-1]
        _describe_json(entry, body)
    elif "x-www-form-urlencoded" in lowered.get("content-type", ""):
        params = dict(parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))
        entry["action"] = params.get("Action")
        entry["resources"] = _resources(params)
        entry["tags"] = {v: params.get(k[:-3] + "Value") for k, v in params.items()
                         if _TAG_KEY.match(k)}
    if entry["action"] is None:
        entry["path"] = urlsplit(path).path
    action = entry["action"]
    created_answer = answer if status == 200 else performed_answer
    if created_answer and action in _CREATED:
        entry["created"] = _created_ids(created_answer, _CREATED[action])
    elif (status == 200 or performed_answer) and action in _CREATED_BY_NAME:
        name = params.get(_CREATED_BY_NAME[action]) or entry.get("table")
        entry["created"] = [name] if name else []
    if status >= 400:
        entry["error"] = _error_code(answer)
    return entry


def _resources(params: dict[str, str]) -> list[str]:
    return list(dict.fromkeys(value for key, value in params.items()
                              if value and (_ID_PARAM.search(key) or _ID_VALUE.match(value))))


def _plain(attributes: Any) -> dict[str, Any]:
    """DynamoDB's typed attributes ({"S": "x"}) as plain values, scalars only."""
    attributes = attributes if isinstance(attributes, dict) else {}
    return {name: value for name, typed in attributes.items() if isinstance(typed, dict)
            for kind, value in typed.items() if kind in ("S", "N", "BOOL")}


def _describe_json(entry: dict[str, Any], body: bytes) -> None:
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        request = None
    if not isinstance(request, dict):
        return
    if request.get("TableName"):
        entry["table"] = str(request["TableName"])
    transact = [part for item in request.get("TransactItems") or [] if isinstance(item, dict)
                for part in item.values() if isinstance(part, dict)]
    entry["resources"] = list(dict.fromkeys(str(name) for name in [
        request.get("TableName"), *(request.get("RequestItems") or {}),  # Batch*Item
        *(part.get("TableName") for part in transact)] if name))
    for field, name in (("key", "Key"), ("item", "Item")):
        if name in request:
            entry[field] = _plain(request[name])
    if request.get("ConditionExpression"):
        entry["condition"] = request["ConditionExpression"]


def _xml(data: bytes) -> ET.Element | None:
    try:
        return ET.fromstring(data)
    except ET.ParseError:
        return None


def _created_ids(answer: bytes, names: tuple[str, ...]) -> list[str]:
    root = _xml(answer)
    found: dict[str, None] = {}
    for element in root.iter() if root is not None else ():
        if element.tag.rsplit("}", 1)[-1] in names:
            texts = [element.text] if len(element) == 0 else [sub.text for sub in element.iter()]
            found.update((t.strip(), None) for t in texts if t and t.strip())
    return list(found)


def _error_code(answer: bytes) -> str | None:
    """The AWS error code of an error answer: query protocol XML (EC2 ``<Errors><Error>``,
    Auto Scaling/IAM ``<ErrorResponse><Error>``) or JSON ``__type`` (DynamoDB)."""
    root = _xml(answer)
    if root is not None:
        for element in root.iter():
            if element.tag.rsplit("}", 1)[-1] == "Code" and element.text:
                return element.text.strip()
        return None
    try:
        document = json.loads(answer)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    code = document.get("__type") or document.get("code")
    return str(code).rsplit("#", 1)[-1] if code else None


# -- reading --------------------------------------------------------------------------------
def read_ledger(path: str | Path) -> list[dict[str, Any]]:
    """Every record, in file order. A last line without its newline (the cloud killed while
    writing) is left out; any other line that is not a JSON object is an error."""
    return read_jsonl(path, skip_torn_last=True, bad="raise", skip_blank=False)


def performed(record: dict[str, Any]) -> bool:
    """Whether the request took effect: answered < 400, or performed before a fault's 5xx."""
    if record.get("injected"):
        return bool(record["injected"].get("performed"))
    return int(record.get("status") or 0) < 400


def calls(records: Iterable[dict[str, Any]], action: str | Iterable[str] | None = None,
          resource: str | None = None, caller_instance: str | None = None,
          mutating: bool | None = None, service: str | None = None,
          checker: bool | None = False) -> list[dict[str, Any]]:
    """The records matching every filter given (None: any). ``resource`` matches a named or
    created id; ``checker=False`` (default) leaves out the checker proxy's calls."""
    actions = {action} if isinstance(action, str) else set(action) if action else None
    tests = [
        actions is None or (lambda r: r.get("action") in actions),
        service is None or (lambda r: r.get("service") == service),
        resource is None or (lambda r: resource in r.get("resources", [])
                             or resource in r.get("created", [])),
        caller_instance is None or (lambda r: r.get("instance") == caller_instance),
        checker is None or (lambda r: bool(r.get("checker")) == checker),
        mutating is None or (lambda r: is_mutating(r.get("service"), r.get("action"),
                                                   r.get("method", "POST")) == mutating),
    ]
    tests = [test for test in tests if test is not True]
    return [r for r in records if all(test(r) for test in tests)]


def created_ids(records: Iterable[dict[str, Any]], prefix: str = "") -> list[str]:
    """Every id the recorded calls created (performed ones included), first creation first."""
    return list(dict.fromkeys(i for record in records for i in record.get("created", [])
                              if i.startswith(prefix)))

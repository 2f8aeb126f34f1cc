"""EC2 query protocol: read requests' parameters; parse, rewrite and build answers as EC2
sends them."""
from __future__ import annotations

import fnmatch
import re
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable

from spotrun.localcloud.faults import error_body

EC2_NAMESPACE = "http://ec2.amazonaws.com/doc/2016-11-15/"
_FILTER_KEY = re.compile(r"^Filter\.(\d+)\.(Name|Value\.\d+)$")


@dataclass
class Ec2Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def xml(self) -> ET.Element:
        root = ET.fromstring(self.body)
        if root.tag.startswith("{"):
            # Serialise back with the same default namespace rather than "ns0:" prefixes.
            ET.register_namespace("", root.tag[1:root.tag.index("}")])
        return root

    def with_xml(self, root: ET.Element) -> "Ec2Response":
        body = ET.tostring(root, encoding="utf-8", xml_declaration=True)
        return Ec2Response(self.status, _replace_length(self.headers, len(body)), body)

    @classmethod
    def document(cls, name: str, **fields: str) -> "Ec2Response":
        ET.register_namespace("", EC2_NAMESPACE)
        root = ET.Element(f"{{{EC2_NAMESPACE}}}{name}")
        ET.SubElement(root, f"{{{EC2_NAMESPACE}}}requestId").text = str(uuid.uuid4())
        for key, value in fields.items():
            ET.SubElement(root, f"{{{EC2_NAMESPACE}}}{key}").text = value
        body = ET.tostring(root, encoding="utf-8", xml_declaration=True)
        return cls(200, [("Content-Type", "text/xml;charset=UTF-8"),
                         ("Content-Length", str(len(body)))], body)


def error_response(status: int, code: str, message: str) -> Ec2Response:
    body = error_body(code, message)
    return Ec2Response(status, [("Content-Type", "text/xml;charset=UTF-8"),
                                ("Content-Length", str(len(body)))], body)


def _replace_length(headers: list[tuple[str, str]], length: int) -> list[tuple[str, str]]:
    kept = [(k, v) for k, v in headers if k.lower() != "content-length"]
    return kept + [("Content-Length", str(length))]


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def child(element: ET.Element, name: str) -> ET.Element | None:
    for sub in element:
        if _local(sub.tag) == name:
            return sub
    return None


def child_text(element: ET.Element, name: str) -> str:
    sub = child(element, name)
    return (sub.text or "") if sub is not None else ""


def set_child_text(element: ET.Element, name: str, value: str) -> None:
    sub = child(element, name)
    if sub is None:
        namespace = element.tag[:element.tag.index("}") + 1] if element.tag.startswith("{") else ""
        sub = ET.SubElement(element, namespace + name)
    sub.text = value


def filters_of(params: dict, names: set[str] | dict) -> tuple[dict, dict[str, list[str]]]:
    """Split ``Filter.N.*`` parameters into those named in ``names`` and the rest.

    Returns the parameters without the named filters (renumbered, as botocore numbers
    them) and {filter name: [values]} for the named ones.
    """
    grouped: dict[int, dict] = {}
    rest = {}
    for key, value in params.items():
        match = _FILTER_KEY.match(key)
        if match is None:
            rest[key] = value
            continue
        entry = grouped.setdefault(int(match.group(1)), {"values": []})
        if match.group(2) == "Name":
            entry["name"] = value
        else:
            entry["values"].append(value)
    own: dict[str, list[str]] = {}
    number = 0
    for index in sorted(grouped):
        entry = grouped[index]
        if entry.get("name") in names:
            own.setdefault(entry["name"], []).extend(entry["values"])
            continue
        number += 1
        if "name" in entry:
            rest[f"Filter.{number}.Name"] = entry["name"]
        for position, value in enumerate(entry["values"], start=1):
            rest[f"Filter.{number}.Value.{position}"] = value
    return rest, own


def matches(item: ET.Element, filters: dict[str, list[str]],
            values_of: Callable[[ET.Element, str], list[str]]) -> bool:
    """EC2 filter semantics: every filter matches (AND), any of its values (OR), * and ?."""
    for name, patterns in filters.items():
        values = values_of(item, name)
        if not any(fnmatch.fnmatchcase(value, pattern)
                   for value in values for pattern in patterns):
            return False
    return True


def instance_ids(params: dict) -> set[str]:
    return numbered(params, "InstanceId")


def numbered(params: dict, name: str) -> set[str]:
    """The values of a query-protocol list ``Name.1``, ``Name.2``, ..."""
    return {value for key, value in params.items()
            if key.startswith(name + ".") and key[len(name) + 1:].isdigit()}


def tag_params(params: dict) -> dict[str, str | None]:
    """``Tag.N.Key``/``Tag.N.Value`` as {key: value or None}."""
    tags: dict[str, str | None] = {}
    for key, value in params.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "Tag" and parts[2] == "Key":
            tags[value] = params.get(f"Tag.{parts[1]}.Value")
    return tags

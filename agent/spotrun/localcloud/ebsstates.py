"""The overlay's record of EC2 states moto does not have, and how they show in answers."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from spotrun.localcloud.ec2xml import child, child_text, set_child_text


@dataclass
class Attachment:
    instance_id: str
    device: str
    attach_time: str
    state: str  # attaching | attached | detaching | busy | orphaned (instance terminated)
    due: float  # when the current transition may complete
    force: bool = False


@dataclass
class VolumeState:
    volume_id: str
    ready_at: float
    az: str = ""
    attachment: Attachment | None = None
    announced: bool = False  # the "volume_available" event was recorded


@dataclass
class SnapshotState:
    snapshot_id: str
    started: float
    done_at: float
    announced: bool = False  # the "snapshot_completed" event was recorded


def rewrite_volume_item(item: ET.Element, state: VolumeState, now: float) -> None:
    """moto's ``<item>`` of a volume, as EC2 shows it at ``now`` (time.monotonic())."""
    att = state.attachment
    if now < state.ready_at:
        set_child_text(item, "status", "creating")
    if att is None:
        return
    attachment_set = child(item, "attachmentSet")
    if attachment_set is None:
        attachment_set = ET.SubElement(item, _tag(item, "attachmentSet"))
    entries = [e for e in attachment_set if child_text(e, "instanceId") == att.instance_id]
    if not entries:  # moto dropped it at termination; EC2 still shows it
        entry = ET.SubElement(attachment_set, _tag(item, "item"))
        for name, value in (("volumeId", state.volume_id), ("instanceId", att.instance_id),
                            ("device", att.device), ("status", "detaching"),
                            ("attachTime", att.attach_time),
                            ("deleteOnTermination", "false")):
            ET.SubElement(entry, _tag(item, name)).text = value
        entries = [entry]
    # "busy" is EC2's attachment state while the OS still holds a detaching volume.
    shown = "detaching" if att.state == "orphaned" else att.state
    for entry in entries:
        set_child_text(entry, "status", shown)
    set_child_text(item, "status", "in-use")


def rewrite_snapshot_item(item: ET.Element, snap: SnapshotState, now: float) -> None:
    """``pending`` with a growing progress until the modelled duration is over."""
    if now < snap.done_at:
        done = (now - snap.started) / max(snap.done_at - snap.started, 1e-9)
        set_child_text(item, "status", "pending")
        set_child_text(item, "progress", f"{min(int(done * 100), 99)}%")


def _tag(reference: ET.Element, name: str) -> str:
    namespace = reference.tag[:reference.tag.index("}") + 1] if reference.tag.startswith("{") else ""
    return namespace + name


def volume_filter_values(item: ET.Element, name: str) -> list[str]:
    if name == "status":
        return [child_text(item, "status")]
    attachment_set = child(item, "attachmentSet")
    entries = list(attachment_set) if attachment_set is not None else []
    field = {"attachment.status": "status", "attachment.instance-id": "instanceId",
             "attachment.device": "device"}[name]
    return [child_text(entry, field) for entry in entries]

"""What EC2 does around EBS that moto does not: asynchronous states and the data plane.

moto is synchronous: a volume is ``available`` at once, a snapshot ``completed`` with
progress ``100%``, an attachment ``attached`` in the AttachVolume call, a detach immediate
even while the volume is mounted, and TerminateInstances detaches every volume on the spot.
EC2 does none of that, so the proxy routes the EBS actions through this overlay, which:

* does the data plane work (ebs.py) for each action moto performs;
* remembers when each transition completes (TimingModel) and rewrites moto's answers to
  DescribeVolumes / DescribeSnapshots (and the Create*/Attach answers) to show the states
  EC2 shows meanwhile: ``creating``, ``pending`` + progress, ``attaching``, ``detaching``,
  ``busy``, and ``in-use`` for a terminated instance's volumes;
* refuses what EC2 refuses and moto allows: attaching a ``creating`` volume, attaching a
  volume to an instance in another AZ (``InvalidVolume.ZoneMismatch``) or to a terminated
  one, creating a volume from a ``pending`` snapshot, attaching or deleting a volume still
  held by a terminated instance, reusing a CreateVolume ClientToken;
* defers moto's own DetachVolume until the detach has really completed, i.e. after
  ``detach_s`` and once the device is no longer mounted (or Force=true) -- on EC2 a detach
  of a mounted volume stays in ``detaching``/``busy`` until the OS lets go.

Why rewrite answers rather than change moto's objects: moto's model has no field for
these states (Volume.status is computed from the attachment, Snapshot.progress is a
constant, terminate detaches in place), so changing them would mean patching moto's
internals; the answer XML is AWS's documented wire format and does not change with moto.
The price: moto's own endpoint (``moto_endpoint``) shows the underlying, untimed state.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from spotrun.localcloud.ebs import EbsDataPlane
from spotrun.localcloud.ebsclock import EbsClock
from spotrun.localcloud.ebsstates import (Attachment, SnapshotState, VolumeState,
                                          rewrite_snapshot_item, rewrite_volume_item,
                                          volume_filter_values)
from spotrun.localcloud.ec2xml import (Ec2Response, child, child_text, error_response,
                                       filters_of, instance_ids, matches, numbered,
                                       set_child_text, tag_params)
from spotrun.localcloud.timing import TimingModel

Forward = Callable[[dict], Ec2Response]
# DescribeVolumes/DescribeSnapshots filters on the states this overlay changes: moto
# would filter on its untimed state, so they are applied here, after the rewrite.
VOLUME_STATE_FILTERS = {"status": "status", "attachment.status": "attachment.status",
                        "attachment.instance-id": "attachment.instance-id",
                        "attachment.device": "attachment.device"}
SNAPSHOT_STATE_FILTERS = {"status": "status"}


class Ec2Overlay(EbsClock):
    def __init__(self, dataplane: EbsDataPlane, timing: TimingModel, moto: Forward,
                 device_dir_for: Callable[[str], Path | None],
                 record_event: Callable[..., None],
                 before_power_off: Callable[[str, set[str]], None] | None = None,
                 after_power_on: Callable[[set[str]], None] | None = None,
                 tags_changed: Callable[[set[str], dict, dict], None] | None = None):
        self.dataplane = dataplane
        self.timing = timing
        self._moto = moto  # call moto directly (no faults), for the overlay's own requests
        self._device_dir_for = device_dir_for
        self._record = record_event
        # The cloud's hook: kill the instances' processes and drop their mounts first.
        self._before_power_off = before_power_off or (lambda state, ids: None)
        self._after_power_on = after_power_on or (lambda ids: None)
        self._tags_changed = tags_changed or (lambda ids, added, removed: None)
        self._lock = threading.RLock()
        self._volumes: dict[str, VolumeState] = {}
        self._snapshots: dict[str, SnapshotState] = {}
        self._client_tokens: dict[str, tuple[dict, Ec2Response]] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="localcloud-ebs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # -- dispatch -----------------------------------------------------------------------
    def handle(self, action: str, params: dict, forward: Forward) -> Ec2Response:
        handler = getattr(self, f"_on_{action}", None)
        return handler(params, forward) if handler else forward(params)

    def _on_CreateVolume(self, params: dict, forward: Forward) -> Ec2Response:
        # EC2 makes CreateVolume idempotent by ClientToken (botocore fills one in and keeps
        # it across its retries); moto ignores it, so a retried call would make a second
        # volume. Same token, same request: the first answer again; other request: refused.
        token = params.get("ClientToken")
        request = {k: v for k, v in params.items() if k != "ClientToken"}
        if token:
            with self._lock:
                seen = self._client_tokens.get(token)
            if seen is not None:
                if seen[0] != request:
                    return error_response(400, "IdempotentParameterMismatch",
                                          "The client token has been used with other parameters.")
                return seen[1]
        response = self._create_volume(params, forward)
        if token and response.status == 200:
            with self._lock:
                self._client_tokens[token] = (request, response)
        return response

    def _create_volume(self, params: dict, forward: Forward) -> Ec2Response:
        snapshot_id = params.get("SnapshotId")
        with self._lock:
            snap = self._snapshots.get(snapshot_id) if snapshot_id else None
            if snap and time.monotonic() < snap.done_at:
                # EC2 creates volumes only from completed snapshots (IncorrectState; e.g.
                # github.com/velero-io/velero/issues/1799).
                return error_response(400, "IncorrectState",
                                      "Snapshot is in invalid state - pending")
        response = forward(params)
        if response.status != 200:
            return response
        root = response.xml()
        volume_id, size = child_text(root, "volumeId"), int(child_text(root, "size") or 1)
        self.dataplane.create_volume(volume_id, size, snapshot_id)
        with self._lock:
            self._volumes[volume_id] = VolumeState(
                volume_id, time.monotonic() + self.timing.volume_create_s,
                child_text(root, "availabilityZone"))
        # EC2 answers CreateVolume with state "creating"; it becomes "available" later.
        set_child_text(root, "status", "creating")
        self._record("volume_created", volume_id=volume_id, size_gib=size,
                     snapshot_id=snapshot_id, availability_zone=child_text(root, "availabilityZone"))
        self._wake.set()
        return response.with_xml(root)

    def _on_DeleteVolume(self, params: dict, forward: Forward) -> Ec2Response:
        volume_id = params.get("VolumeId", "")
        with self._lock:
            state = self._volumes.get(volume_id)
            if state and state.attachment:
                return _in_use(volume_id, state.attachment.instance_id)
        response = forward(params)
        if response.status == 200:
            self.dataplane.delete_volume(volume_id)
            with self._lock:
                self._volumes.pop(volume_id, None)
            self._drop_tags_of(volume_id)
            self._record("volume_deleted", volume_id=volume_id)
        return response

    def _on_AttachVolume(self, params: dict, forward: Forward) -> Ec2Response:
        volume_id, instance_id = params.get("VolumeId", ""), params.get("InstanceId", "")
        now = time.monotonic()
        with self._lock:
            state = self._volumes.get(volume_id)
            if state and now < state.ready_at:
                return error_response(400, "IncorrectState",
                                      f"vol '{volume_id}' is not 'available'.")
            if state and state.attachment:
                return _in_use(volume_id, state.attachment.instance_id)
        if state is not None:
            refusal = self._check_instance_for(state, instance_id)
            if refusal is not None:
                return refusal
        response = forward(params)
        if response.status != 200 or state is None:
            return response  # a volume the data plane does not know (an AMI's root volume)
        root = response.xml()
        with self._lock:
            state.attachment = Attachment(instance_id, params.get("Device", ""),
                                          child_text(root, "attachTime"), "attaching",
                                          now + self.timing.attach_s)
        set_child_text(root, "status", "attaching")
        self._record("volume_attaching", volume_id=volume_id, instance_id=instance_id)
        self._wake.set()
        return response.with_xml(root)

    def _check_instance_for(self, state: VolumeState, instance_id: str) -> Ec2Response | None:
        """What EC2 checks and moto does not: same AZ, and an instance that still exists."""
        answer = self._moto({"Action": "DescribeInstances", "InstanceId.1": instance_id})
        if answer.status != 200:
            return answer  # moto's own InvalidInstanceID.NotFound
        root = answer.xml()
        zone = next((e.text for e in root.iter() if e.tag.endswith("}availabilityZone")), "")
        placement_state = next((child_text(e, "name") for e in root.iter()
                                if e.tag.endswith("}instanceState")), "")
        if placement_state in ("shutting-down", "terminated"):
            return error_response(400, "IncorrectInstanceState",
                                  f"The instance '{instance_id}' is not in a valid state "
                                  f"for this operation.")
        if state.az and zone and zone != state.az:
            return error_response(400, "InvalidVolume.ZoneMismatch",
                                  f"The volume '{state.volume_id}' is not in the same "
                                  f"availability zone as instance '{instance_id}'")
        return None

    def _on_DetachVolume(self, params: dict, forward: Forward) -> Ec2Response:
        volume_id = params.get("VolumeId", "")
        force = params.get("Force", "").lower() == "true"
        with self._lock:
            state = self._volumes.get(volume_id)
            att = state.attachment if state else None
            if state is None:
                return forward(params)  # moto answers for volumes it alone knows
            if att is None:
                # (moto answers this with a 500 when InstanceId is left out.)
                return error_response(400, "IncorrectState",
                                      f"Volume '{volume_id}' is in the 'available' state.")
            wanted = params.get("InstanceId")
            if wanted and wanted != att.instance_id:
                return error_response(400, "IncorrectState",
                                      f"Volume '{volume_id}' is not attached to '{wanted}'.")
            if att.state in ("attached", "attaching"):
                att.state, att.due = "detaching", time.monotonic() + self.timing.detach_s
            if att.state != "orphaned":  # a terminated instance's volume is detaching anyway
                att.force = att.force or force
            instance_id, device, attach_time = att.instance_id, att.device, att.attach_time
        self._record("volume_detaching", volume_id=volume_id, instance_id=instance_id, force=force)
        self._wake.set()
        # moto detaches at once (and fails without InstanceId); its DetachVolume is called when
        # the detach completes, so this answer is EC2's, built here.
        return Ec2Response.document(
            "DetachVolumeResponse", volumeId=volume_id, instanceId=instance_id,
            device=device, status="detaching", attachTime=attach_time)

    def _on_CreateSnapshot(self, params: dict, forward: Forward) -> Ec2Response:
        volume_id = params.get("VolumeId", "")
        response = forward(params)
        if response.status != 200:
            return response
        root = response.xml()
        snapshot_id = child_text(root, "snapshotId")
        if self.dataplane.has_volume(volume_id):
            self.dataplane.snapshot(volume_id, snapshot_id)
        now = time.monotonic()
        with self._lock:
            self._snapshots[snapshot_id] = SnapshotState(snapshot_id, now,
                                                         now + self.timing.snapshot_s)
        # EC2 answers CreateSnapshot with "pending"; the data was captured at this call.
        set_child_text(root, "status", "pending")
        set_child_text(root, "progress", "0%")
        self._record("snapshot_created", snapshot_id=snapshot_id, volume_id=volume_id)
        return response.with_xml(root)

    def _on_DeleteSnapshot(self, params: dict, forward: Forward) -> Ec2Response:
        snapshot_id = params.get("SnapshotId", "")
        response = forward(params)
        if response.status == 200:
            self.dataplane.delete_snapshot(snapshot_id)
            with self._lock:
                self._snapshots.pop(snapshot_id, None)
            self._drop_tags_of(snapshot_id)
            self._record("snapshot_deleted", snapshot_id=snapshot_id)
        return response

    def _drop_tags_of(self, resource_id: str) -> None:
        """EC2's tags go with their resource; moto keeps them. Worse, moto finds each
        object's tags by scanning its whole tag store, so every tag-filtered Describe slowed
        as the tags of deleted volumes and snapshots piled up (a long soak: 4,500 tags,
        a filtered DescribeSnapshots 30 times slower than on a fresh cloud)."""
        answer = self._moto({"Action": "DescribeTags", "Filter.1.Name": "resource-id",
                             "Filter.1.Value.1": resource_id})
        if answer.status != 200:
            return
        keys = [e.text for e in answer.xml().iter() if e.tag.endswith("}key") and e.text]
        if keys:
            self._moto({"Action": "DeleteTags", "ResourceId.1": resource_id,
                        **{f"Tag.{n}.Key": key for n, key in enumerate(keys, 1)}})

    def _on_DescribeVolumes(self, params: dict, forward: Forward) -> Ec2Response:
        params, own_filters = filters_of(params, VOLUME_STATE_FILTERS)
        response = forward(params)
        if response.status != 200:
            return response
        root = response.xml()
        volume_set = child(root, "volumeSet")
        for item in list(volume_set if volume_set is not None else []):
            with self._lock:
                state = self._volumes.get(child_text(item, "volumeId"))
                if state is not None:
                    rewrite_volume_item(item, state, time.monotonic())
            if own_filters and not matches(item, own_filters, volume_filter_values):
                volume_set.remove(item)
        return response.with_xml(root)

    def _on_DescribeSnapshots(self, params: dict, forward: Forward) -> Ec2Response:
        params, own_filters = filters_of(params, SNAPSHOT_STATE_FILTERS)
        response = forward(params)
        if response.status != 200:
            return response
        root = response.xml()
        snapshot_set = child(root, "snapshotSet")
        now = time.monotonic()
        for item in list(snapshot_set if snapshot_set is not None else []):
            with self._lock:
                snap = self._snapshots.get(child_text(item, "snapshotId"))
            if snap is not None:
                rewrite_snapshot_item(item, snap, now)
            if own_filters and not matches(item, own_filters,
                                           lambda it, name: [child_text(it, "status")]):
                snapshot_set.remove(item)
        return response.with_xml(root)

    def _on_TerminateInstances(self, params: dict, forward: Forward) -> Ec2Response:
        ids = instance_ids(params)
        self._before_power_off("terminated", ids)
        response = forward(params)
        if response.status == 200:
            self.orphan_attachments(ids)
        return response

    def _on_StopInstances(self, params: dict, forward: Forward) -> Ec2Response:
        # A stopped instance keeps its EBS attachments (AWS); only its processes and mounts go.
        self._before_power_off("stopped", instance_ids(params))
        return forward(params)

    def _on_StartInstances(self, params: dict, forward: Forward) -> Ec2Response:
        response = forward(params)
        if response.status == 200:
            self._after_power_on(instance_ids(params))
        return response

    def _on_CreateTags(self, params: dict, forward: Forward) -> Ec2Response:
        # Instance metadata's tags/instance follows the instance's tags (when enabled).
        response = forward(params)
        if response.status == 200:
            self._tags_changed(numbered(params, "ResourceId"), tag_params(params), {})
        return response

    def _on_DeleteTags(self, params: dict, forward: Forward) -> Ec2Response:
        response = forward(params)
        if response.status == 200:
            self._tags_changed(numbered(params, "ResourceId"), {}, tag_params(params))
        return response


def _in_use(volume_id: str, instance_id: str) -> Ec2Response:
    return error_response(400, "VolumeInUse",
                          f"{volume_id} is already attached to an instance ({instance_id})")

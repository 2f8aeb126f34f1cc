"""The EBS overlay's clock: completes attachments and detachments when they are due.

A mixin of :class:`spotrun.localcloud.overlay.Ec2Overlay`, whose state (``_volumes``,
``_snapshots``, ``_lock``, ``dataplane``, ``timing``) it drives from one thread.
"""
from __future__ import annotations

import time

from spotrun.localcloud.ebs import DataPlaneError
from spotrun.localcloud.ebsstates import Attachment
from spotrun.log import get_logger

log = get_logger("localcloud.ec2")


class EbsClock:
    # -- what terminations do to attachments ---------------------------------------------
    def orphan_attachments(self, instance_ids: set[str]) -> None:
        """A terminated instance's volumes stay ``in-use`` for detach_after_terminate_s.

        moto has already dropped the attachments; the overlay keeps showing them (AWS:
        the volume stays attached while the instance shuts down) and releases the device
        when the delay is over.
        """
        due = time.monotonic() + self.timing.detach_after_terminate_s
        with self._lock:
            for state in self._volumes.values():
                att = state.attachment
                if att and att.instance_id in instance_ids and att.state != "orphaned":
                    att.state, att.due, att.force = "orphaned", due, True
                    self._record("volume_orphaned", volume_id=state.volume_id,
                                 instance_id=att.instance_id)
        self._wake.set()

    # -- the clock -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._advance()
            except Exception:  # noqa: BLE001 - never let the clock die; log and carry on
                log.exception("ebs_clock_error")
            self._wake.wait(self.timing.poll_s)
            self._wake.clear()

    def _advance(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [(s.volume_id, s.attachment) for s in self._volumes.values()
                   if s.attachment and s.attachment.due <= now]
            ready = [s for s in self._volumes.values() if not s.announced and s.ready_at <= now]
            done = [s for s in self._snapshots.values() if not s.announced and s.done_at <= now]
            for finished in ready + done:
                finished.announced = True
        # One event per modelled transition, so tests and people can await them.
        for volume in ready:
            self._record("volume_available", volume_id=volume.volume_id)
        for snapshot in done:
            self._record("snapshot_completed", snapshot_id=snapshot.snapshot_id)
        for volume_id, att in due:
            if att.state == "attaching":
                self._complete_attach(volume_id, att)
            elif att.state in ("detaching", "busy", "orphaned"):
                self._complete_detach(volume_id, att)

    def _complete_attach(self, volume_id: str, att: Attachment) -> None:
        device_dir = self._device_dir_for(att.instance_id)
        if device_dir is not None:
            try:
                link = self.dataplane.attach(volume_id, device_dir)
            except DataPlaneError as exc:
                # EC2 leaves such an attachment stuck in "attaching"; so does this.
                att.due = float("inf")
                self._record("volume_attach_stuck", volume_id=volume_id, error=str(exc))
                return
        else:
            link = None
        with self._lock:
            att.state = "attached"
        self._record("volume_attached", volume_id=volume_id, instance_id=att.instance_id,
                     link=str(link) if link else None)

    def _complete_detach(self, volume_id: str, att: Attachment) -> None:
        if not att.force and self.dataplane.is_busy(volume_id):
            if att.state != "busy":
                att.state = "busy"  # EC2's attachment state while the OS holds the volume
                self._record("volume_detach_busy", volume_id=volume_id,
                             instance_id=att.instance_id,
                             device=self.dataplane.device_of(volume_id))
            return
        self.dataplane.detach(volume_id, force=True)
        if att.state != "orphaned":
            answer = self._moto({"Action": "DetachVolume", "VolumeId": volume_id,
                                 "InstanceId": att.instance_id, "Device": att.device})
            if answer.status != 200:
                log.warning("moto_detach_failed", volume_id=volume_id, status=answer.status,
                            body=answer.body[:300].decode(errors="replace"))
        with self._lock:
            state = self._volumes.get(volume_id)
            if state is not None:
                state.attachment = None
        self._record("volume_detached", volume_id=volume_id, instance_id=att.instance_id,
                     after_termination=att.state == "orphaned")



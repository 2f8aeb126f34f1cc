"""What the job's volumes held on their images at the moment a DeleteVolume reached the local
cloud: invariant 2 asks that the old volume go only after its copy's checkpoint is readable
on the copy's image, and only the cloud side can see that moment. The soak wraps the EC2
overlay (every agent call passes through it) and reads the images itself (debugfs, no mount),
before the delete is let through; the agent takes no part.
"""
from __future__ import annotations

import threading

from spotrun import tags as T
from spotrun.harness.rehearsal_volume import VolumeReadError, read_volume_state


class DeleteWitness:
    """``seen[volume]``: {job volume: newest readable checkpoint step, or None} as the images
    were when the first DeleteVolume of ``volume`` arrived (a retry finds the same)."""

    def __init__(self, cloud):
        self.cloud = cloud
        self.seen: dict[str, dict[str, int | None]] = {}
        self._lock = threading.Lock()

    def install(self) -> "DeleteWitness":
        overlay = self.cloud._overlay
        handle = overlay.handle

        def witnessed(action, params, forward):
            if action == "DeleteVolume" and params.get("VolumeId"):
                self._before_delete(params["VolumeId"])
            return handle(action, params, forward)

        overlay.handle = witnessed
        return self

    def _newest_step(self, volume_id: str) -> int | None:
        try:
            state = read_volume_state(volume_id, self.cloud.dataplane.volume_path(volume_id))
        except (VolumeReadError, OSError):
            return None
        return state.newest.step if state.newest is not None else None

    def _before_delete(self, volume_id: str) -> None:
        with self._lock:
            if volume_id in self.seen:
                return
        # moto itself, not through a proxy: this runs inside the proxy's own request.
        ec2 = self.cloud.moto_client("ec2")
        try:
            [volume] = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]
        except Exception:  # noqa: BLE001 - gone or unknown: EC2 answers the delete itself
            return
        job = T.as_dict(volume.get("Tags")).get(T.JOB)
        if not job:
            return
        volumes = ec2.describe_volumes(Filters=T.job_filters(job))["Volumes"]
        steps = {v["VolumeId"]: self._newest_step(v["VolumeId"]) for v in volumes}
        with self._lock:
            self.seen.setdefault(volume_id, steps)

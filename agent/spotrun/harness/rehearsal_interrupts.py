"""The rehearsal's interruptions: what it sends each instance and when — spot notices at a
training step, after so many seconds of training or once a file is on the volume, scheduled
instance-retirement events, rebalance recommendations — and what it reads back after each
drain. A mixin of spotrun.harness.rehearsal.Rehearsal (its cloud, fleet, boots and timeline)."""
from __future__ import annotations

import glob
import time
from pathlib import Path

from spotrun.log import get_logger
from spotrun.harness.rehearsal_report import InterruptionRecord, MissedInterruption, TimelineEntry, wall_time
from spotrun.harness.rehearsal_volume import VolumeReadError, list_script_files

log = get_logger("rehearsal")


class Interrupting:
    def _missed(self, targets: list) -> None:
        """Training finished (the agent cancelled the fleet) before these notices could land."""
        for kind, target in targets:
            if kind == "step":
                self.missed.append(MissedInterruption(
                    target, "training finished (the fleet was cancelled) before the trainer "
                            "reached it: choose a step before the end"))
                self.say(f"no notice sent for step {target}: training finished first")
            elif kind in ("after", "maintenance"):
                self.missed_after.append((target, "training finished (the fleet was cancelled) "
                                                  "before it: choose a shorter time"))
                self.say(f"no notice sent {target:g} s after the trainer started: "
                         "training finished first")
            else:
                self.missed_files.append((target, "training finished (the fleet was cancelled) "
                                                  "before such a file appeared"))
                self.say(f"no notice sent for a file matching {target}: training finished first")

    def _file_appeared(self, pattern: str):
        """(instance, step) once a file matching ``pattern`` is on the current instance's
        volume; "cancelled" once the fleet is gone."""
        if self._fleet_cancelled():
            return "cancelled"
        inst = self.current_instance()
        if inst is None or self._already_interrupted(inst) or not any(b["instance_id"] == inst.instance_id
                                                                     for b in self.boots):
            return None
        if not glob.glob(str(self.on_volume(inst, pattern))):
            return None
        step = self.progress_of(inst).get("global_step")
        return inst, step if isinstance(step, int) else 0

    def _after(self, seconds: float):
        """(instance, step) once the current instance's trainer has run ``seconds``;
        "cancelled" once the fleet is gone."""
        if self._fleet_cancelled():
            return "cancelled"
        inst = self.current_instance()
        if inst is None or self._already_interrupted(inst):
            return None
        started = self._trainer_started_wall(inst.instance_id)
        if started is None or time.time() - started < seconds:
            return None
        step = self.progress_of(inst).get("global_step")
        # A script with no progress file (or none yet) has no step to show: 0 keeps the
        # report's "notice before the checkpoint" comparison meaningful.
        return inst, step if isinstance(step, int) else 0

    def _send_rebalances(self) -> None:
        try:
            self._post_rebalances()
        except Exception:  # noqa: BLE001 - a thread's error must reach the log, not vanish
            log.exception("rebalances_failed")

    def _post_rebalances(self) -> None:
        """The k-th rebalance recommendation to the k-th instance that trains, once its trainer
        has run the asked seconds; one that cannot land is noted, as a missed notice is."""
        for k, seconds in enumerate(self.plan.rebalance_after_s):
            while True:
                if self._finished.wait(0.25):  # another process's log: nothing to block on
                    return
                if self._fleet_cancelled():
                    self.missed_rebalances.append((seconds, "training finished first"))
                    break
                started = [(b["instance_id"], wall) for b in list(self.boots)
                           if (wall := self._trainer_started_wall(b["instance_id"])) is not None]
                if len(started) <= k or time.time() - started[k][1] < seconds:
                    continue
                instance_id = started[k][0]
                inst = self.cloud.instance(instance_id)
                if inst.state != "running" or self._already_interrupted(inst):
                    self.missed_rebalances.append(
                        (seconds, f"{instance_id} was no longer training by then"))
                    break
                self.cloud.rebalance(instance_id)
                self.rebalances.append({"instance_id": instance_id, "after_s": seconds,
                                        "wall": time.time()})
                self.timeline.append(TimelineEntry(time.time(), "rehearsal",
                                                   f"rebalance recommendation posted to {instance_id}"))
                self.say(f"rebalance recommendation to {instance_id}, {seconds:g} s after its "
                         "trainer started")
                break

    def schedule_as_run(self) -> dict:
        """This run's interruptions as time-based ones — seconds of training on each instance
        when each landed — and the training time in all, to replay the same schedule with
        another trainer (rehearse --compare-with-callback)."""
        after, retire = [], []
        for record in self.interruptions:
            started = self._trainer_started_wall(record.instance_id)
            seconds = max(0.5, round(record.notice_wall - started, 1)) if started else 0.5
            (retire if record.cause == "instance-retirement" else after).append(seconds)
        training_s = 0.0
        for boot in self.boots:
            started = self._trainer_started_wall(boot["instance_id"])
            exits = [wall_time(e.get("ts")) for e in self._agent_events(boot["instance_id"])
                     if e.get("event") == "trainer_exited"]
            if started and exits and exits[-1]:
                training_s += exits[-1] - started
        return {"interrupt_after_s": after, "maintenance_after_s": retire,
                "training_s": round(training_s, 1)}

    def _next_trainer_exit(self, rebalance: dict) -> dict | None:
        """How the instance's trainer next exited after a rebalance recommendation: a script
        without a SIGUSR1 handler that was signalled dies of it (-10)."""
        for event in self._agent_events(rebalance["instance_id"]):
            if event.get("event") == "trainer_exited" and (wall_time(event.get("ts")) or 0) >= rebalance["wall"]:
                return {"returncode": event.get("returncode"), "outcome": event.get("outcome")}
        return None

    def _trainer_started_wall(self, instance_id: str) -> float | None:
        for event in self._agent_events(instance_id):
            if event.get("event") == "phase_changed" and event.get("phase") == "training":
                return wall_time(event.get("ts"))
        return None

    def _already_interrupted(self, inst) -> bool:
        # The drained instance stays a fleet member until its notice's time is up.
        return any(r.instance_id == inst.instance_id for r in self.interruptions)

    def _at_step(self, target: int):
        """(instance, step) once the current instance's trainer reports ``target``; "cancelled"
        once the fleet is gone (training finished first)."""
        if self._fleet_cancelled():
            return "cancelled"
        inst = self.current_instance()
        if inst is None or self._already_interrupted(inst):
            return None
        step = self.progress_of(inst).get("global_step")
        return (inst, step) if isinstance(step, int) and step >= target else None

    def _interrupt(self, inst, step: int, deadline: float, retire: bool = False) -> None:
        from datetime import datetime, timedelta, timezone

        record = InterruptionRecord(inst.instance_id, inst.az, step, time.time())
        where = (f"at training step {step}" if self.progress_of(inst)
                 else "(the trainer writes no progress file)")
        if retire:  # NotBefore has whole seconds, as AWS writes it
            not_before = (datetime.now(timezone.utc) + timedelta(seconds=self.plan.notice_s + 1)
                          ).replace(microsecond=0)
            self.cloud.schedule_maintenance(inst.instance_id, code="instance-retirement",
                                            not_before=not_before)
            what = (f"instance-retirement event scheduled for {inst.instance_id} {where}, "
                    f"not before {not_before.timestamp() - record.notice_wall:.0f} s from now")
        else:
            self.cloud.interrupt(inst.instance_id, "terminate", in_seconds=self.plan.notice_s)
            what = (f"spot notice posted to {inst.instance_id} {where}, termination in "
                    f"{self.plan.notice_s:g} s")
        record.cause = "instance-retirement" if retire else "spot notice"
        self.interruptions.append(record)
        self.timeline.append(TimelineEntry(record.notice_wall, "rehearsal", what))
        log.info("notice_sent", instance_id=inst.instance_id, at_step=step, cause=record.cause)
        self.say(what)
        released = self._await(f"{inst.instance_id} to drain",
                               lambda: self._drained_event(inst.instance_id), deadline)
        # Unmounted now, and deleted only after the replacement's copy is verified: read the
        # checkpoint the replacement must resume from, straight from the image.
        try:
            state = self._read_volume(released.get("volume_id"))
            record.volume_after_drain = state.as_dict()
            if not state.checkpoints:  # a script of its own: its files are the evidence
                record.script_files_after_drain = list_script_files(
                    self.cloud.dataplane.volume_path(released.get("volume_id")))
            newest = state.newest
            holds = (f"checkpoint {newest.name} at step {newest.step}" if newest else
                     f"the script's {Path(record.script_files_after_drain[-1]['path']).name} newest"
                     if record.script_files_after_drain else "no checkpoint")
            self.say(f"{inst.instance_id} drained in {released.get('drain_s')} s: the volume holds "
                     f"{holds}; unmounted, snapshotted and released")
        except VolumeReadError as exc:
            record.volume_read_error = str(exc)
            self.say(f"{inst.instance_id} drained, but its volume could not be read: {exc}")
        if retire:
            self._await("the retirement's time", lambda: time.time() >= not_before.timestamp(),
                        deadline, interval=0.25)
            self.cloud.terminate(inst.instance_id)
            self.timeline.append(TimelineEntry(time.time(), "rehearsal",
                                               f"{inst.instance_id} retired (terminated) at its event's time"))
            self.say(f"{inst.instance_id} retired at its event's time")

"""One soak job: a Spot Fleet on the shared local cloud whose instances run the real agent
(booted, and restarted on failure, as systemd would) with the counting trainer, and the hooks
the fault kinds of :mod:`spotrun.harness.soakfaults` use to wait for their moment and inject."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

from spotrun.localcloud import faultagent
from spotrun.jsonlines import parse_jsonl
from spotrun.log import get_logger
from spotrun.harness.rehearsal import Rehearsal, RehearsalPlan
from spotrun.harness.rehearsal_report import wall_time
from spotrun.harness.soakfaults import CATALOGUE
from spotrun.harness.soakinject import read_json_lines
from spotrun.harness.soakkinds_cloud import MAX_NOT_FOUND_S
from spotrun.harness.soakplan import PAIR_KINDS, JobPlan
from spotrun.waiting import wait_until

log = get_logger("soak")
LEASE_TABLE = "soak-leases"  # one table for the soak's jobs, created with the cloud


class JobEnded(Exception):
    """The job's fleet was cancelled while the soak still meant to interrupt it."""


class SoakJob(Rehearsal):
    """One planned job on a shared cloud: the rehearsal's fleet and boot, with fault hooks."""

    notice_s = 6.0
    restart_sec = 1.0          # systemd's RestartSec, scaled down like the notice
    maintenance_lead_s = 3.0

    def __init__(self, cloud, out: Path, plan: JobPlan, repository: str, timeout_s: float):
        env = {"STEPS": str(plan.steps), "STEP_S": str(plan.step_s),
               "CKPT_EVERY": str(plan.ckpt_every)}
        super().__init__(RehearsalPlan(
            out=out, job_id=plan.job_id, repository=repository,
            command=[sys.executable, "train.py"], trainer_env=env, interrupt_at_steps=[],
            notice_s=self.notice_s, timeout_s=timeout_s,
            lease_table=LEASE_TABLE if plan.lease else "",
            # Without the table, the operator's promise of one instance (soakplan gives such
            # jobs only kinds where no two agents meet).
            # The consistency window fits the cloud's lag model: with the AWS default (120 s)
            # a replacement that waits out a drain's unrecorded snapshot and then its own
            # ambiguous CreateSnapshot spent 227 s in lookups and ran past the job's timeout
            # (long soak, seed 1, job 59) -- a wait sized for AWS, not a fault.
            agent_config={"trainer": {"drain_reserve_s": 2.0, "restart_backoff_s": 0.5},
                          "agent": {"maintenance_lead_s": self.maintenance_lead_s},
                          "aws": {"consistency_window_s": 4 * MAX_NOT_FOUND_S,
                                  **({} if plan.lease else {"single_instance": True})}}),
            cloud=cloud)
        self.job_plan = plan
        self.deadline = time.monotonic() + timeout_s
        self.gone: list[str] = []               # instances interrupted, in order
        self.outcomes = []                      # soakfaults.Outcome per slot
        self.unreached: list[str] = []          # kinds of slots the job finished before
        self.same_instance_interruptions: list[dict] = []  # checked at the next resume there
        self.corrupted: list[tuple[str, str]] = []
        self.crash_next_boot: str | None = None
        self.crash_armed: dict[str, str] = {}
        self.pause_next_boot: str | None = None  # crashpoints.PAUSEPOINTS, for the next boot
        self.pause_armed: dict[str, str] = {}
        self.ec2_faults_on = False
        self.slow_timing_on = False
        self._clear_on_next_training = False
        self._base_timing = None
        self.cancelled_by_soak = False
        self.bad_input_results: list[dict] = []
        self.race_results: list[dict] = []
        self.slot_started = time.time()
        self.started_wall = time.time()  # the ledger's records of this job come after it
        # The cloud's call ledger from this job's start on, read incrementally (ledger_records).
        path = Path(cloud.ledger_path)
        self._ledger_offset = path.stat().st_size if path.exists() else 0
        self._ledger_records: list[dict] = []
        self.first_capacity = 1  # >1: the fleet starts that many instances at once

    # -- boot, as systemd would -----------------------------------------------------------

    def boot(self, cloud, inst) -> subprocess.Popen:
        import tomli_w

        from spotrun.localcloud.agents import agent_argv

        config_path = inst.root / "agent.toml"
        if not config_path.exists():
            config_path.write_text(tomli_w.dumps(self._agent_config(inst)))
        env = inst.env()
        point, self.crash_next_boot = self.crash_next_boot, None
        if point:
            env[faultagent.CRASH_ENV] = point
            self.crash_armed[inst.instance_id] = point
        pause, self.pause_next_boot = self.pause_next_boot, None
        if pause:
            env[faultagent.PAUSE_ENV] = pause
            self.pause_armed[inst.instance_id] = pause
        argv = agent_argv("agent", "run", "--config", str(config_path))
        with open(inst.root / "agent.log", "ab") as log_file:
            boot = {"instance_id": inst.instance_id, "az": inst.az, "boot_wall": time.time(),
                    "log": str(inst.root / "agent.log")}
            boot["process"] = cloud.start_process(inst, argv, env=env, stdout=log_file,
                                                  stderr=subprocess.STDOUT)
        with self._lock:
            self.boots.append(boot)
        return boot["process"]

    def restart_agent(self, inst) -> bool:
        with inst.power_lock:  # a terminated instance boots nothing
            if inst.state != "running":
                return False
            self.boot(self.cloud, inst)
            return True

    def _systemd_tick(self) -> None:
        """Restart=on-failure, RestartSec, RestartPreventExitStatus=2: an agent that died by a
        signal or a non-zero exit (not 2) on a running instance is started again."""
        now = time.monotonic()
        for boot in list(self.boots):
            proc = boot["process"]
            if boot.get("handled") or proc.poll() is None:
                continue
            if proc.returncode in (0, 2):
                boot["handled"] = True
                continue
            boot.setdefault("died_at", now)
            if now - boot["died_at"] >= self.restart_sec:
                boot["handled"] = True
                inst = self.cloud.instances.get(boot["instance_id"])
                if inst is not None and self.restart_agent(inst):
                    log.info("agent_restarted", instance_id=inst.instance_id,
                             returncode=proc.returncode)

    def await_agent_restart(self, instance_id: str) -> None:
        count = sum(b["instance_id"] == instance_id for b in self.boots)
        self.wait(f"{instance_id}'s agent to be restarted",
                  lambda: sum(b["instance_id"] == instance_id for b in self.boots) > count, 30)

    # -- waiting on the job's truth -------------------------------------------------------

    def _check_alive(self) -> None:
        if self._fleet_cancelled():
            raise JobEnded(f"{self.plan.job_id}: fleet cancelled before the soak's last slot")

    def wait(self, what: str, condition, timeout: float | None = None):
        deadline = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)

        def ticked():
            self._systemd_tick()
            return condition()
        # Another process's files and logs: nothing to block on.
        return wait_until(ticked, deadline - time.monotonic(), interval_s=0.05, what=what,
                          error=lambda: TimeoutError(f"{self.plan.job_id}: timed out waiting for {what}"))

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)  # a deliberate delay in the fault schedule, not synchronisation

    def await_current_instance(self):
        def current():
            self._check_alive()
            for member in reversed(self.fleet.live_members() if self.fleet else []):
                if member.instance_id not in self.gone and any(
                        b["instance_id"] == member.instance_id for b in self.boots):
                    return self.cloud.instance(member.instance_id)
            return None
        return self.wait("the current instance", current)

    def events_of(self, instance_id: str) -> list[dict]:
        return self._agent_events(instance_id)

    def _matching(self, instance_id: str, event: str, since: float, match: dict) -> dict | None:
        for item in self.events_of(instance_id):
            if item.get("event") == event and all(item.get(k) == v for k, v in match.items()) \
                    and (wall_time(item.get("ts")) or 0) >= since:
                return item
        return None

    def has_trained(self, instance_id: str) -> bool:
        return self._matching(instance_id, "phase_changed", 0, {"phase": "training"}) is not None

    def await_event(self, instance_id: str, event: str, timeout: float = 60.0, **match) -> dict:
        since = self.slot_started

        def found():
            hit = self._matching(instance_id, event, since, match)
            if not hit:
                self._check_alive()
            return hit
        return self.wait(f"{event} {match or ''} from {instance_id}", found, timeout)

    def await_released_or_gone(self, inst, timeout: float) -> bool:
        """True once the agent released the volume; False if the instance went first."""
        def ended():
            if self._matching(inst.instance_id, "phase_changed", self.slot_started,
                              {"phase": "released"}):
                return "released"
            if inst.state != "running":
                return "gone"
            self._check_alive()
            return None
        return self.wait(f"{inst.instance_id} to release or go", ended, timeout) == "released"

    def await_event_or_training(self, instance_id: str, event: str, **match) -> bool:
        def seen():
            if self._matching(instance_id, event, 0, match):
                return "seen"
            if self.has_trained(instance_id):
                return "training"
            return None
        return self.wait(f"{event} on {instance_id}", seen, 60) == "seen"

    def await_agent_exit_or_training(self, instance_id: str) -> bool:
        def ended():
            proc = self.agent_process(instance_id)
            if proc is not None and proc.poll() is not None:
                return "exited"
            if self.has_trained(instance_id):
                return "training"
            return None
        return self.wait(f"{instance_id}'s agent to crash or train", ended, 90) == "exited"

    def await_agent_paused(self, instance_id: str, timeout_s: float = 90, *,
                           trained_ok: bool = False) -> int | None:
        """The pid of the agent once it has stopped itself at its pause point; None if it
        exited, or trained instead (unless ``trained_ok``: a pause point reached only after
        training, as a sweep's between two experiments)."""
        def paused():
            proc = self.agent_process(instance_id)
            if proc is None or proc.poll() is not None:
                return "gone"
            if not trained_ok and self.has_trained(instance_id):
                return "trained"
            try:
                state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return None
            return proc.pid if state == "T" else None
        answer = self.wait(f"{instance_id}'s agent to pause", paused, timeout_s)
        return answer if isinstance(answer, int) else None

    def current_phase(self, instance_id: str) -> str | None:
        phases = [e.get("phase") for e in self.events_of(instance_id) if e.get("event") == "phase_changed"]
        return phases[-1] if phases else None

    def agent_process(self, instance_id: str):
        procs = [b["process"] for b in self.boots if b["instance_id"] == instance_id]
        return procs[-1] if procs else None

    def trainer_pid(self, inst) -> int | None:
        started = [e for e in self.events_of(inst.instance_id) if e.get("event") == "trainer_started"]
        return started[-1].get("pid") if started else None

    def _fresh_progress(self, inst) -> dict:
        """The progress file, only once this instance's latest trainer wrote it."""
        started = [e for e in self.events_of(inst.instance_id) if e.get("event") == "trainer_started"]
        if not started:
            return {}
        progress = self.progress_of(inst)
        written = progress.get("time")
        if not isinstance(written, (int, float)) or written < (wall_time(started[-1].get("ts")) or 0):
            return {}
        return progress

    def step_of(self, inst) -> int | None:
        return self._fresh_progress(inst).get("global_step")

    def await_training_step(self, target: int):
        inst = self.await_current_instance()

        def reached():
            self._check_alive()
            if inst.state != "running":
                raise RuntimeError(f"{inst.instance_id} went away before step {target}")
            step = self.step_of(inst)
            return isinstance(step, int) and step >= target

        self.wait(f"training step {target} on {inst.instance_id}", reached)
        if self._clear_on_next_training:
            self._clear_on_next_training = False
            self.clear_faults()
        return inst

    def expect_resume_on_same_instance(self, instance_id: str, step: int | None, cause: str,
                                       allowance: int = 1, limit: int | None = None):
        """An interruption inside one instance (the trainer or agent killed, or the instance
        stopped and started): the next trainer on it must resume within ``limit`` steps of
        ``step`` (default: ``allowance`` checkpoint intervals)."""
        starts = self.trainer_starts(instance_id)
        self.same_instance_interruptions.append({
            "instance_id": instance_id, "observed_step": step, "cause": cause,
            "starts_before": len(starts), "allowance": allowance, "limit": limit})

    def expect_trainer_restart(self, instance_id: str, step: int | None, cause: str,
                               allowance: int = 1) -> None:
        """The trainer died under a running agent, which restarts it (with backoff) from the
        newest checkpoint that verifies."""
        self.await_event(instance_id, "trainer_restart_scheduled", timeout=30)
        self.expect_resume_on_same_instance(instance_id, step, cause, allowance)

    def end_boots(self, instance_id: str) -> None:
        """The instance stopped: its agent went with it, and is booted anew on start, not
        restarted (systemd's Restart= is for a unit that failed on a running system)."""
        for boot in self.boots:
            if boot["instance_id"] == instance_id:
                boot["handled"] = True

    def trainer_starts(self, instance_id: str) -> list[dict]:
        path = self.cloud.instance(instance_id).state_dir / "trainer.log"
        return [e for e in read_json_lines(path) if e.get("event") == "trainer_start"]

    def job_resources(self) -> tuple[set[str], set[str]]:
        """The ids of the job's volumes and snapshots, from the cloud's fault-free view."""
        from spotrun import tags as T

        ec2 = self.cloud.client("ec2", faults=False)
        filters = T.job_filters(self.plan.job_id)
        return ({v["VolumeId"] for v in ec2.describe_volumes(Filters=filters)["Volumes"]},
                {s["SnapshotId"] for s in ec2.describe_snapshots(Filters=filters,
                                                                  OwnerIds=["self"])["Snapshots"]})

    def ledger_records(self) -> list[dict]:
        """The cloud's ledger records since this job started (whole lines only), new ones
        read on each call; the checkers judge races on these, never on the agents' logs."""
        try:
            with open(self.cloud.ledger_path, "rb") as fh:
                fh.seek(self._ledger_offset)
                data = fh.read()
        except FileNotFoundError:
            return self._ledger_records
        end = data.rfind(b"\n")
        if end >= 0:
            self._ledger_records.extend(parse_jsonl(data[:end + 1].decode("utf-8"),
                                                    source=str(self.cloud.ledger_path)))
            self._ledger_offset += end + 1
        return self._ledger_records

    def ledger_seq(self) -> int:
        records = self.ledger_records()
        return records[-1]["seq"] if records else 0

    # -- faults that outlive one slot -----------------------------------------------------

    def before_interruption(self) -> None:
        """Arm the next slot's boot-time fault before this slot's instance goes."""
        pending, self._prepare_next = getattr(self, "_prepare_next", None), None
        if pending is not None:
            kind, slot = pending
            kind.prepare(self, slot)

    def set_ec2_faults(self, **plan) -> None:
        self.cloud.ec2_faults(**plan)
        self.ec2_faults_on = True

    def set_timing(self, **changes) -> None:
        overlay = self.cloud._overlay  # the timing model the EBS overlay reads on every call
        self._base_timing = self._base_timing or overlay.timing
        overlay.timing = dataclasses.replace(overlay.timing, **changes)
        self.slow_timing_on = True

    def clear_faults(self) -> None:
        if self.ec2_faults_on:
            self.cloud.ec2_faults()
            self.ec2_faults_on = False
        if self.slow_timing_on:
            self.cloud._overlay.timing = self._base_timing
            self.slow_timing_on = False

    # -- the job --------------------------------------------------------------------------

    def run_slots(self) -> str | None:
        """Run every slot; returns an error string if the job could not be driven."""
        slots = self.job_plan.slots
        first = CATALOGUE[slots[0].kind]
        if first.prepare is not None:  # before the first boot, which it is meant for
            first.prepare(self, slots[0])
        self.start()
        if self.first_capacity > 1:  # several first boots at once (soakkinds_races)
            self.fleet.modify_target_capacity(self.first_capacity)
        for position, slot in enumerate(slots):
            kind = CATALOGUE[slot.kind]
            self.slot_started = time.time() - 0.5
            nxt = slots[position + 1] if position + 1 < len(slots) else None
            try:
                # After a pair of replacements no boot-time fault: it would hit a racer.
                if nxt is not None and CATALOGUE[nxt.kind].prepare is not None \
                        and slot.kind not in PAIR_KINDS:
                    self._prepare_next = (CATALOGUE[nxt.kind], nxt)
                else:
                    self._prepare_next = None
                outcome = kind.run(self, slot)
            except JobEnded:
                # The agent cancelled the fleet first: the job finished before this slot's
                # moment (a busy harness let it run ahead). The check decides from the
                # job's own record whether it finished rightly; the moments were missed.
                self.unreached = [s.kind for s in slots[position:]]
                return None
            except Exception as exc:  # noqa: BLE001 - one job's trouble is reported, the soak goes on
                log.exception("soak_slot_failed", job=self.plan.job_id, slot=position, kind=slot.kind)
                return f"slot {position} ({slot.kind}): {type(exc).__name__}: {exc}"
            self.outcomes.append(outcome)
            self.gone.append(outcome.instance_id)
            if slot.kind in ("ec2_faults", "slow_snapshots"):
                self._clear_on_next_training = True
        try:
            self.wait("the fleet to be cancelled", self._fleet_cancelled)
        except TimeoutError as exc:
            return str(exc)
        finally:
            self.clear_faults()
        return None

    def cleanup(self) -> None:
        self.clear_faults()
        if self.fleet is not None and not self._fleet_cancelled():
            self.cancelled_by_soak = True
            self.fleet.cancel(terminate_instances=True)
        for boot in self.boots:
            inst = self.cloud.instances.get(boot["instance_id"])
            if inst is not None and inst.state == "running":
                self.cloud.terminate(inst.instance_id)

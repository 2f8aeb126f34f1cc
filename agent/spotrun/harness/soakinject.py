"""The soak's injection primitives, shared by every fault kind: what a slot returns
(:class:`Outcome`), what a kind is (:class:`Kind`), and the moves most kinds end with — a
notice that the agent drains, or the instance killed outright.

``job`` is always a :class:`spotrun.harness.soakjob.SoakJob`; ``inst`` a local-cloud instance.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from spotrun.jsonlines import read_jsonl


@dataclass
class Outcome:
    instance_id: str
    drained: bool
    cause: str                      # work-lost bucket: "drained notice", "instance killed", ...
    observed_step: int | None = None  # progress seen when an undrained kill was injected
    faults: list[str] = dataclasses.field(default_factory=list)  # extra faults injected on the way


@dataclass(frozen=True)
class Kind:
    name: str
    description: str
    run: Callable[[Any, Any], Outcome]
    prepare: Callable[[Any, Any], None] | None = None


# -- helpers on the driver (``job`` is a soak.SoakJob) ------------------------------------------

def notice_and_drain(job, inst, cause: str, in_seconds: float | None = None,
                     faults: list[str] | None = None,
                     after_notice: Callable[[], None] | None = None) -> Outcome:
    job.before_interruption()
    in_seconds = job.notice_s if in_seconds is None else in_seconds
    job.cloud.interrupt(inst.instance_id, "terminate", in_seconds=in_seconds)
    if after_notice is not None:
        after_notice()
    released = job.await_released_or_gone(inst, timeout=in_seconds + 60)
    if not released:  # the notice's time came first: killed mid-drain, the undrained case
        phase = job.current_phase(inst.instance_id)
        why = "notice ran out mid-drain" if phase in ("draining", "training") else \
            "notice ran out before training"  # the agent acts on notices once training
        return Outcome(inst.instance_id, False, why,
                       observed_step=job.step_of(inst), faults=faults or [])
    # Released: the agent's part is over; the spot service would terminate it at the notice's
    # time, and nothing the agent does changes before then. Terminating now saves soak time.
    job.cloud.terminate(inst.instance_id)
    return Outcome(inst.instance_id, True, cause, faults=faults or [])


def kill_now(job, inst, cause: str, faults: list[str] | None = None) -> Outcome:
    step = job.step_of(inst)
    job.before_interruption()
    job.cloud.terminate(inst.instance_id)
    return Outcome(inst.instance_id, False, cause, observed_step=step, faults=faults or [])


def train_on_then_notice(job, slot, inst, faults: list[str] | None = None) -> Outcome:
    """After a fault the instance survives: train 10-30 steps further, then a drained notice."""
    job.await_training_step(slot.at_step + slot.rng.randint(10, 30))
    return notice_and_drain(job, inst, "drained notice", faults=faults)


def trained(job, slot):
    return job.await_training_step(slot.at_step)


def signal_pid(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def read_json_lines(path: Path) -> list[dict]:
    try:
        return read_jsonl(path, skip_torn_last=False, bad="skip", errors="replace")
    except OSError:
        return []

"""The soak's plans: from (profile, seed), every job's trainer length, checkpoint interval and
one fault kind per interruption, dealt from a shuffled deck of the catalogue so every kind
comes up about equally. Each job's plan depends only on the jobs before it (replayable)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from spotrun.soakfaults import CATALOGUE

PROFILES = {
    # jobs, interruptions per job (lo, hi), per-job timeout
    "short": {"jobs": 3, "slots": (2, 3), "timeout_s": 150.0},
    "long": {"jobs": 55, "slots": (3, 5), "timeout_s": 300.0},
}
NEXT_BOOT_KINDS = {name for name, kind in CATALOGUE.items() if kind.prepare is not None}


@dataclass
class Slot:
    kind: str
    at_step: int
    rng: random.Random = field(repr=False, compare=False, default_factory=random.Random)


@dataclass
class JobPlan:
    index: int
    seed: int
    job_id: str
    steps: int
    ckpt_every: int
    step_s: float
    slots: list[Slot]

    def describe(self) -> dict:
        return {"index": self.index, "seed": self.seed, "job": self.job_id, "steps": self.steps,
                "ckpt_every": self.ckpt_every, "slots": [(s.kind, s.at_step) for s in self.slots]}


def plan_jobs(profile: str, seed: int, jobs: int | None = None,
              kinds: list[str] | None = None) -> list[JobPlan]:
    """Every job's plan from (profile, seed): the same arguments give the same plans."""
    spec = PROFILES[profile]
    rng = random.Random(seed)
    catalogue = sorted(kinds or CATALOGUE)
    deck: list[str] = []
    plans = []
    for index in range(spec["jobs"] if jobs is None else jobs):
        job_rng = random.Random(rng.randrange(1 << 62))
        count = job_rng.randint(*spec["slots"])
        chosen = []
        for _ in range(count):
            if not deck:
                deck = list(catalogue)
                rng.shuffle(deck)
            chosen.append(deck.pop())
        # A kind that acts on the next boot needs a replacement boot: not the first slot.
        if chosen[0] in NEXT_BOOT_KINDS:
            swap = next((i for i, k in enumerate(chosen) if k not in NEXT_BOOT_KINDS), None)
            if swap is not None:
                chosen[0], chosen[swap] = chosen[swap], chosen[0]
        every = job_rng.randint(6, 12)
        step = 0
        slots = []
        for kind in chosen:
            step += job_rng.randint(3 * every, 5 * every)
            slots.append(Slot(kind, step, random.Random(job_rng.randrange(1 << 62))))
        # The tail leaves room for the last notice to land (metadata faults delay it).
        plans.append(JobPlan(index, seed, f"soak-{seed}-{index}", steps=step + max(4 * every, 90),
                             ckpt_every=every, step_s=0.1, slots=slots))
    return plans

"""The soak's plans: from (profile, seed), every job's trainer length, checkpoint interval and
one fault kind per interruption, dealt from a shuffled deck of the catalogue so every kind
comes up about equally. Each job's plan depends only on the jobs before it (replayable)."""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from spotrun.soakfaults import CATALOGUE

PROFILES = {
    # jobs (None: as many as it takes for every kind to come up min_per_kind times),
    # interruptions per job (lo, hi), per-job timeout
    "short": {"jobs": 3, "slots": (2, 3), "timeout_s": 150.0},
    "long": {"jobs": None, "min_per_kind": 11, "slots": (3, 5), "timeout_s": 300.0},
}
# Kinds whose interruption boots two replacements at once: the next slot's boot-time fault
# (a pause or crash point) cannot be aimed at one of them, so none is planned after one.
PAIR_KINDS = {"two_replacements", "kill_mid_migration_two_replacements"}
# Kinds about the job's very first boot: dealt into a job's first slot.
FIRST_BOOT_KINDS = {"simultaneous_first_boots"}
NEXT_BOOT_KINDS = {name for name, kind in CATALOGUE.items()
                   if kind.prepare is not None and name not in FIRST_BOOT_KINDS}
# Kinds where a second agent runs for the job beside the first: two valid replacements, or a
# second instance booted with bad input (refused before it touches anything, but a second
# instance all the same). They need the lease table; a job without one sets
# aws.single_instance (the operator's promise of one instance) and gets only the other kinds,
# where the fleet boots a replacement only once the old instance is terminated.
NEEDS_LEASE = {"two_replacements", "bad_input", "holder_lookup_notfound",
               "replacement_during_verify", "replacement_during_drain",
               "simultaneous_first_boots", "kill_mid_migration_two_replacements"}


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
    lease: bool = False  # the agents coordinate through a DynamoDB lease table

    def describe(self) -> dict:
        return {"index": self.index, "seed": self.seed, "job": self.job_id, "steps": self.steps,
                "ckpt_every": self.ckpt_every, "lease": self.lease,
                "slots": [(s.kind, s.at_step) for s in self.slots]}


def plan_jobs(profile: str, seed: int, jobs: int | None = None,
              kinds: list[str] | None = None) -> list[JobPlan]:
    """Every job's plan from (profile, seed): the same arguments give the same plans."""
    spec = PROFILES[profile]
    rng = random.Random(seed)
    catalogue = sorted(kinds or CATALOGUE)
    deck: list[str] = []
    plans: list[JobPlan] = []
    dealt: Counter = Counter()
    jobs = spec["jobs"] if jobs is None else jobs

    def enough() -> bool:
        if jobs is not None:
            return len(plans) >= jobs
        return min(dealt[kind] for kind in catalogue) >= spec["min_per_kind"]

    while not enough():
        index = len(plans)
        job_rng = random.Random(rng.randrange(1 << 62))
        count = job_rng.randint(*spec["slots"])
        chosen = []
        for _ in range(count):
            if not deck:
                deck = list(catalogue)
                rng.shuffle(deck)
            chosen.append(deck.pop())
        if all(k in NEXT_BOOT_KINDS for k in chosen):
            # Every kind dealt acts on a next boot: trade one for the deck's next that does not.
            if not deck:
                deck = list(catalogue)
                rng.shuffle(deck)
            spare = next((i for i in reversed(range(len(deck))) if deck[i] not in NEXT_BOOT_KINDS),
                         None)
            if spare is not None:
                deck[spare], chosen[0] = chosen[0], deck[spare]
        dealt.update(chosen)
        # A kind that acts on the next boot needs a replacement boot: not the first slot.
        if chosen[0] in NEXT_BOOT_KINDS:
            swap = next((i for i, k in enumerate(chosen) if k not in NEXT_BOOT_KINDS), None)
            if swap is not None:
                chosen[0], chosen[swap] = chosen[swap], chosen[0]
        first = next((i for i, k in enumerate(chosen) if k in FIRST_BOOT_KINDS), None)
        if first:  # (0 or None: nothing to move)
            chosen.insert(0, chosen.pop(first))
        for i in range(1, len(chosen)):
            if chosen[i] in NEXT_BOOT_KINDS and chosen[i - 1] in PAIR_KINDS:
                spot = next((j for j in range(1, len(chosen)) if chosen[j] not in NEXT_BOOT_KINDS
                             and chosen[j - 1] not in PAIR_KINDS and chosen[j] not in PAIR_KINDS
                             and chosen[j] not in FIRST_BOOT_KINDS), None)
                if spot is not None:
                    chosen[i], chosen[spot] = chosen[spot], chosen[i]
        every = job_rng.randint(6, 12)
        step = 0
        slots = []
        for kind in chosen:
            step += job_rng.randint(3 * every, 5 * every)
            slots.append(Slot(kind, step, random.Random(job_rng.randrange(1 << 62))))
        # Both supported set-ups: with a lease table (what `spotrun init` creates) and without
        # (aws.single_instance: the operator promises one instance). Two agents need the table.
        lease = any(kind in NEEDS_LEASE for kind in chosen) or job_rng.random() < 0.5
        # The tail leaves room for the last notice to land (metadata faults delay it).
        plans.append(JobPlan(index, seed, f"soak-{seed}-{index}", steps=step + max(4 * every, 90),
                             ckpt_every=every, step_s=0.1, slots=slots, lease=lease))
    return plans

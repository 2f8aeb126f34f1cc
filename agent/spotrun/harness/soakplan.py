"""The soak's plans: from (profile, seed), every job's trainer length, checkpoint interval and
one fault kind per interruption, dealt from a shuffled deck of the catalogue so every kind
comes up about equally. Each job's plan depends only on the jobs before it (replayable).
A sweep job (:func:`plan_sweep`) is a small sweep shaped for its one sweep kind."""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from spotrun.harness.soakfaults import CATALOGUE

PROFILES = {
    # jobs (None: as many as it takes for every kind to come up min_per_kind times),
    # interruptions per job (lo, hi), per-job timeout; sweeps: every sweep_every-th job is a
    # sweep (issue 19) until each sweep kind came up sweep_min_per_kind times (None: no sweep
    # jobs unless --kinds names a sweep kind).
    "short": {"jobs": 3, "slots": (2, 3), "timeout_s": 150.0},
    "long": {"jobs": None, "min_per_kind": 11, "slots": (3, 5), "timeout_s": 300.0,
             "sweep_every": 8, "sweep_min_per_kind": 4},
}
# A sweep job (spotrun.harness.soakkinds_sweep) is one small sweep on its own fleet: its kind shapes
# it (experiments, capacity) and is its one slot.
SWEEP_KINDS = ("sweep_simultaneous_claims", "sweep_interrupted_between_jobs",
               "sweep_last_two_finish_together")
SWEEP_EVERY_WHEN_MIXED = 3  # --kinds naming both sorts with no profile rate: every 3rd a sweep
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
    # A sweep job: each experiment's steps (its job id: f"{job_id}-e{n}"), the fleet's capacity
    # and the claim policy; () for a single job.
    sweep: tuple[int, ...] = ()
    capacity: int = 1
    claim: str = "in-order"
    variant: str = ""  # how the kind injects, where it has two ways (dealt in turn)

    @property
    def experiments(self) -> dict[str, int]:
        """A sweep's experiments: job id -> steps, in the sweep's order."""
        return {f"{self.job_id}-e{n}": steps for n, steps in enumerate(self.sweep)}

    def describe(self) -> dict:
        out = {"index": self.index, "seed": self.seed, "job": self.job_id, "steps": self.steps,
               "ckpt_every": self.ckpt_every, "lease": self.lease,
               "slots": [(s.kind, s.at_step) for s in self.slots]}
        if self.sweep:
            out.update(sweep=list(self.sweep), capacity=self.capacity, claim=self.claim,
                       **({"variant": self.variant} if self.variant else {}))
        return out


def plan_jobs(profile: str, seed: int, jobs: int | None = None,
              kinds: list[str] | None = None) -> list[JobPlan]:
    """Every job's plan from (profile, seed): the same arguments give the same plans."""
    spec = PROFILES[profile]
    rng = random.Random(seed)
    chosen_kinds = sorted(kinds or CATALOGUE)
    catalogue = [k for k in chosen_kinds if k not in SWEEP_KINDS]
    sweep_kinds = sorted(k for k in (kinds or (SWEEP_KINDS if spec.get("sweep_every") else ()))
                         if k in SWEEP_KINDS)
    every_sweep = spec.get("sweep_every") or SWEEP_EVERY_WHEN_MIXED
    sweep_rng = random.Random(f"{seed}/sweeps")  # its own stream: single jobs' plans as before
    deck: list[str] = []
    sweep_deck: list[str] = []
    plans: list[JobPlan] = []
    dealt: Counter = Counter()
    jobs = spec["jobs"] if jobs is None else jobs

    def enough() -> bool:
        if jobs is not None:
            return len(plans) >= jobs
        return not singles_needed() and not sweeps_needed()

    def singles_needed() -> bool:
        return bool(catalogue) and min(dealt[k] for k in catalogue) < spec["min_per_kind"]

    def sweeps_needed() -> bool:
        return bool(sweep_kinds) and min(dealt[k] for k in sweep_kinds) < spec.get(
            "sweep_min_per_kind", 1)

    def sweep_next(index: int) -> bool:
        if not sweep_kinds:
            return False
        if not catalogue:
            return True
        if jobs is None and not singles_needed():
            return True
        if jobs is None and not sweeps_needed():
            return False
        return index % every_sweep == every_sweep - 1

    while not enough():
        index = len(plans)
        job_rng = random.Random(rng.randrange(1 << 62))
        if sweep_next(index):
            if not sweep_deck:
                sweep_deck = list(sweep_kinds)
                sweep_rng.shuffle(sweep_deck)
            kind = sweep_deck.pop()
            dealt[kind] += 1
            plans.append(plan_sweep(index, seed, kind, job_rng, dealt[kind]))
            continue
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


def plan_sweep(index: int, seed: int, kind: str, rng: random.Random, occurrence: int = 1) -> JobPlan:
    """A small sweep shaped for its kind, every experiment a whole number of checkpoint
    intervals (its last step is a save: spotrun.harness.soakkinds_sweep holds trainers there), each
    with its own step count where the kind allows (the exact sum says whose steps ran).
    ``occurrence``: the how-manieth of its kind; a kind with two ways takes them in turn."""
    variant = ""
    if kind == "sweep_interrupted_between_jobs":
        # Sent away after its next claim (at identify.started) or before it (sweep.claiming),
        # by a notice or killed: the four in turn.
        variant = ("notice", "kill", "notice-before-claim",
                   "kill-before-claim")[(occurrence - 1) % 4]
    every = rng.randint(6, 10)
    if kind == "sweep_simultaneous_claims":
        # As many instances as experiments, booted at once: every one of them claims at once.
        capacity, units = 3, rng.sample(range(6, 12), 3)
    elif kind == "sweep_interrupted_between_jobs":
        # The first instance finishes one and claims a second: four on two.
        capacity, units = 2, rng.sample(range(5, 10), 4)
    else:
        # The last two the same length, started about together (the first two alike).
        first = rng.randint(5, 8)
        last = rng.randint(8, 11)
        capacity, units = 2, [first, first + rng.choice((-1, 1)), last, last]
    steps = tuple(u * every for u in units)
    slot = Slot(kind, 0, random.Random(rng.randrange(1 << 62)))
    return JobPlan(index, seed, f"soak-{seed}-{index}", steps=max(steps), ckpt_every=every,
                   step_s=0.1, slots=[slot], lease=True, sweep=steps, capacity=capacity,
                   claim=rng.choice(("in-order", "zone-first")), variant=variant)

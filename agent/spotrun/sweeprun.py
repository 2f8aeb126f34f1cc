"""The agent on an instance of a sweep's fleet (issue 19): claim an experiment, run it, next.

    claim (spotrun.sweepclaim) ─ none free ─┬─ every experiment finished → take the fleet
      │                                     │   cancel (exactly one instance) → cancel the fleet
      │ claimed: its lease, held            └─ some still held elsewhere → lower the fleet's
      ▼                                         capacity by one and terminate this instance
    the lifecycle of that experiment's job (spotrun.lifecycle, as for a single job, with the
    claimed lease as its volume manager's lease)
      ├─ done or failed: released as finished → claim again
      └─ drained, released, stopped: this instance is going away → stop claiming

The lifecycle's own fleet cancel is not used here: a finished experiment is not the end of a
sweep. Everything this loop decides is read from the lease table and EC2, so an agent
restarted anywhere in it (a crash, a stop and start) simply runs it again: an experiment this
instance still holds is taken back first (``claimpolicy.RESUME``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from spotrun import sweepclaim
from spotrun.config import Config, SweepExperiment
from spotrun.log import get_logger
from spotrun.phases import Phase

log = get_logger("sweep")

# The phases an experiment's lifecycle ends in when the experiment is over for good; any other
# end (drained, released, stopped) means the instance itself is going away.
FINISHED_PHASES = (Phase.DONE, Phase.FAILED)


@dataclass(frozen=True)
class Ran:
    """What one experiment's lifecycle ended with."""
    job_id: str
    phase: Phase | None
    code: int


@dataclass(frozen=True)
class SweepEnd:
    """How this instance's part in the sweep ended."""
    ran: tuple[Ran, ...]
    outcome: str  # "cancelled-fleet", "left-fleet", "other-instance-cancels", "interrupted"
    detail: str = ""


class SweepRunner:
    """One instance's loop over a sweep. The edges are injected:

    ``run_experiment(config, lease, identity) -> Ran``: the experiment's lifecycle, holding
    ``lease``; ``leases(identity)``: one ``spotrun.lease.Lease`` per experiment, in the sweep's
    order; ``take_fleet_cancel(identity) -> bool``: the sweep's one cancel, decided in the table;
    ``cancel_fleet(launched_by)`` / ``leave_fleet(launched_by, instance_id)``: spotrun.fleet."""

    def __init__(self, config: Config, *, identify: Callable[[], Any],
                 leases: Callable[[Any], Sequence[Any]],
                 run_experiment: Callable[[Config, Any, Any], Ran],
                 take_fleet_cancel: Callable[[Any], bool],
                 cancel_fleet: Callable[[Any], str],
                 leave_fleet: Callable[[Any, str], str]):
        if not config.sweep.id:
            raise ValueError("SweepRunner needs a config with a [sweep]")
        self.config = config
        self._identify = identify
        self._leases = leases
        self._run_experiment = run_experiment
        self._take_fleet_cancel = take_fleet_cancel
        self._cancel_fleet = cancel_fleet
        self._leave_fleet = leave_fleet
        self.experiments: dict[str, SweepExperiment] = {e.job: e for e in config.sweep.experiments}

    def run(self) -> SweepEnd:
        identity = self._identify()
        leases = list(self._leases(identity))
        ran: list[Ran] = []
        log.info("sweep_joined", sweep=self.config.sweep.id, experiments=len(leases),
                 instance_id=identity.instance_id, az=identity.availability_zone)
        while True:
            claimed = sweepclaim.claim(leases, identity.availability_zone,
                                       policy=self.config.sweep.claim)
            if claimed is None:
                return self._nothing_left(identity, leases, tuple(ran))
            lease, choice = claimed
            experiment = self.experiments[lease.job_id]
            log.info("sweep_experiment_started", job_id=lease.job_id, reason=choice.reason,
                     args=list(experiment.args), env=sorted(experiment.env))
            result = self._run_experiment(self.config.for_experiment(experiment), lease, identity)
            ran.append(result)
            log.info("sweep_experiment_ended", job_id=result.job_id,
                     phase=result.phase.value if result.phase else None, code=result.code)
            if result.phase not in FINISHED_PHASES:
                return SweepEnd(tuple(ran), "interrupted",
                                f"{result.job_id} ended {result.phase.value if result.phase else 'early'}: "
                                "this instance is going away")

    def _nothing_left(self, identity, leases, ran: tuple[Ran, ...]) -> SweepEnd:
        launched_by = identity.launched_by
        if sweepclaim.all_finished(leases):
            if self._take_fleet_cancel(identity):
                detail = self._cancel_fleet(launched_by)
                log.info("sweep_finished", sweep=self.config.sweep.id, fleet=detail)
                return SweepEnd(ran, "cancelled-fleet", detail)
            return SweepEnd(ran, "other-instance-cancels",
                            "every experiment is finished; another instance cancels the fleet")
        # Experiments are still held by other instances: one fewer instance is needed.
        detail = self._leave_fleet(launched_by, identity.instance_id)
        log.info("sweep_left_fleet", sweep=self.config.sweep.id, detail=detail)
        return SweepEnd(ran, "left-fleet", detail)

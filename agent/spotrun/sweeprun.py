"""The agent on an instance of a sweep's fleet (issue 19): claim an experiment, run it, next.

    claim (spotrun.sweepclaim) ─ none free ─┬─ every experiment finished → take the fleet
      │                                     │   cancel (exactly one instance) → cancel the fleet
      │ claimed: its lease, held            └─ some still held elsewhere → lower the fleet's
      ▼                                         capacity by one and terminate this instance
    the lifecycle of that experiment's job (spotrun.lifecycle, as for a single job, with the
    claimed lease as its volume manager's lease)
      ├─ done or failed: released as finished → (a notice or a stop already due? → stop
      │  claiming, nothing taken) → claim again
      └─ drained, released, stopped: this instance is going away → stop claiming

Before each claim after the first the loop asks ``stop_due`` (:func:`going_away`: the stop
signal and the notice the last experiment's lifecycle was told of but never read, and the
notice path of instance metadata read once now): an instance already told to go claims
nothing, so the next instance takes the experiment at once instead of after a takeover. Each
experiment's events carry its own ``job`` (the log context is put back to the sweep's own
between two experiments: no ``job``, ``volume_id`` or ``phase`` of the last one).

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
from spotrun.crashpoints import pausepoint
from spotrun.log import bind, get_logger, structlog
from spotrun.monitor import SPOT_PATH, SpotNotice
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


def going_away(previous, monitor) -> str | None:
    """Why this instance is already going away (None: it is not), asked between two
    experiments before the next claim: a stop signal the last experiment's lifecycle
    (``previous``, None before the first) received, or a notice or stop its monitor queued
    that it never read (it ended first); else the notice path read once now through
    ``monitor`` (a :class:`spotrun.monitor.InterruptionMonitor`, the lifecycle's own reader).
    A metadata outage is not a notice: the next lifecycle's monitor watches from its boot."""
    if previous is not None and (reason := previous.unread_reason_to_go()) is not None:
        return reason
    try:
        found, _ = monitor.poll_path(SPOT_PATH)
    except Exception as exc:  # noqa: BLE001 - as the lifecycle's last look: not a notice
        log.warning("notice_look_failed", error=str(exc)[:200])
        return None
    for event in found:
        if isinstance(event, SpotNotice):
            return f"spot interruption notice ({event.action})"
    return None


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
                 leave_fleet: Callable[[Any, str], str],
                 stop_due: Callable[[], str | None] | None = None):
        if not config.sweep.id:
            raise ValueError("SweepRunner needs a config with a [sweep]")
        self.config = config
        self._identify = identify
        self._leases = leases
        self._run_experiment = run_experiment
        self._take_fleet_cancel = take_fleet_cancel
        self._cancel_fleet = cancel_fleet
        self._leave_fleet = leave_fleet
        self._stop_due = stop_due
        self.experiments: dict[str, SweepExperiment] = {e.job: e for e in config.sweep.experiments}

    def run(self) -> SweepEnd:
        identity = self._identify()
        log_context = getattr(identity, "log_context", None)
        if log_context is not None:
            bind(**log_context())
        # The sweep's own context (its config's job id, the instance): each experiment's
        # lifecycle adds its job, volume and phase; they are dropped again after it.
        sweep_context = structlog.contextvars.get_contextvars()
        leases = list(self._leases(identity))
        ran: list[Ran] = []
        log.info("sweep_joined", sweep=self.config.sweep.id, experiments=len(leases),
                 instance_id=identity.instance_id, az=identity.availability_zone)
        while True:
            if ran:
                structlog.contextvars.clear_contextvars()
                bind(**sweep_context)
                # The last experiment released (finished), the next not claimed: a test may
                # freeze the instance here (spotrun.crashpoints).
                pausepoint("sweep.claiming")
                why = self._stop_due() if self._stop_due is not None else None
                if why is not None:
                    # Claim nothing: the experiment stays free for the next instance at once.
                    log.warning("sweep_claiming_stopped", reason=why,
                                experiments_ran=[r.job_id for r in ran])
                    return SweepEnd(tuple(ran), "interrupted",
                                    f"{why} before claiming: this instance is going away")
            claimed = sweepclaim.claim(leases, identity.availability_zone,
                                       policy=self.config.sweep.claim)
            if claimed is None:
                return self._nothing_left(identity, leases, tuple(ran))
            lease, choice = claimed
            bind(job=lease.job_id)  # every later event is this experiment's
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

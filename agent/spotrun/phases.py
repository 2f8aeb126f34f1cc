"""The agent lifecycle's phases, what each does next, and the edges between them
(:mod:`spotrun.lifecycle` drives them)."""
from __future__ import annotations

import enum


class Phase(enum.Enum):
    IDENTIFYING = "identifying"
    ACQUIRING = "acquiring-volume"
    CHECKING_OUT = "checking-out"
    TRAINING = "training"
    DRAINING = "draining"
    RELEASED = "released"  # drained after a notice; waiting to be terminated
    STOPPED = "stopped"  # drained for a stop/hibernate notice: the volume stays attached
    FINISHING = "finishing"
    DONE = "done"  # training complete and recorded; the fleet cancel follows at once
    FAILED = "failed"  # the failure policy applies (recorded before any cancel)


# What the agent does next, for `spotrun status` and STATUS=.
NEXT = {
    Phase.IDENTIFYING: "find the job's volume",
    Phase.ACQUIRING: "check out the training code",
    Phase.CHECKING_OUT: "start the trainer",
    Phase.TRAINING: "train until done or interrupted",
    Phase.DRAINING: "unmount, snapshot, detach and release the volume",
    Phase.RELEASED: "wait to be terminated; the next instance resumes",
    Phase.STOPPED: "wait to be stopped; training resumes on start",
    Phase.FINISHING: "record the completion and release the volume",
    Phase.DONE: "cancel the fleet (this instance goes with it); the job is complete",
    Phase.FAILED: "nothing: see the failure reason on the volume's tags",
}


# The state machine's edges; anything else is a bug in spotrun.lifecycle, not a cloud event.
ALLOWED = {
    None: {Phase.IDENTIFYING},
    # → DRAINING from before training: a notice stops the phase at its next safe point
    # (spotrun.boot); nothing to checkpoint, only the volume (if any) to give back.
    Phase.IDENTIFYING: {Phase.ACQUIRING, Phase.FINISHING, Phase.DRAINING},
    Phase.ACQUIRING: {Phase.CHECKING_OUT, Phase.FINISHING, Phase.DRAINING},
    Phase.CHECKING_OUT: {Phase.TRAINING, Phase.DRAINING},
    Phase.TRAINING: {Phase.DRAINING, Phase.FINISHING, Phase.FAILED},
    Phase.DRAINING: {Phase.RELEASED, Phase.STOPPED},
    Phase.FINISHING: {Phase.DONE},
    # Drained for scheduled maintenance that was then called off: take the volume back.
    Phase.RELEASED: {Phase.ACQUIRING}, Phase.STOPPED: {Phase.ACQUIRING},
    Phase.DONE: set(), Phase.FAILED: set(),
}


class TransitionError(RuntimeError):
    pass

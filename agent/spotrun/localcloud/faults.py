"""Fault injection for the EC2 API, decided per request with a seeded RNG so runs replay.

These kinds, all as EC2 really answers them (botocore's EC2 parser reads the
``<Response><Errors><Error><Code>`` body and raises ``ClientError`` with that code):

* ``throttle``: ``RequestLimitExceeded``, HTTP 503 -- EC2's request-rate throttling
  (https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html).
* ``server_error``: ``InternalError`` (HTTP 500) or ``Unavailable`` (HTTP 503), the two
  server-side codes the EC2 API reference lists (errors-overview, "Server error codes").
* ``performed_then_5xx``: the request is performed (forwarded to moto, data plane work
  done) and then answered ``InternalError``/500, as happens when EC2's front end fails after
  the back end acted. A client that retries a CreateVolume without a ClientToken then
  makes a second volume -- exactly what agents must be robust against. Any action may be
  named (DetachVolume, DeleteVolume, DeleteSnapshot, CreateTags...): the proxy performs
  whatever it forwards, so a retry then meets its own effect (e.g. a second DetachVolume
  answered ``IncorrectState``: the volume is already ``available``).
* ``attach_incorrect_state``: AttachVolume answered ``IncorrectState`` (HTTP 400) without
  being performed, though DescribeVolumes said ``available`` -- EC2's control plane is
  eventually consistent, so the attach path may see an older state than the describe did.
* ``not_found_after_create_s``: for this long after a CreateVolume/CreateSnapshot, the new
  resource is reported ``InvalidVolume.NotFound``/``InvalidSnapshot.NotFound`` on a
  Describe by id and left out of every listed Describe (visibility.py), as EC2 documents
  for resources just created ("eventual consistency", EC2 API reference).
* ``dropped_before`` / ``dropped_after``: the proxy closes the connection without an answer,
  before the request is performed or after it was (botocore sees ``ConnectionClosedError``
  and retries it by itself, as it does against EC2 when a load balancer drops a connection;
  a non-idempotent call retried that way meets its own effect, or makes a second resource).

The per-action maps (``performed_then_5xx``, ``dropped_*``) accept ``"*"`` for every EC2 action
not named in them.
"""
from __future__ import annotations

import random
import threading
import uuid
from dataclasses import dataclass, field
from typing import Mapping

# Actions where "performed, then answered 5xx" is meaningful (the list); others
# are accepted too, the proxy performs whatever it forwards.
PERFORMED_THEN_5XX_ACTIONS = ("AttachVolume", "CreateVolume", "CreateSnapshot", "DetachVolume",
                              "DeleteVolume", "DeleteSnapshot", "CreateTags", "DeleteTags")
ANY_ACTION = "*"


@dataclass(frozen=True)
class InjectedError:
    kind: str  # throttle | server_error | performed_then_5xx | incorrect_state | dropped_*
    code: str
    http_status: int  # 0: no answer at all, the connection is closed
    message: str

    @property
    def dropped(self) -> bool:
        return self.http_status == 0


def error_body(code: str, message: str) -> bytes:
    """The XML EC2 sends with an error; botocore parses Code/Message/RequestID from it."""
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Response><Errors><Error><Code>{code}</Code><Message>{_escape(message)}</Message>"
            f"</Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>").encode()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _check_rate(name: str, rate: float) -> float:
    if not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"ec2_faults: {name} must be a rate between 0 and 1, got {rate!r}")
    return float(rate)


def _check_rates(name: str, rates: object) -> dict[str, float]:
    if not isinstance(rates, Mapping):
        raise ValueError(f"ec2_faults: {name} must map an action name to a rate")
    return {str(action): _check_rate(f"{name}[{action}]", rate) for action, rate in rates.items()}


def _rate_for(rates: Mapping[str, float], action: str) -> float:
    return rates.get(action, rates.get(ANY_ACTION, 0.0))


@dataclass
class FaultPlan:
    """What to inject. Rates are probabilities per matching request (0..1)."""

    throttle: float = 0.0
    server_error: float = 0.0
    performed_then_5xx: Mapping[str, float] = field(default_factory=dict)
    # Only these EC2 actions get throttle/server_error faults; empty = every EC2 action.
    actions: tuple[str, ...] = ()
    seed: int | None = None
    # AttachVolume refused with IncorrectState (not performed) at this rate.
    attach_incorrect_state: float = 0.0
    # Seconds a just-created volume or snapshot stays invisible to Describe (0 = never).
    not_found_after_create_s: float = 0.0
    # The connection closed without an answer, before / after performing the action.
    dropped_before: Mapping[str, float] = field(default_factory=dict)
    dropped_after: Mapping[str, float] = field(default_factory=dict)
    # The first N AttachVolume calls after configure refused IncorrectState (then the rate).
    attach_incorrect_state_first: int = 0

    def __post_init__(self) -> None:
        first = self.attach_incorrect_state_first
        if isinstance(first, bool) or not isinstance(first, (int, float)) or first < 0 \
                or first != int(first):
            raise ValueError("ec2_faults: attach_incorrect_state_first must be a whole number "
                             f">= 0, got {first!r}")
        self.attach_incorrect_state_first = int(first)
        self.throttle = _check_rate("throttle", self.throttle)
        self.attach_incorrect_state = _check_rate("attach_incorrect_state",
                                                  self.attach_incorrect_state)
        window = self.not_found_after_create_s
        if isinstance(window, bool) or not isinstance(window, (int, float)) or window < 0:
            raise ValueError("ec2_faults: not_found_after_create_s must be a number of seconds "
                             f">= 0, got {window!r}")
        self.not_found_after_create_s = float(window)
        self.server_error = _check_rate("server_error", self.server_error)
        self.performed_then_5xx = _check_rates("performed_then_5xx", self.performed_then_5xx)
        self.dropped_before = _check_rates("dropped_before", self.dropped_before)
        self.dropped_after = _check_rates("dropped_after", self.dropped_after)
        self.actions = tuple(self.actions)

    @property
    def active(self) -> bool:
        return bool(self.throttle or self.server_error or any(self.performed_then_5xx.values())
                    or self.attach_incorrect_state or self.not_found_after_create_s
                    or any(self.dropped_before.values()) or any(self.dropped_after.values())
                    or self.attach_incorrect_state_first)


class FaultInjector:
    """Thread-safe decisions for the proxy; one RNG so a seeded run replays the same faults."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plan = FaultPlan()
        self._rng = random.Random(0)
        self._attaches = 0

    @property
    def plan(self) -> FaultPlan:
        return self._plan

    def configure(self, plan: FaultPlan) -> None:
        with self._lock:
            self._plan = plan
            self._rng = random.Random(plan.seed)
            self._attaches = 0

    def before(self, action: str, params: Mapping[str, str] | None = None) -> InjectedError | None:
        """A fault that replaces the answer (the request is not performed), or None."""
        with self._lock:
            plan = self._plan
            self._attaches += action == "AttachVolume"
            if action == "AttachVolume" and (
                    self._attaches <= plan.attach_incorrect_state_first
                    or (plan.attach_incorrect_state
                        and self._rng.random() < plan.attach_incorrect_state)):
                volume_id = (params or {}).get("VolumeId", "")
                return InjectedError("incorrect_state", "IncorrectState", 400,
                                     f"vol '{volume_id}' is not 'available'.")
            rate = _rate_for(plan.dropped_before, action)
            if rate and self._rng.random() < rate:
                return InjectedError("dropped_before", "", 0, "connection closed, not performed")
            if plan.actions and action not in plan.actions:
                return None
            if plan.throttle and self._rng.random() < plan.throttle:
                return InjectedError("throttle", "RequestLimitExceeded", 503,
                                     "Request limit exceeded.")
            if plan.server_error and self._rng.random() < plan.server_error:
                if self._rng.random() < 0.5:
                    return InjectedError("server_error", "InternalError", 500,
                                         "An internal error has occurred.")
                return InjectedError("server_error", "Unavailable", 503,
                                     "The server is overloaded and can't handle the request.")
        return None

    def after(self, action: str) -> InjectedError | None:
        """A 5xx (or a closed connection) instead of the answer of a performed request, or None."""
        with self._lock:
            rate = _rate_for(self._plan.performed_then_5xx, action)
            if rate and self._rng.random() < rate:
                return InjectedError("performed_then_5xx", "InternalError", 500,
                                     "An internal error has occurred.")
            rate = _rate_for(self._plan.dropped_after, action)
            if rate and self._rng.random() < rate:
                return InjectedError("dropped_after", "", 0, "connection closed, performed")
        return None

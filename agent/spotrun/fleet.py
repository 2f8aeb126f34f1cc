"""Cancel what launched this instance, so a finished job stops billing; or leave it.

:func:`cancel`: Spot Fleet request → CancelSpotFleetRequests(TerminateInstances=True); EC2
Fleet → DeleteFleets(TerminateInstances=True); Auto Scaling group → MinSize=0,
DesiredCapacity=0. This is the agent's very last act after a completed job (invariant 5), and
it terminates the instance it runs on, so it must be idempotent: "already cancelled", "not
found" and a call that was performed but answered with an error all count as done. Transient
failures (throttling, 5xx, connection) are retried until a deadline.

:func:`leave`: a sweep's instance that finds nothing left to claim while other experiments
still run lowers its fleet's / group's target capacity by one and terminates itself, so the
fleet neither keeps paying for it nor launches a replacement. Same rules: idempotent,
transient errors retried, a fleet or group already gone means nothing to shrink.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from botocore.exceptions import BotoCoreError, ClientError

from spotrun import tags
from spotrun.ec2 import backoff, call_retrying, error_code, is_transient
from spotrun.errors import SpotrunError
from spotrun.log import get_logger
from spotrun.waiting import wait_until

if TYPE_CHECKING:  # pragma: no cover
    from spotrun.identity import LaunchedBy

log = get_logger("fleet")

_SPOT_FLEET_DONE = ("cancelled", "cancelled_running", "cancelled_terminating")
_SPOT_FLEET_GONE = ("fleetRequestIdDoesNotExist", "InvalidSpotFleetRequestId.NotFound")
_EC2_FLEET_DONE = ("deleted", "deleted_running", "deleted_terminating")
_EC2_FLEET_GONE = ("fleetIdDoesNotExist", "InvalidFleetId.NotFound")
# Auto Scaling answers these while another activity or update is in flight.
_ASG_BUSY = ("ScalingActivityInProgress", "ResourceContention")


class FleetError(SpotrunError):
    """The fleet or group could not be cancelled; the message names it and the call."""


def _transient(exc: BaseException) -> bool:
    return is_transient(exc) or error_code(exc) in _ASG_BUSY


def _retrying(what: str, call: Callable, deadline_s: float, settled: Callable[[], bool] | None = None):
    """``call()``, retried on transient errors (Auto Scaling's busy answers too) until the
    deadline; None when ``settled()`` shows an errored call was performed anyway."""
    try:
        return call_retrying(what, call, deadline_s=deadline_s, settled=settled, transient=_transient)
    except (ClientError, BotoCoreError) as exc:
        raise FleetError(f"{what}: {exc}") from None


def cancel(launched_by: "LaunchedBy | None", *, ec2_client, autoscaling_client=None,
           deadline_s: float = 300.0) -> str:
    """Cancel the Spot Fleet / EC2 Fleet, or scale the Auto Scaling group to zero; say what was done."""
    if launched_by is None:
        message = "not launched by a fleet or Auto Scaling group: nothing to cancel"
        log.warning("fleet_cancel_skipped", reason=message)
        return message
    kind, ident = launched_by.kind, launched_by.id
    log.info("fleet_cancel_started", kind=kind, fleet_id=ident)
    if kind == "spot-fleet":
        result = _cancel_spot_fleet(ec2_client, ident, deadline_s)
    elif kind == "ec2-fleet":
        result = _delete_ec2_fleet(ec2_client, ident, deadline_s)
    elif kind == "autoscaling":
        if autoscaling_client is None:
            raise FleetError(f"Auto Scaling group {ident}: no autoscaling client given")
        result = _scale_group_to_zero(autoscaling_client, ident, deadline_s)
    else:
        raise FleetError(f"launched_by.kind {kind!r} is not spot-fleet, ec2-fleet or autoscaling")
    log.info("fleet_cancelled", kind=kind, fleet_id=ident, result=result)
    return result


def _spot_fleet_state(ec2, request_id: str) -> str | None:
    try:
        configs = ec2.describe_spot_fleet_requests(SpotFleetRequestIds=[request_id])["SpotFleetRequestConfigs"]
    except ClientError as exc:
        if error_code(exc) in _SPOT_FLEET_GONE or "NotFound" in error_code(exc):
            return None
        raise
    return configs[0]["SpotFleetRequestState"] if configs else None


def _cancel_spot_fleet(ec2, request_id: str, deadline_s: float) -> str:
    what = f"spot fleet request {request_id}"
    state = _retrying(f"DescribeSpotFleetRequests {request_id}", lambda: _spot_fleet_state(ec2, request_id),
                      deadline_s)
    if state is None:
        return f"{what} not found: nothing to cancel"
    if state in _SPOT_FLEET_DONE:
        return f"{what} was already cancelled ({state})"

    def settled() -> bool:
        return _spot_fleet_state(ec2, request_id) in (*_SPOT_FLEET_DONE, None)

    answer = _retrying(f"CancelSpotFleetRequests {request_id}",
                       lambda: ec2.cancel_spot_fleet_requests(SpotFleetRequestIds=[request_id],
                                                              TerminateInstances=True),
                       deadline_s, settled)
    if answer is None:  # performed, though the answer was an error
        return f"{what} cancelled, instances terminating"
    for failure in answer.get("UnsuccessfulFleetRequests", []):
        code = failure.get("Error", {}).get("Code", "")
        if code in _SPOT_FLEET_GONE:
            return f"{what} not found: nothing to cancel"
        if code == "fleetRequestNotInCancellableState":
            return f"{what} was already cancelled"
        raise FleetError(f"CancelSpotFleetRequests {request_id}: {code}: "
                         f"{failure.get('Error', {}).get('Message', '')}")
    return f"{what} cancelled, instances terminating"


def _delete_ec2_fleet(ec2, fleet_id: str, deadline_s: float) -> str:
    what = f"EC2 fleet {fleet_id}"

    def state() -> str | None:
        try:
            fleets = ec2.describe_fleets(FleetIds=[fleet_id])["Fleets"]
        except ClientError as exc:
            if "NotFound" in error_code(exc) or error_code(exc) in _EC2_FLEET_GONE:
                return None
            raise
        return fleets[0]["FleetState"] if fleets else None

    current = _retrying(f"DescribeFleets {fleet_id}", state, deadline_s)
    if current is None:
        return f"{what} not found: nothing to delete"
    if current in _EC2_FLEET_DONE:
        return f"{what} was already deleted ({current})"
    answer = _retrying(f"DeleteFleets {fleet_id}",
                       lambda: ec2.delete_fleets(FleetIds=[fleet_id], TerminateInstances=True),
                       deadline_s, lambda: state() in (*_EC2_FLEET_DONE, None))
    if answer is None:
        return f"{what} deleted, instances terminating"
    for failure in answer.get("UnsuccessfulFleetDeletions", []):
        code = failure.get("Error", {}).get("Code", "")
        if code in _EC2_FLEET_GONE:
            return f"{what} not found: nothing to delete"
        if code == "fleetNotInDeletableState":
            return f"{what} was already deleted"
        raise FleetError(f"DeleteFleets {fleet_id}: {code}: {failure.get('Error', {}).get('Message', '')}")
    return f"{what} deleted, instances terminating"


def _scale_group_to_zero(autoscaling, name: str, deadline_s: float) -> str:
    what = f"Auto Scaling group {name}"

    def sizes() -> tuple[int, int] | None:
        groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
        return (groups[0]["MinSize"], groups[0]["DesiredCapacity"]) if groups else None

    current = _retrying(f"DescribeAutoScalingGroups {name}", sizes, deadline_s)
    if current is None:
        return f"{what} not found: nothing to scale down"
    if current == (0, 0):
        return f"{what} was already scaled to zero"
    try:
        _retrying(f"UpdateAutoScalingGroup {name}",
                  lambda: autoscaling.update_auto_scaling_group(AutoScalingGroupName=name, MinSize=0,
                                                                DesiredCapacity=0),
                  deadline_s, lambda: sizes() in ((0, 0), None))
    except FleetError as exc:
        if "not found" in str(exc).lower():  # deleted between describe and update
            return f"{what} not found: nothing to scale down"
        raise
    return f"{what} scaled to zero (min 0, desired 0), instances terminating"


# ---- leave: one instance fewer -------------------------------------------------------------

# The mark a leaving instance puts on itself before it lowers its fleet's target capacity (the
# value: the new target). ModifySpotFleetRequest and ModifyFleet set a number and take no
# idempotency token, and nothing in the fleet says *who* lowered it, so a retry of leave() by
# the same instance (the agent restarted after a crash between the modify and its own
# termination) could not tell its own decrement from another instance's and would lower the
# target twice. Written *before* the modify, the mark errs the safe way: a crash between the
# tag and the modify loses the decrement, which repairs itself (the fleet replaces this
# instance, the replacement finds nothing to claim and leaves in turn); a second decrement
# would not (the fleet would stop replacing an interrupted instance whose experiment still
# has to run). Two instances leaving at the same moment can both read N and both write N-1:
# the same lost decrement, repaired the same way. On the instance itself because it is this
# instance's decision, and EC2 keeps a terminated instance's tags for the hour a retry could
# need. An Auto Scaling group needs no mark: TerminateInstanceInAutoScalingGroup lowers the
# desired capacity and takes the instance out of service in one call, so a retry finds it
# out of service and lowers nothing.
LEFT_FLEET_TAG = tags.LEFT_FLEET

_SPOT_FLEET_ENDED = (*_SPOT_FLEET_DONE, "failed")
_EC2_FLEET_ENDED = (*_EC2_FLEET_DONE, "failed")
_MODIFYING = "modifying"
# EC2's answer to a modify of a fleet that cannot be modified now (one-time type, cancelled,
# or another modify in flight).
_NOT_MODIFIABLE = "FleetNotInModifiableState"
_INSTANCE_GONE = ("shutting-down", "terminated")
# Lifecycle states of an instance that is leaving or has left its Auto Scaling group.
_OUT_OF_GROUP = ("Terminating", "Terminated", "Detaching", "Detached")
_MODIFYING_POLL_S = 1.0


@dataclass(frozen=True)
class _Fleet:
    """What leave() reads of a Spot Fleet request or an EC2 Fleet."""
    state: str
    maintain: bool  # only a "maintain" fleet replaces instances (and may be modified)
    target: int
    spec: dict = field(default_factory=dict)  # an EC2 Fleet's TargetCapacitySpecification


@dataclass(frozen=True)
class _Refused:
    """A call EC2 / Auto Scaling refused (4xx): what it said, for the caller to weigh."""
    code: str
    message: str


def _refusals(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` with a refusal returned as :class:`_Refused`; transient errors still raise
    (for call_retrying to retry)."""
    def wrapped():
        try:
            return call()
        except ClientError as exc:
            if _transient(exc):
                raise
            return _Refused(error_code(exc), exc.response.get("Error", {}).get("Message", ""))
    return wrapped


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _not_found(exc: ClientError) -> bool:
    code = error_code(exc)
    return code in (*_SPOT_FLEET_GONE, *_EC2_FLEET_GONE) or "NotFound" in code


def leave(launched_by: "LaunchedBy | None", instance_id: str, *, ec2_client,
          autoscaling_client=None, deadline_s: float = 300.0) -> str:
    """Lower the fleet's / group's target capacity by one and terminate this instance; say what
    was done. Without a fleet or group (``launched_by`` None) nothing is touched, the instance
    included: the caller decides what becomes of it."""
    if launched_by is None:
        message = "not launched by a fleet or group: nothing to shrink"
        log.warning("fleet_leave_skipped", reason=message, instance_id=instance_id)
        return message
    kind, ident = launched_by.kind, launched_by.id
    if kind not in ("spot-fleet", "ec2-fleet", "autoscaling"):
        raise FleetError(f"launched_by.kind {kind!r} is not spot-fleet, ec2-fleet or autoscaling")
    if kind == "autoscaling" and autoscaling_client is None:
        raise FleetError(f"Auto Scaling group {ident}: no autoscaling client given")
    log.info("fleet_leave_started", kind=kind, fleet_id=ident, instance_id=instance_id)
    if kind == "spot-fleet":
        shrunk = _shrink_spot_fleet(ec2_client, ident, instance_id, deadline_s)
    elif kind == "ec2-fleet":
        shrunk = _shrink_ec2_fleet(ec2_client, ident, instance_id, deadline_s)
    else:
        shrunk = _leave_group(autoscaling_client, ident, instance_id, deadline_s)
    # Said before the termination: on EC2 this process may not outlive its answer.
    log.info("fleet_shrunk", kind=kind, fleet_id=ident, instance_id=instance_id, result=shrunk)
    message = f"{shrunk}; {_terminate_self(ec2_client, instance_id, deadline_s)}"
    log.info("fleet_left", kind=kind, fleet_id=ident, instance_id=instance_id, result=message)
    return message


def _left_mark(ec2, instance_id: str, deadline_s: float) -> str | None:
    def read() -> str | None:
        tags = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [instance_id]},
                                          {"Name": "key", "Values": [LEFT_FLEET_TAG]}])["Tags"]
        return tags[0]["Value"] if tags else None
    return _retrying(f"DescribeTags {instance_id}", read, deadline_s)


def _mark_left(ec2, instance_id: str, target: int, deadline_s: float) -> None:
    # CreateTags sets a value: repeating one that was performed (a 5xx after the work) is harmless.
    _retrying(f"CreateTags {instance_id} {LEFT_FLEET_TAG}",
              lambda: ec2.create_tags(Resources=[instance_id],
                                      Tags=[{"Key": LEFT_FLEET_TAG, "Value": str(target)}]),
              deadline_s)


def _describe_spot_fleet(ec2, request_id: str) -> _Fleet | None:
    try:
        answer = ec2.describe_spot_fleet_requests(SpotFleetRequestIds=[request_id])
    except ClientError as exc:
        if _not_found(exc):
            return None
        raise
    configs = answer["SpotFleetRequestConfigs"]
    if not configs:
        return None
    config = configs[0].get("SpotFleetRequestConfig", {})
    # A request made without Type is "maintain" (EC2's default; moto does not echo it).
    return _Fleet(configs[0]["SpotFleetRequestState"], config.get("Type", "maintain") == "maintain",
                  int(config.get("TargetCapacity", 0)))


def _describe_ec2_fleet(ec2, fleet_id: str) -> _Fleet | None:
    try:
        fleets = ec2.describe_fleets(FleetIds=[fleet_id])["Fleets"]
    except ClientError as exc:
        if _not_found(exc):
            return None
        raise
    if not fleets:
        return None
    spec = dict(fleets[0].get("TargetCapacitySpecification", {}))
    return _Fleet(fleets[0]["FleetState"], fleets[0].get("Type", "maintain") == "maintain",
                  int(spec.get("TotalTargetCapacity", 0)), spec)


def _shrink_spot_fleet(ec2, request_id: str, instance_id: str, deadline_s: float) -> str:
    return _shrink_fleet(
        ec2, instance_id, f"spot fleet request {request_id}", f"ModifySpotFleetRequest {request_id}",
        lambda: _describe_spot_fleet(ec2, request_id), _SPOT_FLEET_ENDED,
        lambda fleet, new: ec2.modify_spot_fleet_request(
            SpotFleetRequestId=request_id, TargetCapacity=new,
            ExcessCapacityTerminationPolicy="noTermination"),
        deadline_s)


def _smaller_spec(spec: dict, new_total: int) -> dict:
    """The EC2 Fleet's TargetCapacitySpecification with one instance fewer.

    AWS's "Modify an EC2 Fleet" puts the fleet's behaviour on a decrease in terms of the *Spot*
    target capacity (open requests above it are deleted; with no-termination the fleet keeps
    its size but replaces no Spot Instance that is interrupted or terminated) and lists
    TotalTargetCapacity, SpotTargetCapacity and OnDemandTargetCapacity as what may be modified;
    it does not say a lower total alone lowers a Spot part set equal to it (``spotrun launch``
    sets Spot = Total). So the Spot part named at launch goes down with the total: this
    instance is a Spot Instance, as every instance spotrun launches is. An On-Demand part is
    kept, never above the new total."""
    smaller: dict[str, int] = {"TotalTargetCapacity": new_total}
    spot = int(spec.get("SpotTargetCapacity") or 0)
    on_demand = int(spec.get("OnDemandTargetCapacity") or 0)
    if spot:
        smaller["SpotTargetCapacity"] = min(spot - 1, new_total)
    if on_demand:
        smaller["OnDemandTargetCapacity"] = min(on_demand, new_total)
    return smaller


def _shrink_ec2_fleet(ec2, fleet_id: str, instance_id: str, deadline_s: float) -> str:
    return _shrink_fleet(
        ec2, instance_id, f"EC2 fleet {fleet_id}", f"ModifyFleet {fleet_id}",
        lambda: _describe_ec2_fleet(ec2, fleet_id), _EC2_FLEET_ENDED,
        lambda fleet, new: ec2.modify_fleet(
            FleetId=fleet_id, TargetCapacitySpecification=_smaller_spec(fleet.spec, new),
            ExcessCapacityTerminationPolicy="no-termination"),
        deadline_s)


def _shrink_fleet(ec2, instance_id: str, what: str, call: str,
                  describe: Callable[[], _Fleet | None], ended: tuple[str, ...],
                  modify: Callable[[_Fleet, int], Any], deadline_s: float) -> str:
    """Lower a Spot Fleet's / EC2 Fleet's target capacity by one, once per instance (see
    LEFT_FLEET_TAG), the fleet told not to terminate anything itself."""
    mark = _left_mark(ec2, instance_id, deadline_s)
    if mark is not None:
        return f"{what}: target capacity already lowered to {mark} by this instance"
    deadline = time.monotonic() + deadline_s
    attempt = 0
    while True:
        fleet = _unmodified(what, describe, deadline, deadline_s)
        if fleet is None:
            return f"{what} not found: nothing to shrink"
        if fleet.state in ended:
            return f"{what} was {fleet.state}: nothing to shrink"
        if not fleet.maintain:
            return f"{what} is a one-time request: it replaces nothing, nothing to shrink"
        if fleet.target <= 0:
            return f"{what} is at target capacity 0: nothing to shrink"
        new = fleet.target - 1
        _mark_left(ec2, instance_id, new, _remaining(deadline))

        def settled(new: int = new) -> bool:
            # Performed despite the error, or a modify in flight (ours, or another instance's
            # that lowered it as far): either way lowering it again could be once too often.
            after = describe()
            return (after is None or after.state in ended or after.state == _MODIFYING
                    or after.target <= new)

        answer = _retrying(call, _refusals(lambda: modify(fleet, new)), _remaining(deadline), settled)
        if answer is None:
            return f"{what}: target capacity {fleet.target} → {new} (the call failed but was performed)"
        if not isinstance(answer, _Refused):
            if answer.get("Return") is False:
                raise FleetError(f"{call}: EC2 answered Return=false")
            return f"{what}: target capacity {fleet.target} → {new}, no instance terminated by the fleet"
        after = _unmodified(what, describe, deadline, deadline_s)
        if after is None or after.state in ended:
            return f"{what} was {after.state if after else 'deleted'} meanwhile: nothing to shrink"
        if after.target <= new:
            return f"{what}: target capacity already {after.target} (≤ {new}): nothing more to shrink"
        if answer.code == _NOT_MODIFIABLE and time.monotonic() < deadline:
            attempt += 1  # another modify was in flight: read the target again and retry
            log.info("fleet_leave_retry", what=what, code=answer.code, attempt=attempt)
            time.sleep(backoff(attempt))  # backoff between attempts, not synchronisation
            continue
        raise FleetError(f"{call}: {answer.code}: {answer.message}")


def _unmodified(what: str, describe: Callable[[], _Fleet | None], deadline: float,
                deadline_s: float) -> _Fleet | None:
    """The fleet once no modify is in flight (EC2 shows the old target while ``modifying``, and
    refuses another modify then), or None when it is gone."""
    def read():
        fleet = _retrying(f"Describe {what}", describe, _remaining(deadline))
        return (fleet,) if fleet is None or fleet.state != _MODIFYING else None
    try:
        return wait_until(read, _remaining(deadline), interval_s=_MODIFYING_POLL_S, backoff=1.5,
                          max_interval_s=10.0, what=f"{what} to finish modifying")[0]
    except TimeoutError:
        raise FleetError(f"{what}: still {_MODIFYING} after {deadline_s} s") from None


def _leave_group(autoscaling, name: str, instance_id: str, deadline_s: float) -> str:
    """TerminateInstanceInAutoScalingGroup with ShouldDecrementDesiredCapacity: one call lowers
    the desired capacity and ends this instance, so the group replaces nothing. AWS refuses the
    decrement below the group's minimum size, so a minimum equal to the desired capacity is
    lowered first."""
    what = f"Auto Scaling group {name}"

    def group() -> dict | None:
        groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
        return groups[0] if groups else None

    def in_service(current: dict) -> bool:
        return any(i["InstanceId"] == instance_id
                   and not i.get("LifecycleState", "").startswith(_OUT_OF_GROUP)
                   for i in current.get("Instances", []))

    def left() -> bool:
        current = group()
        return current is None or not in_service(current)

    deadline = time.monotonic() + deadline_s
    attempt = 0
    while True:
        current = _retrying(f"DescribeAutoScalingGroups {name}", group, _remaining(deadline))
        if current is None:
            return f"{what} not found: nothing to shrink"
        if not in_service(current):
            return f"{what}: this instance is not in service in it: nothing to shrink"
        desired, min_size = int(current["DesiredCapacity"]), int(current["MinSize"])
        if desired <= 0:
            return f"{what} is at desired capacity 0: nothing to shrink"
        lowered = ""
        if min_size > desired - 1:
            new_min = desired - 1
            answer = _retrying(f"UpdateAutoScalingGroup {name}", _refusals(
                lambda: autoscaling.update_auto_scaling_group(AutoScalingGroupName=name,
                                                              MinSize=new_min)),
                _remaining(deadline),
                lambda: (g := group()) is None or int(g["MinSize"]) <= new_min)
            if isinstance(answer, _Refused):
                if group() is None:
                    return f"{what} not found: nothing to shrink"
                raise FleetError(f"UpdateAutoScalingGroup {name}: {answer.code}: {answer.message}")
            lowered = f", min size {min_size} → {new_min}"
        answer = _retrying(f"TerminateInstanceInAutoScalingGroup {instance_id}", _refusals(
            lambda: autoscaling.terminate_instance_in_auto_scaling_group(
                InstanceId=instance_id, ShouldDecrementDesiredCapacity=True)),
            _remaining(deadline), left)
        if not isinstance(answer, _Refused):
            return f"{what}: desired capacity {desired} → {desired - 1}{lowered}"
        if left():
            return f"{what}: this instance left it meanwhile: nothing to shrink"
        if "min size" in answer.message.lower() and time.monotonic() < deadline:
            # Another instance left in between and the desired capacity met the minimum again.
            attempt += 1
            log.info("fleet_leave_retry", what=what, code=answer.code, attempt=attempt)
            time.sleep(backoff(attempt))  # backoff between attempts, not synchronisation
            continue
        raise FleetError(f"TerminateInstanceInAutoScalingGroup {instance_id} ({name}): "
                         f"{answer.code}: {answer.message}")


def _instance_state(ec2, instance_id: str) -> str | None:
    try:
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError as exc:
        if error_code(exc) == "InvalidInstanceID.NotFound":
            return None
        raise
    states = [i["State"]["Name"] for r in reservations for i in r["Instances"]]
    return states[0] if states else None


def _terminate_self(ec2, instance_id: str, deadline_s: float) -> str:
    """TerminateInstances on this instance: also after an Auto Scaling group's own termination
    (harmless on an instance already shutting down, and it ends it at once where the group's
    activity would take a while), and when the fleet or group was gone."""
    answer = _retrying(f"TerminateInstances {instance_id}",
                       lambda: ec2.terminate_instances(InstanceIds=[instance_id]), deadline_s,
                       lambda: _instance_state(ec2, instance_id) in _INSTANCE_GONE)
    states = [t["CurrentState"]["Name"] for t in (answer or {}).get("TerminatingInstances", [])
              if t.get("InstanceId") == instance_id]
    return f"instance {instance_id} terminating ({states[0] if states else 'performed'})"

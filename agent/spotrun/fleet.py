"""Cancel what launched this instance, so a finished job stops billing.

Spot Fleet request → CancelSpotFleetRequests(TerminateInstances=True); EC2 Fleet →
DeleteFleets(TerminateInstances=True); Auto Scaling group → MinSize=0, DesiredCapacity=0.
This is the agent's very last act after a completed job (invariant 5), and it terminates
the instance it runs on, so it must be idempotent: "already cancelled", "not found" and a
call that was performed but answered with an error all count as done. Transient failures
(throttling, 5xx, connection) are retried until a deadline.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from botocore.exceptions import BotoCoreError, ClientError

from spotrun.ec2 import call_retrying, error_code, is_transient
from spotrun.errors import SpotrunError
from spotrun.log import get_logger

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

"""moto's server on loopback: the local cloud's AWS API (EC2, DynamoDB, IAM, SSM, ...).

moto keeps its state in process-wide backends keyed by account id, so two clouds in one
process would see each other's resources. Each LocalCloud therefore gets its own account:
the first one in a process uses moto's default account (so a bare boto3 client on
``moto_endpoint`` sees it), later concurrent ones get a fresh account id, which the proxy
sends to moto in the ``x-moto-account-id`` header.
"""
from __future__ import annotations

import logging
import os
import random
import sys
import threading

from moto.server import ThreadedMotoServer

from spotrun.log import get_logger

DEFAULT_ACCOUNT_ID = "123456789012"
ACCOUNT_HEADER = "x-moto-account-id"
log = get_logger("localcloud.moto")
# The services the project uses through the local cloud.
RESET_SERVICES = ("ec2", "ebs", "dynamodb", "iam", "ssm", "sts", "autoscaling",
                  "secretsmanager", "s3", "cloudwatch", "logs")

_accounts_lock = threading.Lock()
_accounts_in_use: set[str] = set()


def claim_account_id() -> str:
    with _accounts_lock:
        account = DEFAULT_ACCOUNT_ID
        while account in _accounts_in_use:
            account = f"{random.randrange(10**11, 10**12):012d}"
        _accounts_in_use.add(account)
        return account


def release_account_id(account: str) -> None:
    with _accounts_lock:
        _accounts_in_use.discard(account)


def reset_account(account: str) -> None:
    """Forget every resource of ``account`` in moto's loaded backends (start empty)."""
    from moto.backends import get_backend

    for name in RESET_SERVICES:
        if f"moto.{name}" not in sys.modules:
            continue  # never used in this process: nothing to forget
        backend_dict = get_backend(name)
        if account in backend_dict:
            del backend_dict[account]


def parse_new_versions_user_data() -> None:
    """moto parses a launch template's user data in CreateLaunchTemplate but keeps it as the
    raw text in CreateLaunchTemplateVersion; an Auto Scaling group launching from such a
    version then fails moto's type assertion and the API answers 500 (a relaunch as a group,
    issue 20). Parse it the way CreateLaunchTemplate does, once per process."""
    from moto.ec2.models.launch_templates import LaunchTemplate
    from moto.ec2.utils import parse_user_data

    original = LaunchTemplate.create_version
    if getattr(original, "_spotrun_parses_user_data", False):
        return

    def create_version(self, data, description):
        if isinstance(data.get("UserData"), (str, bytes)):
            data = {**data, "UserData": parse_user_data(data["UserData"])}
        return original(self, data, description)

    create_version._spotrun_parses_user_data = True
    LaunchTemplate.create_version = create_version


def terminate_despite_a_finished_detach() -> None:
    """moto's TerminateInstances detaches each volume in the instance's block-device list it
    read first; the local cloud's EBS clock finishes a DetachVolume in another thread, and a
    volume detached in between made the terminate fail with InvalidAttachment.NotFound (long
    soak, seed 7, job 59). EC2 never refuses a termination for that: a volume no longer
    attached is skipped, as it is when the list is read later."""
    from moto.ec2.exceptions import InvalidVolumeAttachmentError, InvalidVolumeDetachmentError
    from moto.ec2.models.instances import Instance

    original = Instance.teardown_defaults
    if getattr(original, "_spotrun_tolerant", False):
        return

    def teardown_defaults(self) -> None:
        for device_path in list(self.block_device_mapping.keys()):
            mapping = self.block_device_mapping.get(device_path)
            if mapping is None:
                continue
            try:
                self.ec2_backend.detach_volume(mapping.volume_id, self.id, device_path)
            except (InvalidVolumeAttachmentError, InvalidVolumeDetachmentError):
                continue  # detached meanwhile by its own DetachVolume
            if mapping.delete_on_termination:
                self.ec2_backend.delete_volume(mapping.volume_id)

    teardown_defaults._spotrun_tolerant = True
    Instance.teardown_defaults = teardown_defaults


# The states from which EC2 refuses another cancel (fleetRequestNotInCancellableState).
_SPOT_FLEET_CANCELLED = ("cancelled", "cancelled_terminating")


def cancel_spot_fleets_as_ec2() -> None:
    """moto's CancelSpotFleetRequests looks each id up in a dict: an id it does not hold
    answers HTTP 500 (KeyError), and one already cancelled is cancelled again. A cancel with
    termination makes moto forget the request (the cloud's own fleets put it back as
    ``cancelled``, a moment later), so an agent's retry after a dropped answer met the 500
    (long soak, seed 1, this stop's job 15). EC2 answers 200 and lists such an id under
    UnsuccessfulFleetRequests: ``fleetRequestIdDoesNotExist``, or
    ``fleetRequestNotInCancellableState`` for one already cancelled."""
    from moto.core.responses import ActionResult
    from moto.ec2.responses.spot_fleets import SpotFleets

    if getattr(SpotFleets.cancel_spot_fleet_requests, "_spotrun_as_ec2", False):
        return

    def cancel_spot_fleet_requests(self) -> ActionResult:
        requested = self._get_param("SpotFleetRequestIds", [])
        held = self.ec2_backend.spot_fleet_requests
        refused, cancellable = [], []
        for request_id in requested:
            request = held.get(request_id)
            if request is None:
                refused.append((request_id, "fleetRequestIdDoesNotExist",
                                f"The spot fleet request Id '{request_id}' does not exist."))
            elif request.state in _SPOT_FLEET_CANCELLED:
                refused.append((request_id, "fleetRequestNotInCancellableState",
                                f"The spot fleet request '{request_id}' is in the "
                                f"'{request.state}' state."))
            else:
                cancellable.append(request_id)
        cancelled = (self.ec2_backend.cancel_spot_fleet_requests(
            cancellable, self._get_bool_param("TerminateInstances")) if cancellable else [])
        return ActionResult({
            "SuccessfulFleetRequests": [
                {"SpotFleetRequestId": request.id,
                 "CurrentSpotFleetRequestState": "cancelled_terminating",
                 "PreviousSpotFleetRequestState": "active"} for request in cancelled],
            "UnsuccessfulFleetRequests": [
                {"SpotFleetRequestId": request_id, "Error": {"Code": code, "Message": message}}
                for request_id, code, message in refused]})

    cancel_spot_fleet_requests._spotrun_as_ec2 = True
    SpotFleets.cancel_spot_fleet_requests = cancel_spot_fleet_requests


_LIVE = ("pending", "running")
# EC2's answer to a modify of a fleet that cannot be modified (now): reported by EC2 for a
# ModifySpotFleetRequest of a one-time request, e.g. jenkinsci/ec2-fleet-plugin issue 131.
_NOT_MODIFIABLE = "FleetNotInModifiableState"


def shrink_fleets_as_ec2() -> None:
    """What a sweep's instance that leaves its fleet (spotrun.fleet.leave) needs of moto, which
    stops short of EC2 there, once per process:

    * ModifyFleet is not implemented (HTTP 500). Here it sets the EC2 Fleet's target capacity
      specification as EC2 does: a higher total launches the missing instances, a lower one
      with ``termination`` (the default) terminates the excess, with ``no-termination`` leaves
      it running, and the fleet then replaces only up to the new target (motofleets.replace_lost
      reads ``target_capacity``). An unknown id answers ``InvalidFleetId.NotFound``, a fleet not
      ``maintain`` or not active ``FleetNotInModifiableState`` (EC2 modifies only those).
    * ModifySpotFleetRequest of an id moto does not hold raises KeyError (HTTP 500, which a
      client retries as transient); EC2 answers 400. A cancelled request is refused too. And
      moto terminates the excess of a lowered target only for the policy spelt "Default",
      which no SDK sends (EC2's values: "default", also when none is given, and
      "noTermination"), counting every instance it ever launched as still there.
    * TerminateInstanceInAutoScalingGroup of an instance in no group raises StopIteration
      (HTTP 500); EC2 answers ValidationError. And moto decrements the desired capacity below
      the group's minimum size, which AWS refuses (ValidationError: the caller must lower the
      minimum first)."""
    from moto.autoscaling.exceptions import ValidationError
    from moto.autoscaling.models import AutoScalingBackend
    from moto.core.responses import ActionResult
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.responses.fleets import Fleets
    from moto.ec2.responses.spot_fleets import SpotFleets

    if getattr(getattr(Fleets, "modify_fleet", None), "_spotrun_as_ec2", False):
        return

    def modify_fleet(self) -> ActionResult:
        fleet_id = self._get_param("FleetId")
        fleet = self.ec2_backend.fleets.get(fleet_id)
        if fleet is None:
            raise EC2ClientError("InvalidFleetId.NotFound", f"The fleet ID '{fleet_id}' does not exist")
        if fleet.fleet_type != "maintain" or fleet.state not in ("submitted", "active"):
            raise EC2ClientError(_NOT_MODIFIABLE, f"Fleet {fleet_id} is in the {fleet.state} state "
                                                  f"and of type {fleet.fleet_type}: not modifiable")
        asked = self._get_param("TargetCapacitySpecification", {}) or {}
        spec = dict(fleet.target_capacity_specification)
        spec.update({key: int(value) for key, value in asked.items()
                     if key in ("TotalTargetCapacity", "SpotTargetCapacity", "OnDemandTargetCapacity")})
        total = int(spec.get("TotalTargetCapacity", fleet.target_capacity))
        for part in ("SpotTargetCapacity", "OnDemandTargetCapacity"):
            if part in spec:  # a part is part of the total
                spec[part] = min(int(spec[part]), total)
        fleet.target_capacity_specification = spec
        fleet.target_capacity = total
        fleet.spot_target_capacity = int(spec.get("SpotTargetCapacity", 0))
        fleet.on_demand_target_capacity = int(spec.get("OnDemandTargetCapacity", 0))
        policy = (self._get_param("ExcessCapacityTerminationPolicy")
                  or fleet.excess_capacity_termination_policy or "termination")
        live = (len([r for r in fleet.spot_requests if r.instance.state in _LIVE])
                + len([i for i in fleet.on_demand_instances if i["instance"].state in _LIVE]))
        fleet.fulfilled_capacity = float(live)  # moto's counts every instance it ever launched
        if total > live:
            if spec.get("DefaultTargetCapacityType") == "on-demand":
                fleet.create_on_demand_requests(total - live)
            else:
                fleet.create_spot_requests(total - live)
        elif total < live and policy == "termination":
            fleet.terminate_instances()
        return ActionResult({"Return": True})

    def modify_spot_fleet_request(self) -> ActionResult:
        request_id = self._get_param("SpotFleetRequestId")
        request = self.ec2_backend.spot_fleet_requests.get(request_id)
        if request is None:
            raise EC2ClientError("InvalidSpotFleetRequestId.NotFound",
                                 f"The spot fleet request ID '{request_id}' does not exist")
        if request.state not in ("submitted", "active"):
            raise EC2ClientError(_NOT_MODIFIABLE, f"Fleet Request: {request_id} is in the "
                                                  f"{request.state} state: not modifiable")
        target = self._get_int_param("TargetCapacity")
        if target is None or target < 0:
            raise EC2ClientError("InvalidParameterValue", f"TargetCapacity {target} is invalid")
        if request.spot_requests:  # moto's own members (the cloud's fleets keep theirs current)
            request.fulfilled_capacity = float(sum(
                1 for r in request.spot_requests if r.instance.state in _LIVE))
        # EC2's policies are "default" (terminate the excess; also when none is given) and
        # "noTermination"; moto terminates only on "Default", which no SDK sends.
        policy = self._get_param("ExcessCapacityTerminationPolicy") or "default"
        self.ec2_backend.modify_spot_fleet_request(
            request_id, target, "Default" if policy.lower() == "default" else policy)
        return ActionResult({"Return": True})

    original_terminate = AutoScalingBackend.terminate_instance

    def terminate_instance(self, instance_id: str, should_decrement: bool):
        group = next((g for g in self.autoscaling_groups.values()
                      if any(s.instance.id == instance_id for s in g.instance_states)), None)
        if group is None:
            raise ValidationError(f"Instance Id not found - No managed instance found for "
                                  f"instance ID: {instance_id}")
        if should_decrement and (group.desired_capacity or 0) - 1 < group.min_size:
            raise ValidationError(
                f"Currently, desiredSize equals minSize ({group.min_size}). Terminating instance "
                f"without replacement will violate group's min size constraint. Either set "
                f"shouldDecrementDesiredCapacity flag to false or lower group's min size.")
        return original_terminate(self, instance_id, should_decrement)

    modify_fleet._spotrun_as_ec2 = True
    Fleets.modify_fleet = modify_fleet
    SpotFleets.modify_spot_fleet_request = modify_spot_fleet_request
    AutoScalingBackend.terminate_instance = terminate_instance


class MotoServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        # werkzeug logs every request on stderr; the proxy logs what matters instead.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        # AWS's managed policies exist on AWS (`spotrun init` attaches
        # AmazonEC2SpotFleetTaggingRole to the Spot Fleet role); moto loads them into each
        # account's IAM backend only when this is set when that backend is made.
        os.environ.setdefault("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
        parse_new_versions_user_data()
        terminate_despite_a_finished_detach()
        cancel_spot_fleets_as_ec2()
        shrink_fleets_as_ec2()
        self._server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
        self.endpoint = ""

    def start(self) -> str:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        log.info("moto_started", endpoint=self.endpoint)
        return self.endpoint

    def stop(self) -> None:
        self._server.stop()
        log.info("moto_stopped", endpoint=self.endpoint)

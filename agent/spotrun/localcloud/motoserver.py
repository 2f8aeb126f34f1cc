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

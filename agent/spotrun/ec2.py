"""botocore clients for the agent (one session per process: spotrun.awsclients), waiters with
explicit deadlines and failure states, and "performed then failed" safe calls.

Every AWS client the agent makes comes from :func:`client` (retry mode and endpoint from
the config, short connect timeout). The waits are spotrun.waiting's one poll loop, not
botocore's waiters: their budget could be set (``WaiterConfig`` MaxAttempts/Delay), but a
waiter cannot call back between polls (a spot notice must end a snapshot wait within a poll,
spotrun.boot's safe points), nor accept "not found" for ``aws.consistency_window_s`` and then
fail, nor back off from a short first poll; and the volume waiters keep polling a volume in
``error``.

Mutating calls that create something (CreateVolume, CreateSnapshot) must never be retried
blindly: an answer of 5xx may come after the work was done, and moto (like some real
paths) ignores ``ClientToken``. :func:`create_once` therefore calls a *single-attempt*
client and, after any failure, looks the resource up by its idempotency tag before trying
again.

EC2 is eventually consistent: a resource just created may be "not found" by id, and missing
from filtered lists, for a while (``aws.consistency_window_s``). So the waits for a resource
this agent created call it gone only after that long unseen, and a create whose outcome is
unknown (5xx, dropped connection) is looked up that long before it is tried again.
"""
from __future__ import annotations

import random
import re
import time
from typing import Any, Callable, Iterable

from botocore.exceptions import (BotoCoreError, ClientError, ConnectTimeoutError,
                                 EndpointConnectionError)

from spotrun import tags as T
from spotrun.config import AwsConfig
from spotrun.errors import SpotrunError
from spotrun.log import get_logger
from spotrun.waiting import wait_until

log = get_logger("ec2")

CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30

_THROTTLING_CODES = {
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestThrottled",
    "ProvisionedThroughputExceededException", "TooManyRequestsException",
}
_TRANSIENT_CODES = _THROTTLING_CODES | {
    "InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable",
}
# How long EC2 may take to show a resource it just created, unless the config says otherwise.
CONSISTENCY_WINDOW_S = 120.0


class WaitTimeout(SpotrunError):
    """A resource did not reach the wanted state before its deadline."""


class ResourceFailed(SpotrunError):
    """A resource entered a failure state (volume or snapshot ``error``)."""


class ResourceGone(SpotrunError):
    """A resource we were waiting on no longer exists."""


class CreateOutcomeUnknown(SpotrunError):
    """A create answered with an error that may have come after the work was done, and the
    resource did not show up in time; the caller chose not to risk a second one."""


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code", "")
    return ""


def is_throttling(exc: BaseException) -> bool:
    return error_code(exc) in _THROTTLING_CODES


def maybe_performed(exc: BaseException) -> bool:
    """Could the failed request have been carried out anyway? A 5xx (other than throttling)
    or a connection lost after the request was sent: yes. Throttling, a 4xx, or no
    connection at all: no."""
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 and not is_throttling(exc)
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return False
    return isinstance(exc, BotoCoreError)


_RESOURCE_ID = re.compile(r"\b(?:vol|snap|i|ami|eni|subnet|sg|sfr|fleet)-[0-9a-f]{8,17}\b")


def summary(exc: BaseException) -> str:
    """One line for an operator: the call, EC2's error code, the resource(s) and the message."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        message = str(err.get("Message", "")).strip()
        ids = sorted(set(_RESOURCE_ID.findall(message)))
        about = f" ({', '.join(ids)})" if ids else ""
        return f"AWS {exc.operation_name} failed: {err.get('Code', '?')}{about}: {message}"
    return f"AWS call failed: {type(exc).__name__}: {exc}"


def is_transient(exc: BaseException) -> bool:
    """Throttling, 5xx and connection problems: the call may be tried again."""
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error_code(exc) in _TRANSIENT_CODES or status >= 500 or status == 429
    return isinstance(exc, BotoCoreError)


def client(service: str, aws: AwsConfig, region: str, *, max_attempts: int | None = None):
    """The agent's client for ``service`` (retry mode/attempts and endpoint from config): one
    per process and settings, from the process's one botocore session (spotrun.awsclients)."""
    from spotrun import awsclients
    return awsclients.client(service, region=region, endpoint_url=aws.endpoint_url or None,
                             retry_mode=aws.retry_mode,
                             max_attempts=max_attempts or aws.max_attempts,
                             connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S)


def single_attempt(ec2, aws: AwsConfig):
    """A client like ``ec2`` that never retries by itself (for calls that create things); the
    same session, so the same loaded model."""
    return client(ec2.meta.service_model.service_name, aws, ec2.meta.region_name, max_attempts=1)


def backoff(attempt: int, base: float = 0.2, cap: float = 5.0) -> float:
    return random.uniform(0, min(cap, base * (2 ** attempt)))


def create_once(
    what: str,
    create: Callable[[], dict],
    find_existing: Callable[[], dict | None],
    *,
    deadline_s: float = 300.0,
    settle_s: float = 0.0,
    retry_unknown: bool = True,
) -> dict:
    """Create a resource at most once: after any transient failure, look for it first.

    ``find_existing`` looks the resource up by the idempotency tag set at creation
    (TagSpecifications make the tag part of the same atomic create). After a failure that
    may have been performed (:func:`maybe_performed`), the lookup is repeated for up to
    ``settle_s`` (EC2 may not list the new resource yet) before creating again, or, with
    ``retry_unknown`` false, before giving up with :class:`CreateOutcomeUnknown`.
    """
    deadline = time.monotonic() + deadline_s
    attempt = 0
    unknown_since: float | None = None
    while True:
        found = find_existing()
        while found is None and unknown_since is not None \
                and time.monotonic() - unknown_since < settle_s:
            time.sleep(min(1.0, max(0.05, settle_s / 20)))  # polling EC2, not synchronising
            found = find_existing()
        if found is not None:
            if attempt:
                log.info("create_found_after_failure", what=what, attempt=attempt)
            return found
        if unknown_since is not None and not retry_unknown:
            raise CreateOutcomeUnknown(
                f"{what}: the create call failed in a way that may have done it, and it was "
                f"not found within {settle_s:.0f} s; not trying again")
        try:
            return create()
        except (ClientError, BotoCoreError) as exc:
            if not is_transient(exc) or time.monotonic() > deadline:
                raise
            log.warning("create_retry", what=what, attempt=attempt, error=str(exc)[:200],
                        maybe_performed=maybe_performed(exc))
            attempt += 1
            unknown_since = time.monotonic() if maybe_performed(exc) else None
            if unknown_since is None or settle_s <= 0:
                time.sleep(backoff(attempt))  # backoff between attempts, not synchronisation


def call_retrying(what: str, call: Callable[[], Any], *, deadline_s: float = 120.0,
                  settled: Callable[[], bool] | None = None,
                  transient: Callable[[BaseException], bool] = is_transient,
                  done_codes: tuple[str, ...] = ()) -> Any:
    """Retry a transient failure until ``deadline_s``; ``settled()`` says the work was done anyway.

    ``done_codes``: errors that a retry of a performed call meets (DetachVolume answered
    ``IncorrectState``: already available; a delete answered NotFound). With one of them,
    ``settled()`` decides: done is success, otherwise the error stands.
    """
    deadline = time.monotonic() + deadline_s
    attempt = 0
    while True:
        try:
            return call()
        except (ClientError, BotoCoreError) as exc:
            if settled is not None and (transient(exc) or error_code(exc) in done_codes):
                try:
                    if settled():
                        log.info("call_performed_despite_error", what=what,
                                 error=str(exc)[:200])
                        return None
                except (ClientError, BotoCoreError):
                    pass
            if not transient(exc) or time.monotonic() > deadline:
                raise
            attempt += 1
            log.info("call_retry", what=what, attempt=attempt, error=str(exc)[:200])
            time.sleep(backoff(attempt))  # backoff between attempts, not synchronisation


# The most values one Describe* filter takes (EC2 and Auto Scaling alike).
FILTER_VALUES = 200


def describe_by_job(client: Any, operation: str, key: str, job_ids: Iterable[str],
                    extra_filters: list[dict] | None = None, **kwargs: Any) -> dict[str, list[dict]]:
    """{job id: its resources} from one paged Describe* over every job (a ``spotrun:job`` filter
    value each, 200 to a call), whatever the service (``client``: EC2's or Auto Scaling's);
    ``key`` is the answer's list (``Reservations`` is opened into its instances)."""
    found: dict[str, list[dict]] = {job: [] for job in job_ids}
    wanted = sorted(found)
    for start in range(0, len(wanted), FILTER_VALUES):
        filters = [{"Name": f"tag:{T.JOB}", "Values": wanted[start:start + FILTER_VALUES]}]
        for page in client.get_paginator(operation).paginate(
                Filters=filters + (extra_filters or []), **kwargs):
            items = page[key]
            if key == "Reservations":
                items = [i for r in items for i in r["Instances"]]
            for item in items:
                job = T.as_dict(item.get("Tags")).get(T.JOB)
                if job in found:
                    found[job].append(item)
    return found


def describe_volume(ec2, volume_id: str) -> dict | None:
    try:
        volumes = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]
    except ClientError as exc:
        if error_code(exc) in ("InvalidVolume.NotFound", "InvalidVolumeID.NotFound"):
            return None
        raise
    return volumes[0] if volumes else None


def volume_has_tags(ec2, volume_id: str, tags: dict[str, str]) -> bool:
    """Does the volume carry all of ``tags``? (A CreateTags answered 5xx may have set them.)"""
    volume = describe_volume(ec2, volume_id)
    have = {t["Key"]: t["Value"] for t in (volume or {}).get("Tags", [])}
    return volume is not None and all(have.get(k) == v for k, v in tags.items())


def describe_snapshot(ec2, snapshot_id: str) -> dict | None:
    try:
        snapshots = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"]
    except ClientError as exc:
        if error_code(exc) in ("InvalidSnapshot.NotFound", "InvalidSnapshotID.NotFound"):
            return None
        raise
    return snapshots[0] if snapshots else None


def _poll(what: str, fetch: Callable[[], Any], done: Callable[[Any], bool],
          failed: Callable[[Any], str | None], deadline_s: float, poll_s: float, *,
          gone: str | None = None, missing_ok_s: float = 0.0,
          safe_point: Callable[[str], None] | None = None) -> Any:
    """Poll until ``done``. ``gone``: what to say when ``fetch`` finds nothing; that is
    accepted for ``missing_ok_s`` (unseen in a row) first, as EC2 may not show a new
    resource yet. ``safe_point``: called between polls; it may raise to end the wait (a
    notice came in: see spotrun.boot)."""
    last = None
    missing_since: float | None = None

    def settled() -> tuple | None:
        nonlocal last, missing_since
        try:
            last = fetch()
        except (ClientError, BotoCoreError) as exc:
            if not is_transient(exc):
                raise
            return None
        if done(last):
            return (last,)  # boxed: "deleted" is done with nothing left to return
        if last is None and gone is not None:
            now = time.monotonic()
            missing_since = now if missing_since is None else missing_since
            if now - missing_since >= missing_ok_s:
                if missing_ok_s <= 0:
                    raise ResourceGone(f"{gone} no longer exists")
                raise ResourceGone(
                    f"{gone} no longer exists: EC2 did not find it for {now - missing_since:.0f} s"
                    f" (waited up to aws.consistency_window_s = {missing_ok_s:g} s for a "
                    "new resource to show)")
        else:
            missing_since = None
            reason = failed(last)
            if reason:
                raise ResourceFailed(f"{what}: {reason}")
        return None

    return wait_until(
        settled, deadline_s, interval_s=min(poll_s, 0.2), backoff=1.5, max_interval_s=poll_s,
        what=what, on_poll=None if safe_point is None else (lambda _elapsed: safe_point(what)),
        error=lambda: WaitTimeout(f"{what}: not done after {deadline_s:.0f} s "
                                  f"(last seen: {_brief(last)})"))[0]


def _brief(resource: Any) -> str:
    if not resource:
        return "nothing"
    return str(resource.get("State", resource.get("Attachments", "")))


def wait_for_volume(ec2, volume_id: str, states: Iterable[str], deadline_s: float,
                    poll_s: float = 5.0, *, missing_ok_s: float = 0.0,
                    safe_point: Callable[[str], None] | None = None) -> dict:
    """Wait until the volume is in one of ``states``; ``error`` fails at once, disappearance
    once unseen for ``missing_ok_s`` (give a volume this agent just created that long)."""
    wanted = set(states)

    def failed(volume: dict) -> str | None:
        if volume["State"] == "error" and "error" not in wanted:
            return f"volume {volume_id} is in state 'error' (AWS could not create or restore it)"
        if volume["State"] in ("deleting", "deleted") and not wanted & {"deleting", "deleted"}:
            return f"volume {volume_id} is being deleted"
        return None

    return _poll(f"waiting for volume {volume_id} to be {'/'.join(sorted(wanted))}",
                 lambda: describe_volume(ec2, volume_id),
                 lambda v: v is not None and v["State"] in wanted, failed, deadline_s, poll_s,
                 gone=f"volume {volume_id}", missing_ok_s=missing_ok_s, safe_point=safe_point)


def wait_for_volume_deleted(ec2, volume_id: str, deadline_s: float, poll_s: float = 5.0) -> None:
    _poll(f"waiting for volume {volume_id} to be deleted", lambda: describe_volume(ec2, volume_id),
          lambda v: v is None or v["State"] == "deleted", lambda v: None, deadline_s, poll_s)


def wait_for_snapshot(ec2, snapshot_id: str, deadline_s: float, poll_s: float = 10.0, *,
                      missing_ok_s: float = 0.0,
                      safe_point: Callable[[str], None] | None = None) -> dict:
    """Wait until the snapshot is ``completed``; ``error`` fails at once, disappearance once
    unseen for ``missing_ok_s``."""

    def failed(snapshot: dict) -> str | None:
        if snapshot["State"] == "error":
            return f"snapshot {snapshot_id} is in state 'error': {snapshot.get('StateMessage', '')}"
        return None

    return _poll(f"waiting for snapshot {snapshot_id} to complete",
                 lambda: describe_snapshot(ec2, snapshot_id),
                 lambda s: s is not None and s["State"] == "completed", failed, deadline_s, poll_s,
                 gone=f"snapshot {snapshot_id}", missing_ok_s=missing_ok_s, safe_point=safe_point)


def attachment_of(volume: dict | None) -> dict | None:
    """The volume's attachment that is not 'detached', if any."""
    for att in (volume or {}).get("Attachments", []):
        if att.get("State") != "detached":
            return att
    return None


def wait_for_attachment(ec2, volume_id: str, instance_id: str, deadline_s: float,
                        state: str = "attached", poll_s: float = 2.0) -> dict:
    """Wait until ``volume_id`` is ``state`` ('attached' or 'detached') on ``instance_id``."""

    def done(volume: dict | None) -> bool:
        att = attachment_of(volume)
        if state == "detached":
            return att is None or att["InstanceId"] != instance_id
        return att is not None and att["InstanceId"] == instance_id and att["State"] == "attached"

    def failed(volume: dict) -> str | None:
        if volume["State"] == "error":
            return f"volume {volume_id} is in state 'error'"
        att = attachment_of(volume)
        if state == "attached" and att is not None and att["InstanceId"] != instance_id:
            return f"volume {volume_id} is attached to another instance, {att['InstanceId']}"
        if state == "attached" and volume["State"] == "available" and att is None:
            return None  # the attach may not be visible yet
        return None

    return _poll(f"waiting for volume {volume_id} to be {state} on {instance_id}",
                 lambda: describe_volume(ec2, volume_id), done, failed, deadline_s, poll_s,
                 gone=f"volume {volume_id}")

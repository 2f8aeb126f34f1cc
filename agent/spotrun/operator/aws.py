"""boto3 for the operator: the standard credential chain and region, standard retries.

Nothing here reads or writes credentials: boto3's own chain (environment, profile, SSO,
instance role) supplies them. ``AWS_ENDPOINT_URL`` (or ``--endpoint-url``) points every
client at another endpoint, e.g. the local spot cloud or moto's server.
"""
from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import botocore.parsers

from spotrun.errors import SpotrunError

# Standard retry mode (AWS's recommended one); attempts from AWS_MAX_ATTEMPTS / the profile,
# else the mode's default of 3.
RETRY_CONFIG = botocore.config.Config(retries={"mode": "standard"}, user_agent_extra="spotrun-operator")


@dataclass
class Aws:
    """Lazily-created clients sharing one session, region and endpoint."""

    region: str = ""
    endpoint_url: str = ""
    _session: Any = None
    _clients: dict = field(default_factory=dict)

    @property
    def session(self) -> boto3.session.Session:
        if self._session is None:
            self._session = boto3.session.Session(region_name=self.region or None)
            if not self._session.region_name:
                raise SpotrunError("no AWS region: set aws.region in the job file, AWS_REGION, "
                                   "or a profile's region")
            self.region = self._session.region_name
        return self._session

    def client(self, service: str) -> Any:
        if service not in self._clients:
            kwargs = {"config": RETRY_CONFIG}
            if self.endpoint_url:
                kwargs["endpoint_url"] = self.endpoint_url
            client = self.session.client(service, **kwargs)
            client.meta.events.register("before-call", _remember_call)
            _last_call["endpoint"] = client.meta.endpoint_url
            self._clients[service] = client
        return self._clients[service]

    def account_id(self) -> str:
        return self.client("sts").get_caller_identity()["Account"]


def error_code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return exc.response.get("Error", {}).get("Code", "")
    return ""


# The API call in flight, for errors that do not carry it (a connection refused, an answer
# that is not XML/JSON): the operator is one thread, one call at a time.
_last_call = {"name": "", "endpoint": ""}

# What the operator turns into one line (exit 1) instead of a traceback.
AWS_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
              botocore.parsers.ResponseParserError)


def _remember_call(model: Any = None, **_: Any) -> None:
    _last_call["name"] = getattr(model, "name", "") or ""


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def describe_error(exc: BaseException) -> str:
    """One line for the operator: which call, what AWS (or the network) said."""
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        return _one_line(f"AWS {exc.operation_name} failed: {err.get('Code', '?')}: "
                         f"{err.get('Message', '')}".strip())
    call = _last_call["name"] or "call"
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        endpoint = _last_call["endpoint"]
        if endpoint and not _is_aws(endpoint):
            # The local spot cloud (moto) takes any pair; `aws configure` would be the wrong advice.
            hint = (f"{endpoint} is not AWS and takes any credentials: "
                    "export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing")
        else:
            hint = "set them in the environment, ~/.aws/credentials (`aws configure`), SSO or a role"
        return f"AWS {call} failed: no AWS credentials found; {hint}"
    if isinstance(exc, botocore.parsers.ResponseParserError):
        first = str(exc).splitlines()[0].rstrip(": ") if str(exc) else ""
        return _one_line(f"AWS {call} failed: the endpoint's answer is not an AWS response "
                         f"(an HTML error page?): {first}")
    return _one_line(f"AWS {call} failed: {exc}")


def _is_aws(endpoint: str) -> bool:
    host = urllib.parse.urlsplit(endpoint).hostname or ""
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn", ".api.aws"))


class _OperatorLog:
    """The operator's logger, looked up at each call: a logger bound at import time would
    keep the configuration of that moment (stdout, info) after the CLI reconfigures it."""

    def __getattr__(self, name: str) -> Any:
        from spotrun.log import get_logger

        return getattr(get_logger("operator"), name)


oplog = _OperatorLog()

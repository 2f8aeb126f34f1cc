"""Instance metadata client: IMDSv2 over requests, retries with a deadline, proxies ignored.

Only this module speaks HTTP to instance metadata. The rules it keeps:

- IMDSv2 (session token) by default; IMDSv1 only when ``allow_imdsv1`` and the token
  endpoint is absent (404/405), as on old IMDSv1-only setups. That is not for good: the
  token is asked for again every ``V1_RECHECK_S`` and at once after a 401 (the instance was
  switched to "tokens required"), and the first token goes back to IMDSv2.
- The token is cached for the TTL the service granted (it may grant less than asked) and
  refreshed shortly before that expires and after a 401 (the service restarted, or the
  token was revoked).
- A 403 or other 4xx on the token PUT is a configuration problem, not an outage
  (hop limit too low for a container, an ``X-Forwarded-For`` header added by a proxy):
  it fails at once with :class:`MetadataError`.
- Connection errors, timeouts and 5xx are retried with jittered exponential backoff
  until a deadline; then :class:`MetadataUnavailable`.
- ``trust_env`` is off: an ``HTTP_PROXY`` in the environment must never route metadata
  traffic (the token would leave the instance).
- The token is never logged, and never appears in an error message.
"""
from __future__ import annotations

import json
import random
import threading
import time
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlsplit

import requests

from spotrun.errors import SpotrunError
from spotrun.log import get_logger

if TYPE_CHECKING:  # pragma: no cover
    from spotrun.config import MetadataConfig

DEFAULT_ENDPOINT = "http://169.254.169.254"
IPV6_ENDPOINT = "http://[fd00:ec2::254]"
TOKEN_PATH = "/latest/api/token"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
MAX_TOKEN_TTL_S = 21600

# Backoff between attempts: exponential from BACKOFF_BASE_S, capped, with jitter so that
# many agents restarted together do not hammer a recovering service in lockstep.
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 5.0
# In IMDSv1 fallback, how often the token endpoint is tried again.
V1_RECHECK_S = 60.0

log = get_logger("imds")


class MetadataError(SpotrunError):
    """The metadata service answered, but not usefully (4xx on the token, malformed JSON)."""

    def __init__(self, message: str, path: str | None = None):
        self.path = path
        super().__init__(message)


class MetadataUnavailable(MetadataError):
    """No usable answer within the deadline (connection refused, timeouts, 5xx)."""


class _Retry(Exception):
    """One failed attempt that is worth another one (internal)."""

    def __init__(self, reason: str, unauthorized: bool = False):
        self.reason = reason
        self.unauthorized = unauthorized
        super().__init__(reason)


def _validate_endpoint(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MetadataError(
            f"metadata endpoint {endpoint!r} is not an http:// URL "
            f"(e.g. {DEFAULT_ENDPOINT} or {IPV6_ENDPOINT})"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise MetadataError(f"metadata endpoint {endpoint!r} must have no path (the client adds /latest/...)")
    return endpoint.rstrip("/")


def _clean_path(path: str) -> str:
    path = path.lstrip("/")
    if path.startswith("latest/"):
        path = path[len("latest/"):]
    if not path or ".." in path.split("/"):
        raise MetadataError(f"metadata path {path!r} is not a path under /latest/", path)
    return path


class MetadataClient:
    """A small, thread-safe IMDSv2 client. ``get`` returns text, or None on 404."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        token_ttl_s: int = MAX_TOKEN_TTL_S,
        connect_timeout_s: float = 1.0,
        read_timeout_s: float = 2.0,
        deadline_s: float = 120.0,
        allow_imdsv1: bool = False,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not 1 <= int(token_ttl_s) <= MAX_TOKEN_TTL_S:
            raise MetadataError(f"token_ttl_s must be between 1 and {MAX_TOKEN_TTL_S}, got {token_ttl_s}")
        for name, value in (("connect_timeout_s", connect_timeout_s), ("read_timeout_s", read_timeout_s),
                            ("deadline_s", deadline_s)):
            if value <= 0:
                raise MetadataError(f"{name} must be greater than zero, got {value}")
        self.endpoint = _validate_endpoint(endpoint)
        self.token_ttl_s = int(token_ttl_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.read_timeout_s = float(read_timeout_s)
        self.deadline_s = float(deadline_s)
        self.allow_imdsv1 = allow_imdsv1
        self._session = session or requests.Session()
        # Never let HTTP(S)_PROXY / NO_PROXY / .netrc from the environment apply.
        self._session.trust_env = False
        self._session.proxies = {}
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_granted_s = float(self.token_ttl_s)
        self._v1_mode = False
        self._v1_recheck_at = 0.0

    @classmethod
    def from_config(cls, cfg: "MetadataConfig", **kwargs) -> "MetadataClient":
        return cls(
            cfg.endpoint,
            token_ttl_s=cfg.token_ttl_s,
            connect_timeout_s=cfg.connect_timeout_s,
            read_timeout_s=cfg.read_timeout_s,
            deadline_s=cfg.deadline_s,
            allow_imdsv1=cfg.allow_imdsv1,
            **kwargs,
        )

    def __repr__(self) -> str:  # no token here, ever
        return f"MetadataClient({self.endpoint!r}, imdsv1={'on' if self._v1_mode else 'off'})"

    # -- public API ---------------------------------------------------------------------

    def get(self, path: str, *, deadline_s: float | None = None) -> str | None:
        """The text at ``/latest/<path>`` (e.g. ``meta-data/instance-id``); None on 404."""
        response = self._get(path, deadline_s)
        return None if response is None else response.text

    def get_json(self, path: str, *, deadline_s: float | None = None) -> object | None:
        """The JSON document at ``/latest/<path>``; None on 404; MetadataError if malformed."""
        text = self.get(path, deadline_s=deadline_s)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise MetadataError(f"metadata {path}: malformed JSON ({exc.msg} at position {exc.pos})",
                                path) from None

    def user_data(self) -> bytes | None:
        """The instance's user data as bytes; None when it has none (404)."""
        response = self._get("user-data", None)
        return None if response is None else response.content

    def close(self) -> None:
        self._session.close()

    def invalidate_token(self) -> None:
        """Forget the cached token (the next request fetches a new one)."""
        with self._lock:
            self._token = None
            self._token_expires = 0.0

    # -- internals ----------------------------------------------------------------------

    def _timeout(self, remaining: float) -> tuple[float, float]:
        # Never wait on one attempt past the caller's deadline.
        floor = 0.05
        return (max(floor, min(self.connect_timeout_s, remaining)),
                max(floor, min(self.read_timeout_s, remaining)))

    def _get(self, path: str, deadline_s: float | None) -> requests.Response | None:
        path = _clean_path(path)
        budget = self.deadline_s if deadline_s is None else float(deadline_s)
        deadline = self._clock() + budget
        attempt = 0
        last_reason = ""
        refreshed_after_401 = False
        while True:
            attempt += 1
            try:
                return self._attempt(path, deadline)
            except _Retry as retry:
                last_reason = retry.reason
                # An expired token is routine: the first 401 is retried at once with a new one.
                retry_now = retry.unauthorized and not refreshed_after_401
                refreshed_after_401 |= retry.unauthorized
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            if retry_now:
                continue
            delay = min(remaining, BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt - 1, 16))
            delay *= random.uniform(0.5, 1.0)
            log.debug("imds_retry", path=path, attempt=attempt, reason=last_reason, delay_s=round(delay, 3))
            self._sleep(delay)
        log.info("imds_unavailable", path=path, endpoint=self.endpoint, attempts=attempt,
                    reason=last_reason, deadline_s=budget)
        hint = ""
        if last_reason.startswith("token PUT failed"):
            # AWS drops token answers that would cross more hops than the instance allows.
            hint = "; in a container, the instance's metadata hop limit may be too low (set it to 2)"
        raise MetadataUnavailable(
            f"instance metadata {self.endpoint}/latest/{path}: no answer within {budget:g} s "
            f"({attempt} attempts; last: {last_reason}){hint}",
            path,
        )

    def _attempt(self, path: str, deadline: float) -> requests.Response | None:
        remaining = deadline - self._clock()
        headers = {}
        token = self._current_token(path, remaining)
        if token is not None:
            headers[TOKEN_HEADER] = token
        url = f"{self.endpoint}/latest/{path}"
        try:
            response = self._session.get(url, headers=headers, timeout=self._timeout(remaining),
                                         allow_redirects=False)
        except requests.RequestException as exc:
            raise _Retry(f"GET failed: {type(exc).__name__}") from None
        status = response.status_code
        if status == 200:
            return response
        if status == 404:
            return None
        if status == 401:
            # Expired or revoked token (or the service restarted): a fresh one next attempt.
            # Without a token (IMDSv1 fallback) the service now wants one: ask at once.
            self.invalidate_token()
            with self._lock:
                self._v1_recheck_at = 0.0
            raise _Retry("401 Unauthorized (token refreshed)", unauthorized=True)
        if status >= 500 or status == 429:
            raise _Retry(f"HTTP {status}")
        raise MetadataError(f"instance metadata {url}: HTTP {status} {response.reason or ''}".rstrip(), path)

    def _current_token(self, path: str, remaining: float) -> str | None:
        with self._lock:
            if self._v1_mode:
                if self._clock() < self._v1_recheck_at:
                    return None
                try:
                    return self._fetch_token(path, remaining)
                except (_Retry, MetadataError):
                    # The token endpoint still does not serve us; IMDSv1 keeps working.
                    self._v1_recheck_at = self._clock() + V1_RECHECK_S
                    return None
            # Refresh a little before expiry so a request never carries a token that
            # expires in flight: a tenth of the TTL granted, at most a minute.
            margin = min(60.0, self._token_granted_s / 10)
            if self._token is not None and self._clock() < self._token_expires - margin:
                return self._token
            return self._fetch_token(path, remaining)

    def _fetch_token(self, path: str, remaining: float) -> str | None:
        url = f"{self.endpoint}{TOKEN_PATH}"
        requested_at = self._clock()
        try:
            response = self._session.put(url, headers={TOKEN_TTL_HEADER: str(self.token_ttl_s)},
                                         timeout=self._timeout(remaining), allow_redirects=False)
        except requests.RequestException as exc:
            raise _Retry(f"token PUT failed: {type(exc).__name__}") from None
        status = response.status_code
        if status == 200 and response.text:
            self._token = response.text
            ttl = self.token_ttl_s
            try:  # the service may grant less than asked
                ttl = min(ttl, int(response.headers.get(TOKEN_TTL_HEADER, ttl)))
            except ValueError:
                pass
            self._token_expires = requested_at + ttl
            self._token_granted_s = float(max(ttl, 1))
            log.info("imds_token_acquired", ttl_s=ttl)
            if self._v1_mode:
                self._v1_mode = False
                log.warning("imds_v2_restored", endpoint=self.endpoint)
            return self._token
        if status in (404, 405) and self.allow_imdsv1:
            if not self._v1_mode:
                log.warning("imds_v1_fallback", endpoint=self.endpoint, status=status,
                            reason="token endpoint absent; allow_imdsv1 is on",
                            recheck_s=V1_RECHECK_S)
            self._v1_mode = True
            self._v1_recheck_at = self._clock() + V1_RECHECK_S
            return None
        if status >= 500 or status == 429 or status == 200:  # 200 here: an empty token
            raise _Retry(f"token PUT: HTTP {status}" + (" with an empty token" if status == 200 else ""))
        hint = ""
        if status == 403:
            hint = (" (IMDSv2 token refused: a request through a proxy (X-Forwarded-For), "
                    "or the instance's metadata hop limit is too low for a container)")
        elif status in (404, 405):
            hint = " (no IMDSv2 token endpoint; set metadata.allow_imdsv1 = true to use IMDSv1)"
        elif status == 400:
            hint = f" (token TTL {self.token_ttl_s} s refused)"
        log.error("imds_token_refused", endpoint=self.endpoint, status=status, path=path)
        raise MetadataError(
            f"instance metadata {url}: HTTP {status} on the token request for {path}{hint}", path
        )

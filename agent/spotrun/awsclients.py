"""One botocore session per process; each client made once and shared by every thread.

A session holds the loaded service models (EC2's is tens of MB in memory), and a second
session loads them again: measured 84 MiB for two EC2 clients from two sessions against 62
from one. Sessions are not thread-safe, clients are; so clients are made under one lock and
kept, keyed by everything that makes them differ (service, region, endpoint, retry policy).
The single-attempt EC2 client for creates (spotrun.ec2.create_once) is a second client from
the same session, sharing its model.

botocore directly, not boto3: boto3 adds resources and s3transfer the agent never uses.

With :func:`use_trimmed_models` (the agent calls it with its state directory), each of the
agent's services is loaded from a model holding only the operations it calls
(spotrun.botomodel), put first on the session loader's search path before that service's first
client; the full model stays the fallback.

:func:`register` adds a botocore event handler to every client of the process, made or to be
made: the one way code outside the agent (a test launcher recording the AWS calls made) hooks
into them. The agent itself registers nothing through it.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable

_lock = threading.Lock()
_session = None
_session_env: tuple = ()
# What a session resolves its credentials from, once: in production it never changes; a test
# process that changes it gets a new session (and clients) rather than stale credentials.
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
_clients: dict[tuple, Any] = {}
_model_cache: str | None = None
# Per session: the loader's own search path (where full models are), and the services whose
# model source is decided (it must be before the loader first looks the service up: it caches).
_full_model_paths: list[str] = []
_decided: set[str] = set()
# (event, handler) pairs put on every client: register() / unregister().
_handlers: list[tuple[str, Callable[..., Any]]] = []


def register(event: str, handler: Callable[..., Any]) -> None:
    """Have every client of this process, those made already and those still to be made, call
    ``handler`` on the botocore ``event`` (e.g. ``"before-call"``)."""
    with _lock:
        _handlers.append((event, handler))
        for made in _clients.values():
            made.meta.events.register(event, handler)


def unregister(event: str, handler: Callable[..., Any]) -> None:
    """Undo :func:`register` (on every client made meanwhile too)."""
    with _lock:
        if (event, handler) in _handlers:
            _handlers.remove((event, handler))
        for made in _clients.values():
            made.meta.events.unregister(event, handler)


def use_trimmed_models(cache_root: str | os.PathLike | None) -> None:
    """Load the agent's services from trimmed models cached under ``cache_root`` (None: full
    models). Clients made before are dropped: a session's loader keeps what it has loaded."""
    global _model_cache, _session
    with _lock:
        _model_cache = os.fspath(cache_root) if cache_root is not None else None
        _session = None
        _clients.clear()


def _session_locked():
    global _session, _session_env
    env = tuple(os.environ.get(name) for name in _CREDENTIAL_ENV)
    if _session is None or env != _session_env:
        import botocore.session
        _session, _session_env = botocore.session.get_session(), env
        _clients.clear()
        _decided.clear()
        _full_model_paths[:] = _session.get_component("data_loader").search_paths
    return _session


def _choose_model_locked(service: str) -> None:
    if _model_cache is None or service in _decided:
        return
    _decided.add(service)
    from spotrun import botomodel

    operations = botomodel.agent_operations().get(service)
    if not operations:
        return  # not one of the agent's services: botocore's full model
    try:
        data_dir = botomodel.ensure(service, operations, _model_cache, _full_model_paths)
    except Exception as exc:  # whatever it is, the full model still works
        from spotrun import log
        log.get_logger("awsclients").warning(
            "botocore_model_full", service=service, cache=_model_cache,
            error=f"{type(exc).__name__}: {exc}",
            note="the trimmed model could not be made or read; using botocore's full model")
        return
    _session.get_component("data_loader").search_paths.insert(0, os.fspath(data_dir))


def client(service: str, *, region: str, endpoint_url: str | None = None,
           retry_mode: str = "standard", max_attempts: int = 3,
           connect_timeout: float = 5, read_timeout: float = 30):
    """The process's client for these settings, made on first use."""
    key = (service, region, endpoint_url or None, retry_mode, max_attempts,
           connect_timeout, read_timeout)
    with _lock:
        _session_locked()
        made = _clients.get(key)
        if made is not None:
            return made
        import botocore.config

        from spotrun import notify
        config = botocore.config.Config(
            region_name=region,
            retries={"mode": retry_mode, "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout, read_timeout=read_timeout)
        kwargs: dict[str, Any] = {"config": config, "region_name": region}
        if endpoint_url:
            kwargs["endpoint_url"] = endpoint_url
        _choose_model_locked(service)
        made = _session_locked().create_client(service, **kwargs)
        # Every request, retries included, is a sign of life for the systemd watchdog.
        made.meta.events.register("before-send", notify.kick_from_main_thread)
        for event, handler in _handlers:
            made.meta.events.register(event, handler)
        _clients[key] = made
        return made

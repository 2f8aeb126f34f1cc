"""Secrets in a job file or a user-data stub: refused by what the value is, or by a known
secret name that carries a secret-looking value. Never by a substring: Hugging Face's
``TOKENIZERS_PARALLELISM = "false"`` or a model's ``PAD_TOKEN = "<pad>"`` are settings.

Pure (no boto3): the agent (spotrun.userdata) uses the same check on the stub it reads at boot, so that
what the operator sends is exactly what the agent accepts.
"""
from __future__ import annotations

import re
from typing import Any, Iterator, Mapping

from spotrun.config import ConfigError

# Secret material whatever key it sits under.
_SECRET_VALUE = re.compile(
    r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"  # AWS access key id (long-term / temporary)
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}|\bgithub_pat_[A-Za-z0-9_]{20,}"  # GitHub
    r"|\bglpat-[A-Za-z0-9_-]{20,}"  # GitLab
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|\bhf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|\bsk-[A-Za-z0-9_-]{32,}"  # OpenAI-style API keys
    # A URL with user:password@ (any scheme) or a bare user@ over http(s) (GitHub/GitLab take a
    # token as the user name). ssh://git@host and git@host:org/repo are not credentials.
    r"|\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"
    r"|\bhttps?://[^/\s:@]+@", re.I)

# Names that hold secrets when their value looks like one (AWS_SECRET_ACCESS_KEY, WANDB_API_KEY,
# HF_TOKEN, DB_PASSWORD, CLIENT_SECRET, ...): a whole name or a suffix after "_" or "-".
_SECRET_NAME = re.compile(
    r"(^|[_-])(api[_-]?key|secret|secret[_-]?key|secret[_-]?access[_-]?key|client[_-]?secret|"
    r"passw(or)?d|pass|token|access[_-]?token|auth[_-]?token|session[_-]?token|private[_-]?key|"
    r"credentials?)$", re.I)

# Base64/hex/url-safe characters only: what keys and tokens are made of ("<pad>" and
# "<|endoftext|>" are not).
_TOKEN_CHARS = re.compile(r"^[A-Za-z0-9_\-.+/=:~]+$")
_NOT_SECRET_WORDS = {"true", "false", "yes", "no", "on", "off", "none", "null", "auto", "disabled",
                     "enabled"}


def looks_secret(value: Any) -> bool:
    """A value a secret-named key would hold: 4+ token characters (a short password is still one),
    not a switch, a number, a path or a pointer (ARN, SSM name)."""
    if not isinstance(value, str):
        return False
    text = value.strip()
    if len(text) < 4 or not _TOKEN_CHARS.match(text):
        return False
    lowered = text.lower()
    if lowered in _NOT_SECRET_WORDS or text.replace(".", "", 1).isdigit():
        return False
    return not text.startswith(("/", "./", "~", "arn:", "ssm:", "secretsmanager:", "file:"))


def _leaves(value: Any, where: str) -> Iterator[tuple[str, str | None, Any]]:
    """(field, key name, leaf value) for every leaf under ``value``."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            name = f"{where}.{key}" if where else str(key)
            if isinstance(item, (Mapping, list, tuple)):
                yield from _leaves(item, name)
            yield name, str(key), item if not isinstance(item, (Mapping, list, tuple)) else None
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, (Mapping, list, tuple)):
                yield from _leaves(item, where)
            else:
                yield where, None, item


def check_no_secrets(doc: Mapping[str, Any], source: str) -> None:
    """ConfigError naming the first field that holds a secret."""
    for name, key, value in _leaves(doc, ""):
        if isinstance(value, str) and _SECRET_VALUE.search(value):
            raise ConfigError(name, "contains what looks like a credential (access key, private key, "
                              "token, or a URL with credentials); user data is readable on the "
                              "instance. Keep it in SSM/Secrets Manager (code.credentials_*)", source)
        if key is not None and _SECRET_NAME.search(key) and looks_secret(value):
            raise ConfigError(name, "looks like a secret (a secret's name with a secret-looking "
                              "value); user data is not secret. Have the trainer read it from "
                              "SSM/Secrets Manager instead", source)

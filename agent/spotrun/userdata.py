"""The user-data stub: a few lines of TOML the agent reads through instance metadata.

Two forms, both starting with the marker line so a human (and the agent) recognise them:

    #spotrun-config v1              #spotrun-config v1
    [job]                           [spotrun]
    id = "cifar10"                  ssm_parameter = "/spotrun/jobs/cifar10"
    [code]
    repository = "https://..."

The left one carries the agent-config overrides inline (what ``spotrun launch`` writes); the
right one points at an SSM parameter holding such a stub, for operators who manage the config
in Parameter Store (4 KB standard, 8 KB advanced: it does not beat the 16 KB user-data limit;
the parameter must carry the job tag for the agent's policy to allow reading it). cloud-init ignores
both (no ``#!``/``#cloud-config``). No secrets, ever: user data is readable by anything on
the instance that can reach metadata, and by anyone with ``ec2:DescribeInstanceAttribute``.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping

from spotrun.config import ConfigError, from_mapping, parse_toml

MARKER = "#spotrun-config v1"
# AWS: "User data is limited to 16 KB, in raw form, before it is base64-encoded."
MAX_BYTES = 16 * 1024
POINTER_SECTION = "spotrun"

# Key names that hold secret material (anywhere, trainer.env included).
_SECRET_NAME = re.compile(r"(token|secret|passw(or)?d|credential|api[_-]?key|private[_-]?key|"
                          r"access[_-]?key|authorization)", re.I)
# Keys that *point at* a secret the agent reads at run time: allowed, that is the point of them.
_SECRET_POINTERS = {("code", "credentials_file"), ("code", "credentials_ssm_parameter"),
                    ("code", "credentials_secret_id"), ("metadata", "token_ttl_s")}
# Values that are secret material whatever key they sit under.
_SECRET_VALUE = re.compile(
    r"(AKIA|ASIA)[A-Z0-9]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{20,}"  # GitHub tokens
    r"|glpat-[A-Za-z0-9_-]{20}"  # GitLab
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"  # URL with user:password@
)


def _check_no_secrets(overrides: Mapping[str, Any], source: str) -> None:
    for section, values in overrides.items():
        if not isinstance(values, Mapping):
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            if _SECRET_NAME.search(key) and (section, key) not in _SECRET_POINTERS:
                raise ConfigError(name, "looks like a secret; user data is not secret. Put it in "
                                  "SSM/Secrets Manager and point to it (code.credentials_*)", source)
            items = value.items() if isinstance(value, Mapping) else [(None, value)]
            for sub, item in items:
                where = f"{name}.{sub}" if sub else name
                if sub and _SECRET_NAME.search(sub):
                    raise ConfigError(where, "looks like a secret; user data is not secret. Have the "
                                      "trainer read it from SSM/Secrets Manager instead", source)
                for text in (item if isinstance(item, list) else [item]):
                    if isinstance(text, str) and _SECRET_VALUE.search(text):
                        raise ConfigError(where, "contains what looks like a credential "
                                          "(access key, token, password in a URL); refusing to "
                                          "put it in user data", source)


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_value(value: Any) -> str:
    # JSON's string escapes are a subset of TOML basic strings', so json.dumps quotes safely.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise ConfigError("(value)", f"cannot put {type(value).__name__} in user data", "user-data")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _dumps(doc: Mapping[str, Mapping[str, Any]]) -> str:
    """Compact TOML, one line per key (arrays and tables inline): the stub stays a few lines."""
    out = []
    for section, values in doc.items():
        out.append(f"[{_toml_key(section)}]")
        out.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items())
    return "\n".join(out) + "\n"


def _overrides_of(job: Any) -> Mapping[str, Any]:
    if hasattr(job, "user_data_overrides"):
        return job.user_data_overrides()
    if isinstance(job, Mapping):
        return job
    raise TypeError(f"render() takes a job or a mapping of config overrides, not {type(job).__name__}")


def render(job: Any, *, ssm_parameter: str | None = None) -> bytes:
    """The stub for ``job`` (an operator Job or a mapping of agent-config overrides).

    Validated as the agent will read it (``parse``), secret-free, at most 16 KB. With
    ``ssm_parameter`` the stub is only a pointer; the caller stores ``render(job)`` there.
    """
    if ssm_parameter is not None:
        if not ssm_parameter.startswith("/"):
            raise ConfigError("spotrun.ssm_parameter", "must be a parameter path starting with /",
                              "user-data")
        body = _dumps({POINTER_SECTION: {"ssm_parameter": ssm_parameter}})
    else:
        overrides = _overrides_of(job)
        _check_no_secrets(overrides, "user-data")
        from_mapping(overrides, "user-data")  # the agent must be able to read what we send
        body = _dumps(overrides)
    raw = f"{MARKER}\n# Generated by `spotrun launch`; read by the spotrun agent. No secrets here.\n{body}"
    data = raw.encode()
    if len(data) > MAX_BYTES:
        raise ConfigError("(size)", f"user data is {len(data)} bytes; EC2 allows {MAX_BYTES}. "
                          "Shorten trainer.env / trainer.command (put large settings in the repository)", "user-data")
    return data


def pointer(raw: bytes) -> str | None:
    """The SSM parameter a pointer stub names, or None for an inline stub."""
    doc = _decode(raw, "user-data")
    section = doc.get(POINTER_SECTION)
    if isinstance(section, Mapping):
        name = section.get("ssm_parameter")
        if not isinstance(name, str) or not name.startswith("/"):
            raise ConfigError("spotrun.ssm_parameter", "must be a parameter path starting with /",
                              "user-data")
        return name
    return None


def _decode(raw: bytes, source: str) -> dict:
    if len(raw) > MAX_BYTES:
        raise ConfigError("(size)", f"{len(raw)} bytes is over the {MAX_BYTES}-byte user-data limit", source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("(encoding)", f"not UTF-8 text at byte {exc.start}", source) from None
    if not text.lstrip().startswith(MARKER):
        first = text.strip().splitlines()[0][:40] if text.strip() else "(empty)"
        raise ConfigError("(marker)", f"not a spotrun stub: first line must be {MARKER!r}, got {first!r}",
                          source)
    return parse_toml(text, source)


def parse(raw: bytes, source: str = "user-data",
          fetch_parameter: Callable[[str], str] | None = None) -> dict:
    """Config overrides for ``spotrun.config.load(..., (overrides, source))``.

    Malformed → ConfigError naming the field. A pointer stub is resolved through
    ``fetch_parameter(name) -> TOML text`` (the agent passes an SSM reader).
    """
    doc = _decode(raw, source)
    if POINTER_SECTION in doc:
        name = pointer(raw)
        if fetch_parameter is None:
            raise ConfigError("spotrun.ssm_parameter", f"points to SSM parameter {name}; "
                              "no reader given to fetch it", source)
        text = fetch_parameter(name)
        doc = parse_toml(text, f"{source} (ssm:{name})")
        doc.pop(POINTER_SECTION, None)
        source = f"{source} (ssm:{name})"
    _check_no_secrets(doc, source)
    from_mapping(doc, source)  # full validation; the caller merges it over the file config
    return doc

"""The training code: git clone / fetch + hard reset at a pinned ref, with run-time credentials.

The instance is stateless, so the code comes from version control on every boot. A workspace
left by an earlier boot (or an agent restart) is fetched and hard-reset rather than re-cloned;
a clone is made under ``<workspace>.partial`` and renamed, so a clone cut short by a crash is
never mistaken for a checkout. Git runs isolated from the machine's configuration (no system or
global config, no hooks, no credential helpers, no terminal prompt); credentials reach it only
through ``GIT_ASKPASS`` and the child's environment, never its command line or our logs.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence
from urllib.parse import urlsplit, urlunsplit

from spotrun.errors import SpotrunError
from spotrun.log import get_logger

if TYPE_CHECKING:  # pragma: no cover
    from spotrun.config import AwsConfig, CodeConfig

log = get_logger("checkout")

DEFAULT_USERNAME = "x-access-token"  # what GitHub expects with a token; GitLab accepts any name
_HEX = re.compile(r"^[0-9a-fA-F]{4,40}$")
_TRANSIENT = re.compile(r"could not resolve host|connection (timed out|refused|reset)|"
                        r"operation timed out|early eof|unexpected disconnect|"
                        r"the remote end hung up|http/2 stream|returned error: 5\d\d", re.I)
# The askpass helper answers git's "Username for ..." / "Password for ..." prompts from its env.
_ASKPASS = """#!/bin/sh
case "$1" in
  Username*) printf '%s\\n' "$SPOTRUN_GIT_USERNAME" ;;
  *) printf '%s\\n' "$SPOTRUN_GIT_PASSWORD" ;;
esac
"""


class CheckoutError(SpotrunError):
    """The code could not be checked out; the message names the repository and ref."""


@dataclass(frozen=True)
class Credentials:
    """HTTPS username + password/token, or an SSH private key (deploy key)."""

    username: str = DEFAULT_USERNAME
    password: str = field(default="", repr=False)
    ssh_private_key: str = field(default="", repr=False)

    @classmethod
    def parse(cls, text: str, source: str) -> "Credentials":
        """A JSON object ({"username","password"} or {"token"} or {"ssh_private_key"}),
        an SSH private key in PEM/OpenSSH form, ``user:password``, or a bare token."""
        text = text.strip()
        if not text:
            raise CheckoutError(f"{source}: the credentials are empty")
        if "PRIVATE KEY-----" in text:
            return cls(ssh_private_key=text + "\n")
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except ValueError:
                raise CheckoutError(f"{source}: credentials look like JSON but do not parse") from None
            if not isinstance(data, dict):
                raise CheckoutError(f"{source}: credentials JSON must be an object")
            unknown = set(data) - {"username", "password", "token", "ssh_private_key"}
            if unknown:
                raise CheckoutError(f"{source}: unknown credentials key(s): {', '.join(sorted(unknown))}")
            values = {k: v for k, v in data.items()}
            if not all(isinstance(v, str) for v in values.values()):
                raise CheckoutError(f"{source}: credentials values must be strings")
            if values.get("ssh_private_key"):
                return cls(ssh_private_key=values["ssh_private_key"].strip() + "\n")
            secret = values.get("password") or values.get("token") or ""
            if not secret:
                raise CheckoutError(f"{source}: credentials need a password, token or ssh_private_key")
            return cls(username=values.get("username") or DEFAULT_USERNAME, password=secret)
        if "\n" not in text and ":" in text:
            username, _, password = text.partition(":")
            return cls(username=username or DEFAULT_USERNAME, password=password)
        return cls(password=text)


def redact_url(url: str) -> str:
    """The URL without any user:password@ part, fit for logs and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparseable url)"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    if parts.scheme in ("ssh", "git+ssh") and parts.username:
        netloc = f"{parts.username}@{netloc}"  # an ssh login name; https puts tokens there
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def load_credentials(code_cfg: "CodeConfig", *, ssm_client=None, secrets_client=None,
                     aws_cfg: "AwsConfig | None" = None, region: str | None = None) -> Credentials | None:
    """Read the repository credentials now (never from user data); None when none are configured."""
    sources = [(key, getattr(code_cfg, key)) for key in
               ("credentials_file", "credentials_ssm_parameter", "credentials_secret_id")
               if getattr(code_cfg, key)]
    if not sources:
        return None
    if len(sources) > 1:
        raise CheckoutError("code: set only one of " + ", ".join(f"code.{k}" for k, _ in sources))
    key, where = sources[0]
    source = f"code.{key} ({where})"
    if key == "credentials_file":
        try:
            text = Path(where).read_text()
        except OSError as exc:
            raise CheckoutError(f"{source}: cannot read: {exc.strerror}") from None
    elif key == "credentials_ssm_parameter":
        client = ssm_client or _aws_client("ssm", aws_cfg, region)
        try:
            text = client.get_parameter(Name=where, WithDecryption=True)["Parameter"]["Value"]
        except Exception as exc:  # botocore's ClientError and transport errors alike
            raise CheckoutError(f"{source}: cannot read the parameter: {_aws_error(exc)}") from None
    else:
        client = secrets_client or _aws_client("secretsmanager", aws_cfg, region)
        try:
            answer = client.get_secret_value(SecretId=where)
        except Exception as exc:
            raise CheckoutError(f"{source}: cannot read the secret: {_aws_error(exc)}") from None
        if "SecretString" not in answer:
            raise CheckoutError(f"{source}: the secret has no SecretString (binary secrets are not supported)")
        text = answer["SecretString"]
    credentials = Credentials.parse(text, source)
    log.info("credentials_loaded", source=key, kind="ssh-key" if credentials.ssh_private_key else "https")
    return credentials


def _aws_client(service: str, aws_cfg, region):
    try:
        from spotrun import ec2
    except ImportError:  # pragma: no cover - before spotrun.ec2 exists
        import boto3
        return boto3.client(service, region_name=region or None)
    from spotrun.config import AwsConfig
    return ec2.client(service, aws_cfg or AwsConfig(), region)


def _aws_error(exc: Exception) -> str:
    error = getattr(exc, "response", {}).get("Error", {}) if hasattr(exc, "response") else {}
    if error:
        return f"{error.get('Code')}: {error.get('Message')}"
    return type(exc).__name__


class _Git:
    """git with an isolated configuration and, for the child only, the credentials."""

    def __init__(self, repository: str, credentials: Credentials | None, helper_dir: Path,
                 timeout_s: float):
        self.repository = repository
        self.timeout_s = timeout_s
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(helper_dir),
            "LANG": "C", "LC_ALL": "C",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_ASKPASS": "/bin/false",  # a prompt without credentials fails instead of hanging
            "SSH_ASKPASS": "/bin/false",
            "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new",
        }
        if credentials and credentials.ssh_private_key:
            key = helper_dir / "id_key"
            key.write_text(credentials.ssh_private_key)
            key.chmod(0o600)
            self.env["GIT_SSH_COMMAND"] = (f"ssh -o BatchMode=yes -o IdentitiesOnly=yes "
                                           f"-o StrictHostKeyChecking=accept-new -i {key}")
        elif credentials:
            askpass = helper_dir / "askpass"
            askpass.write_text(_ASKPASS)
            askpass.chmod(0o700)
            self.env.update(GIT_ASKPASS=str(askpass), SPOTRUN_GIT_USERNAME=credentials.username,
                            SPOTRUN_GIT_PASSWORD=credentials.password)
        self._secrets = [s for s in (credentials.password if credentials else "",) if s]

    def __call__(self, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        argv = ["git", "-c", "core.hooksPath=/dev/null", "-c", "credential.helper=",
                "-c", "safe.directory=*", "-c", "advice.detachedHead=false", *args]
        try:
            result = subprocess.run(argv, cwd=cwd, env=self.env, capture_output=True, text=True,
                                    timeout=self.timeout_s, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise CheckoutError("git is not installed (apt-get install git)") from None
        except subprocess.TimeoutExpired:
            raise CheckoutError(f"git {args[0]} of {redact_url(self.repository)} took longer than "
                                f"{self.timeout_s:.0f} s") from None
        if check and result.returncode != 0:
            raise _GitFailed(self.clean(result.stderr.strip() or result.stdout.strip()))
        return result

    def clean(self, text: str) -> str:
        text = text.replace(self.repository, redact_url(self.repository))
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text[-2000:]


class _GitFailed(Exception):
    pass


def checkout(repository: str, ref: str, workspace: Path, *, credentials: Credentials | None = None,
             owner: str | None = None, timeout_s: float = 900.0, attempts: int = 3) -> str:
    """Make ``workspace`` a clean checkout of ``ref`` of ``repository``; return the commit sha."""
    if not repository:
        raise CheckoutError("code.repository is empty: where is the training code? (a git URL)")
    if not ref or ref.startswith("-"):
        raise CheckoutError(f"code.ref {ref!r} is not a valid ref")
    workspace = Path(workspace)
    owner_ids = _lookup_owner(owner) if owner else None
    shown = redact_url(repository)
    log.info("checkout_started", repository=shown, ref=ref, workspace=str(workspace))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="spotrun-git-") as helper_dir:
        git = _Git(repository, credentials, Path(helper_dir), timeout_s)
        for attempt in range(1, attempts + 1):
            try:
                sha = _checkout_once(git, ref, workspace)
                break
            except _GitFailed as exc:
                message = str(exc)
                if attempt < attempts and _TRANSIENT.search(message):
                    log.warning("checkout_retry", repository=shown, attempt=attempt, error=message)
                    time.sleep(min(2.0 * 2 ** (attempt - 1), 30.0))  # backoff between network attempts
                    continue
                raise CheckoutError(f"cannot check out {ref!r} of {shown}: {message}") from None
    if owner_ids:
        _chown_tree(workspace, *owner_ids)
    log.info("checkout_done", repository=shown, ref=ref, commit=sha, workspace=str(workspace),
             duration_s=round(time.monotonic() - started, 3))
    return sha


def _checkout_once(git: _Git, ref: str, workspace: Path) -> str:
    partial = workspace.with_name(workspace.name + ".partial")
    if partial.exists():
        log.warning("checkout_partial_removed", path=str(partial))
        shutil.rmtree(partial)
    if _is_checkout(git, workspace):
        _clear_stale_locks(workspace)
        git("remote", "set-url", "origin", git.repository, cwd=workspace)
        _fetch(git, workspace)
        target = workspace
    else:
        if workspace.exists() and any(workspace.iterdir()):
            raise CheckoutError(f"code.workspace {workspace} exists and is not a git checkout; "
                                "refusing to delete it (empty it or choose another workspace)")
        partial.parent.mkdir(parents=True, exist_ok=True)
        git("clone", "--no-checkout", "--origin", "origin", "--", git.repository, str(partial))
        _fetch(git, partial)  # tags that no branch reaches, with forced updates
        target = partial
    sha = _resolve(git, target, ref)
    git("checkout", "--force", "--detach", sha, cwd=target)
    git("reset", "--hard", sha, cwd=target)
    git("clean", "-ffdxq", cwd=target)
    if target is partial:
        if workspace.exists():
            workspace.rmdir()  # checked empty above
        partial.rename(workspace)
    return sha


def _is_checkout(git: _Git, workspace: Path) -> bool:
    if not (workspace / ".git").is_dir():
        return False
    result = git("rev-parse", "--show-toplevel", cwd=workspace, check=False)
    if result.returncode != 0:
        # A checkout whose repository is broken (git killed mid-way, disk trouble): it held
        # only code from version control, so it is cloned again.
        log.warning("checkout_broken_repository_removed", path=str(workspace),
                    error=git.clean(result.stderr.strip()))
        shutil.rmtree(workspace)
        return False
    return Path(result.stdout.strip()).resolve() == workspace.resolve()


def _clear_stale_locks(workspace: Path) -> None:
    # The agent is the only git user of its workspace; a lock is left by a git killed mid-way.
    for lock in (workspace / ".git").glob("*.lock"):
        log.warning("checkout_stale_lock_removed", path=str(lock))
        lock.unlink(missing_ok=True)


def _fetch(git: _Git, repo: Path) -> None:
    git("fetch", "--force", "--prune", "--prune-tags", "origin",
        "+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*", cwd=repo)


def _resolve(git: _Git, repo: Path, ref: str) -> str:
    candidates: Sequence[str] = (f"refs/remotes/origin/{ref}", f"refs/tags/{ref}", ref)
    for candidate in candidates:
        result = git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{candidate}^{{commit}}",
                     cwd=repo, check=False)
        if result.returncode == 0:
            return result.stdout.strip()
    if _HEX.match(ref) and len(ref) == 40:
        # A commit no branch or tag reaches: servers allow fetching it by its full id.
        if git("fetch", "origin", ref, cwd=repo, check=False).returncode == 0:
            return git("rev-parse", "--verify", f"{ref}^{{commit}}", cwd=repo).stdout.strip()
    raise CheckoutError(f"code.ref {ref!r} is not a branch, tag or commit of "
                        f"{redact_url(git.repository)}")


def _lookup_owner(owner: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(owner)
    except KeyError:
        raise CheckoutError(f"trainer.user {owner!r} does not exist on this machine") from None
    return entry.pw_uid, entry.pw_gid


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)

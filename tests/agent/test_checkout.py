"""spotrun.checkout against real local git repositories (file:// URLs)."""
from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest

from spotrun.checkout import CheckoutError, Credentials, checkout, redact_url

GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, env=GIT_ENV, check=True,
                          capture_output=True, text=True).stdout.strip()


def commit(repo: Path, name: str, text: str) -> str:
    (repo / name).write_text(text)
    git(repo, "add", name)
    git(repo, "commit", "-q", "-m", f"{name}: {text}")
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def origin(tmp_path):
    """main: c1 (tag v1) → c2; branch feature: c2 → c3."""
    repo = tmp_path / "origin"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    shas = {"c1": commit(repo, "train.py", "v1")}
    git(repo, "tag", "-a", "v1", "-m", "release 1")
    shas["c2"] = commit(repo, "train.py", "v2")
    git(repo, "checkout", "-q", "-b", "feature")
    shas["c3"] = commit(repo, "extra.py", "feature")
    git(repo, "checkout", "-q", "main")
    return repo, f"file://{repo}", shas


def test_branch_tag_and_commit(origin, tmp_path):
    repo, url, shas = origin
    workspace = tmp_path / "ws"
    assert checkout(url, "main", workspace) == shas["c2"]
    assert (workspace / "train.py").read_text() == "v2"
    assert not (workspace / "extra.py").exists()
    assert checkout(url, "v1", workspace) == shas["c1"]  # annotated tag → its commit
    assert (workspace / "train.py").read_text() == "v1"
    assert checkout(url, "feature", workspace) == shas["c3"]
    assert (workspace / "extra.py").read_text() == "feature"
    assert checkout(url, shas["c1"][:10], workspace) == shas["c1"]  # short commit id
    assert not (workspace / "extra.py").exists()
    assert checkout(url, shas["c2"], workspace) == shas["c2"]
    assert not list(tmp_path.glob("*.partial"))


def test_fetch_and_reset_picks_up_new_commits(origin, tmp_path):
    repo, url, shas = origin
    workspace = tmp_path / "ws"
    checkout(url, "main", workspace)
    marker = workspace / ".git" / "marker"
    marker.write_text("same repository")  # proves the second call fetched rather than re-cloned
    c4 = commit(repo, "train.py", "v4")
    assert checkout(url, "main", workspace) == c4
    assert (workspace / "train.py").read_text() == "v4"
    assert marker.exists()


def test_moved_tag_is_followed(origin, tmp_path):
    repo, url, shas = origin
    workspace = tmp_path / "ws"
    assert checkout(url, "v1", workspace) == shas["c1"]
    git(repo, "tag", "-f", "-a", "v1", "-m", "moved", shas["c2"])
    assert checkout(url, "v1", workspace) == shas["c2"]


def test_dirty_workspace_is_restored(origin, tmp_path):
    repo, url, shas = origin
    workspace = tmp_path / "ws"
    checkout(url, "main", workspace)
    (workspace / "train.py").write_text("edited by hand")
    (workspace / "stray.txt").write_text("untracked")
    (workspace / "__pycache__").mkdir()
    (workspace / ".git" / "index.lock").write_text("")  # a git killed mid-way
    assert checkout(url, "main", workspace) == shas["c2"]
    assert (workspace / "train.py").read_text() == "v2"
    assert not (workspace / "stray.txt").exists()
    assert not (workspace / "__pycache__").exists()
    assert git(workspace, "status", "--porcelain") == ""


def test_half_done_clone_is_recovered(origin, tmp_path):
    repo, url, shas = origin
    workspace = tmp_path / "ws"
    partial = tmp_path / "ws.partial"
    (partial / ".git").mkdir(parents=True)
    (partial / ".git" / "HEAD").write_text("garbage")
    assert checkout(url, "main", workspace) == shas["c2"]
    assert not partial.exists()
    # A checkout whose .git got broken is cloned again, not left half-working.
    (workspace / ".git" / "HEAD").write_text("garbage")
    assert checkout(url, "feature", workspace) == shas["c3"]


def test_bad_ref_is_a_clear_error_and_keeps_the_workspace(origin, tmp_path):
    repo, url, shas = origin
    workspace = tmp_path / "ws"
    checkout(url, "main", workspace)
    with pytest.raises(CheckoutError, match=r"code.ref 'no-such-branch' is not a branch, tag or commit"):
        checkout(url, "no-such-branch", workspace)
    assert (workspace / "train.py").read_text() == "v2"
    with pytest.raises(CheckoutError, match="not a branch, tag or commit"):
        checkout(url, "0" * 40, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_missing_repository_and_foreign_workspace(tmp_path):
    with pytest.raises(CheckoutError, match="code.repository is empty"):
        checkout("", "main", tmp_path / "ws")
    with pytest.raises(CheckoutError, match="cannot check out 'main' of file://"):
        checkout(f"file://{tmp_path}/nothing-here", "main", tmp_path / "ws")
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(CheckoutError, match="exists and is not a git checkout"):
        checkout(f"file://{tmp_path}/nothing-here", "main", foreign)
    assert (foreign / "precious.txt").read_text() == "keep me"


def test_repository_hooks_and_global_config_are_ignored(origin, tmp_path, monkeypatch):
    repo, url, shas = origin
    home = tmp_path / "home"
    home.mkdir()
    hook = tmp_path / "hook-ran"
    (home / ".gitconfig").write_text(f"[core]\n\thooksPath = {tmp_path}/hooks\n")
    (tmp_path / "hooks").mkdir()
    for name in ("post-checkout", "reference-transaction"):
        script = tmp_path / "hooks" / name
        script.write_text(f"#!/bin/sh\ntouch {hook}\n")
        script.chmod(0o755)
    monkeypatch.setenv("HOME", str(home))
    assert checkout(url, "main", tmp_path / "ws") == shas["c2"]
    assert not hook.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_owner_gets_the_tree(origin, tmp_path):
    repo, url, shas = origin
    workspace = tmp_path / "ws"
    nobody = pwd.getpwnam("nobody")
    checkout(url, "main", workspace, owner="nobody")
    for path in [workspace, workspace / "train.py", workspace / ".git" / "HEAD"]:
        assert path.stat().st_uid == nobody.pw_uid
    # A second run on a tree owned by someone else still works (git's safe.directory check).
    assert checkout(url, "feature", workspace, owner="nobody") == shas["c3"]
    with pytest.raises(CheckoutError, match="trainer.user 'no-such-user-x' does not exist"):
        checkout(url, "main", workspace, owner="no-such-user-x")


def test_credentials_parsing_and_url_redaction():
    assert Credentials.parse("ghp_abc\n", "f") == Credentials(password="ghp_abc")
    assert Credentials.parse("alice:s3cret", "f") == Credentials("alice", "s3cret")
    assert Credentials.parse('{"username": "bob", "token": "t"}', "f") == Credentials("bob", "t")
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----"
    assert Credentials.parse(key, "f").ssh_private_key == key + "\n"
    assert "s3cret" not in repr(Credentials("alice", "s3cret"))
    with pytest.raises(CheckoutError, match="f: unknown credentials key"):
        Credentials.parse('{"user": "x"}', "f")
    with pytest.raises(CheckoutError, match="empty"):
        Credentials.parse("  \n", "f")
    assert redact_url("https://alice:pw@git.example.com:8443/r.git") == "https://git.example.com:8443/r.git"
    assert redact_url("file:///srv/repo") == "file:///srv/repo"


def test_commit_only_reachable_from_a_non_branch_ref(origin, tmp_path):
    """A pinned commit of a pull request (refs/pull/N/head): fetched by its full id."""
    repo, url, shas = origin
    git(repo, "checkout", "-q", "-b", "pr")
    pr_commit = commit(repo, "pr.py", "pull request")
    git(repo, "update-ref", "refs/pull/1/head", pr_commit)
    git(repo, "checkout", "-q", "main")
    git(repo, "branch", "-q", "-D", "pr")
    workspace = tmp_path / "ws"
    assert checkout(url, pr_commit, workspace) == pr_commit
    assert (workspace / "pr.py").read_text() == "pull request"


def test_ssh_deploy_key_reaches_ssh_through_a_private_file(tmp_path, monkeypatch):
    """No SSH server here: a stand-in ``ssh`` on PATH records what git hands it."""
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nZmFrZS1rZXk=\n-----END OPENSSH PRIVATE KEY-----"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "ssh-args"
    fake_ssh = bindir / "ssh"
    fake_ssh.write_text("#!/bin/sh\n"
                        f"echo \"$@\" > {record}\n"
                        "for a in \"$@\"; do [ -f \"$a\" ] && stat -c '%a' \"$a\" >> "
                        f"{record} && cat \"$a\" >> {record}; done\n"
                        "echo 'fake ssh: no server' >&2; exit 255\n")
    fake_ssh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    with pytest.raises(CheckoutError, match="cannot check out 'main' of ssh://git@example.invalid/r.git"):
        checkout("ssh://git@example.invalid/r.git", "main", tmp_path / "ws",
                 credentials=Credentials.parse(key, "test"), attempts=1)
    seen = record.read_text()
    assert "BatchMode=yes" in seen and "IdentitiesOnly=yes" in seen
    assert "\n600\n" in seen and "ZmFrZS1rZXk=" in seen  # the key, in a file only its owner reads
    assert "ZmFrZS1rZXk=" not in seen.splitlines()[0]  # never on the command line

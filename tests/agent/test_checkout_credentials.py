"""Private repositories: credentials read at run time from a file, SSM or Secrets Manager,
handed to a real git over real HTTP (git http-backend behind Basic auth), and never seen on
any process's command line or in the logs."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import psutil
import pytest

from spotrun.checkout import CheckoutError, Credentials, checkout, load_credentials
from spotrun.config import CodeConfig

USER, SECRET = "alice", "tok-9f8e7d6c5b4a-very-secret"
HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"


class _GitHTTP(BaseHTTPRequestHandler):
    """Smart-HTTP git behind Basic auth; records every command line running meanwhile."""

    root: Path
    seen_cmdlines: list

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _serve(self):
        expected = "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
        # Not those naming another test's server: a git of an earlier test (one given a URL
        # with credentials inside, on purpose) can still be exiting when this one starts.
        here = f"127.0.0.1:{self.server.server_address[1]}/"
        self.seen_cmdlines.extend(line for line in (" ".join(p.info["cmdline"] or []) for p in
                                                    psutil.process_iter(["cmdline"]))
                                  if here in line or "@127.0.0.1:" not in line)
        if self.headers.get("Authorization") != expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        env = {"GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1",
               "PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": self.command,
               "CONTENT_TYPE": self.headers.get("Content-Type", ""), "REMOTE_USER": USER,
               "CONTENT_LENGTH": str(len(body)), "PATH": os.environ["PATH"],
               "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(self.root)}
        for header, var in (("Git-Protocol", "GIT_PROTOCOL"), ("Content-Encoding", "HTTP_CONTENT_ENCODING")):
            if self.headers.get(header):
                env[var] = self.headers[header]
        out = subprocess.run([HTTP_BACKEND], input=body, env=env, capture_output=True, check=True).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _serve


@pytest.fixture
def private_repo(tmp_path):
    src = tmp_path / "srv" / "code.git"
    work = tmp_path / "src"
    work.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    run = lambda *a, cwd=work: subprocess.run(a, cwd=cwd, env=env, check=True, capture_output=True, text=True)
    run("git", "init", "-q", "-b", "main")
    (work / "train.py").write_text("print('private')\n")
    run("git", "add", "train.py")
    run("git", "commit", "-q", "-m", "one")
    sha = run("git", "rev-parse", "HEAD").stdout.strip()
    run("git", "clone", "-q", "--bare", str(work), str(src), cwd=tmp_path)
    handler = type("Handler", (_GitHTTP,), {"root": src.parent, "seen_cmdlines": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/code.git", sha, handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _Logs:
    """Everything the agent logged (structlog prints JSON lines to stdout)."""

    def __init__(self, capsys):
        self.capsys = capsys
        self.seen = ""

    def getvalue(self) -> str:
        out, err = self.capsys.readouterr()
        self.seen += out + err
        return self.seen


@pytest.fixture
def captured_logs(capsys):
    return _Logs(capsys)


def aws_client(service, endpoint):
    return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def test_private_repo_over_http_with_credentials_from_a_file(private_repo, tmp_path, captured_logs):
    url, sha, handler = private_repo
    creds_file = tmp_path / "git-credentials"
    creds_file.write_text(f"{USER}:{SECRET}\n")
    credentials = load_credentials(CodeConfig(repository=url, credentials_file=str(creds_file)))
    assert credentials == Credentials(USER, SECRET)
    assert checkout(url, "main", tmp_path / "ws", credentials=credentials) == sha
    assert (tmp_path / "ws" / "train.py").exists()
    git_cmdlines = [c for c in handler.seen_cmdlines if "git" in c]
    assert any("remote-http" in c or "clone" in c for c in git_cmdlines), git_cmdlines
    assert not [c for c in handler.seen_cmdlines if SECRET in c]
    assert "checkout_done" in captured_logs.getvalue()
    assert SECRET not in captured_logs.getvalue()
    assert SECRET not in (tmp_path / "ws" / ".git" / "config").read_text()


def test_wrong_or_missing_credentials_fail_without_prompting(private_repo, tmp_path, captured_logs):
    url, sha, _ = private_repo
    with pytest.raises(CheckoutError, match="cannot check out 'main' of http://127.0.0.1"):
        checkout(url, "main", tmp_path / "ws1", timeout_s=30)  # no terminal prompt: fails at once
    with pytest.raises(CheckoutError) as info:
        checkout(url, "main", tmp_path / "ws2", credentials=Credentials(USER, "wrong-" + SECRET), timeout_s=30)
    assert SECRET not in str(info.value)
    assert SECRET not in captured_logs.getvalue()
    # A URL with credentials inside is never echoed back.
    embedded = url.replace("http://", f"http://{USER}:{SECRET}@")
    assert checkout(embedded, "main", tmp_path / "ws3") == sha
    assert SECRET not in captured_logs.getvalue()


def test_credentials_from_ssm_secure_string(moto_endpoint, private_repo, tmp_path):
    url, sha, handler = private_repo
    ssm = aws_client("ssm", moto_endpoint)
    ssm.put_parameter(Name="/spotrun/git", Value=json.dumps({"username": USER, "password": SECRET}),
                      Type="SecureString", Overwrite=True)
    credentials = load_credentials(CodeConfig(credentials_ssm_parameter="/spotrun/git"), ssm_client=ssm)
    assert credentials == Credentials(USER, SECRET)
    assert checkout(url, "main", tmp_path / "ws", credentials=credentials) == sha
    assert not [c for c in handler.seen_cmdlines if SECRET in c]
    with pytest.raises(CheckoutError, match=r"code.credentials_ssm_parameter \(/spotrun/nope\).*ParameterNotFound"):
        load_credentials(CodeConfig(credentials_ssm_parameter="/spotrun/nope"), ssm_client=ssm)


def test_credentials_from_secrets_manager(moto_endpoint):
    secrets = aws_client("secretsmanager", moto_endpoint)
    secrets.create_secret(Name="spotrun/git-token", SecretString=SECRET)
    credentials = load_credentials(CodeConfig(credentials_secret_id="spotrun/git-token"),
                                   secrets_client=secrets)
    assert credentials.password == SECRET and credentials.username == "x-access-token"
    with pytest.raises(CheckoutError, match=r"code.credentials_secret_id \(missing\).*ResourceNotFound"):
        load_credentials(CodeConfig(credentials_secret_id="missing"), secrets_client=secrets)


def test_credentials_config_errors(tmp_path):
    assert load_credentials(CodeConfig()) is None
    with pytest.raises(CheckoutError, match="set only one of code.credentials_file, code.credentials_ssm"):
        load_credentials(CodeConfig(credentials_file="/x", credentials_ssm_parameter="/y"))
    with pytest.raises(CheckoutError, match=r"code.credentials_file \(/nonexistent/creds\): cannot read"):
        load_credentials(CodeConfig(credentials_file="/nonexistent/creds"))

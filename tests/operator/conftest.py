"""Fixtures: moto's real server over HTTP, a request recorder, job files, the CLI in-process."""
from __future__ import annotations

import http.server
import os
import re
import sys
import threading
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer


REGION = "us-west-2"

JOB_TOML = """
[job]
id = "{job_id}"

[code]
repository = "https://github.com/example-org/spot-training.git"
ref = "v1.0"

[trainer]
command = ["python", "train.py", "--epochs", "30"]
env = {{ EPOCHS = "30" }}

[volume]
size_gib = 20

[aws]
region = "{region}"
lease_table = "leases-{job_id}"

[launch]
image_id = "ami-0123456789abcdef0"
instance_types = ["p3.2xlarge", "p2.xlarge"]
availability_zones = ["us-west-2a", "us-west-2b"]
volume_availability_zone = "us-west-2b"
fleet = "{fleet}"
spot_fleet_role = "fleet-role-{job_id}"
{extra}
"""


@pytest.fixture(scope="session")
def moto_server():
    # AWS's managed policies (AmazonEC2SpotFleetTaggingRole for the Spot Fleet role) exist on
    # AWS; moto loads them only when asked. The server runs in this process.
    os.environ["MOTO_IAM_LOAD_MANAGED_POLICIES"] = "true"
    # moto's backends live in the process: an IAM backend made by an earlier test (without the
    # managed policies) would be reused. Drop it so the next one is made with them.
    from moto.iam.models import iam_backends
    iam_backends.reset()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Dummy credentials through boto3's standard chain; no real profile is read."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")


@pytest.fixture
def moto(moto_server, aws_env):
    """The shared server. Not reset between tests (loading AWS's managed policies again costs
    seconds): each test uses its own job id, lease table and fleet role instead."""
    yield moto_server


@pytest.fixture
def client(moto):
    def make(service: str):
        return boto3.client(service, region_name=REGION, endpoint_url=moto)
    return make


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def _answer(self):
        type(self).requests.append((self.command, self.path, self.headers.get("X-Amz-Target")))
        self.send_response(500)
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder(aws_env):
    """An endpoint that records every request it gets (proves 'no AWS call')."""
    handler = type("Recorder", (_Recorder,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _job_id_for(node_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", node_name.removeprefix("test_"))[:50].strip("-")


@pytest.fixture
def job_id(request) -> str:
    return _job_id_for(request.node.name)


@pytest.fixture
def job_file(tmp_path, job_id):
    default_id = job_id

    def write(job_id: str = default_id, fleet: str = "ec2-fleet", extra: str = "", text: str | None = None) -> Path:
        path = tmp_path / f"{job_id}-{fleet}.toml"
        path.write_text(text if text is not None else
                        JOB_TOML.format(job_id=job_id, fleet=fleet, region=REGION, extra=extra))
        return path
    return write


def main(argv: list[str]) -> int:
    """The real ``spotrun`` entry point (its error-to-exit mapping included)."""
    from spotrun.cli import main as spotrun_main

    return spotrun_main(argv)


@pytest.fixture
def spotrun(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    def run(*argv: str) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture(autouse=True)
def quiet_logs():
    """structlog is process-global: point it at this test's stderr, not an earlier test's."""
    from spotrun import log
    log.configure("warning", stream=sys.stderr)
    yield

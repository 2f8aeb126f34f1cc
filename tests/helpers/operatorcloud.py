"""The local spot cloud as an operator meets it: `spotrun localcloud up --run-agents`, the
environment docs/operator.md exports, every command the real CLI in its own process, run where
the job file is. Shared by the end-to-end tests of the operator's journeys."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator


def spotrun(*argv: str, cwd: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spotrun", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def local_cloud(root: Path, work: Path) -> Iterator[dict]:
    """Up with agents (detached) for the job file in ``work``; yields the environment with the
    cloud's endpoint and dummy keys; down at the end, which must succeed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["SPOTRUN_LOCALCLOUD_ROOT"] = str(root)
    up = spotrun("localcloud", "up", "--run-agents", "--detach", cwd=work, env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        info = json.loads((root / "localcloud.json").read_text())
        env.update(AWS_ENDPOINT_URL=info["ec2_endpoint"], AWS_ACCESS_KEY_ID="testing",
                   AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION=info["region"])
        yield env
    finally:
        down = spotrun("localcloud", "down", cwd=work, env=env)
        assert down.returncode == 0, down.stdout + down.stderr


def client(env: dict, service: str = "ec2"):
    import boto3

    return boto3.client(service, endpoint_url=env["AWS_ENDPOINT_URL"],
                        region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def events(work: Path, env: dict) -> list[dict]:
    """The cloud's own event record (`spotrun localcloud events`)."""
    return [json.loads(line) for line in spotrun("localcloud", "events", cwd=work, env=env)
            .stdout.splitlines()]

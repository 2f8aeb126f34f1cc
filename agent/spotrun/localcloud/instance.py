"""One emulated instance: its identity in moto, its metadata server, its private dirs."""
from __future__ import annotations

import base64
import hashlib
import os
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

# Never let a process "on" a local instance reach real AWS or a real proxy.
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                    "all_proxy")
_AWS_VARIABLES = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                  "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ROLE_ARN",
                  "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                  "AWS_CONTAINER_CREDENTIALS_FULL_URI")
# The operator's and the tests' own credentials; instances get their own access key id.
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def access_key_for(instance_id: str) -> str:
    """The access key id of an instance's processes, shaped like an instance profile's
    temporary key (ASIA + 16 base32 characters), so the cloud's ledger can name the caller.
    moto does not check signatures and the proxy sets the account, so any key works."""
    digest = base64.b32encode(hashlib.sha256(instance_id.encode()).digest()).decode()
    return "ASIA" + digest[:16]


@dataclass
class Instance:
    instance_id: str
    az: str
    az_id: str
    instance_type: str
    region: str
    account_id: str
    ami_id: str
    private_ip: str
    tags: dict[str, str]
    user_data: bytes
    root: Path
    ec2_endpoint: str
    metadata: Any = None  # spotrun.localcloud.imds.MetadataServer, once started
    state: str = "running"  # running | stopped | terminated
    processes: list[subprocess.Popen] = field(default_factory=list)
    power_lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    access_key_id: str = ""

    def __post_init__(self) -> None:
        self.access_key_id = self.access_key_id or access_key_for(self.instance_id)

    @property
    def device_dir(self) -> Path:
        """Where ``nvme-Amazon_Elastic_Block_Store_vol...`` links appear (/dev/disk/by-id)."""
        return self.root / "dev" / "disk" / "by-id"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def mount_point(self) -> Path:
        return self.root / "dltraining"

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    @property
    def imds_endpoint(self) -> str:
        return self.metadata.endpoint if self.metadata is not None else ""

    def make_dirs(self) -> None:
        for directory in (self.device_dir, self.state_dir, self.mount_point, self.workspace):
            directory.mkdir(parents=True, exist_ok=True)

    def agent_overrides(self) -> dict[str, dict[str, Any]]:
        """The config mapping (spotrun.config sections) an agent on this instance needs."""
        return {
            "metadata": {"endpoint": self.imds_endpoint},
            "aws": {"endpoint_url": self.ec2_endpoint, "region": self.region},
            "volume": {"device_dir": str(self.device_dir), "mount_point": str(self.mount_point)},
            "agent": {"state_dir": str(self.state_dir)},
            "code": {"workspace": str(self.workspace)},
        }

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a process on this instance: its own dummy credentials, the region,
        every AWS SDK call pointed at the local cloud, no proxies, no real instance metadata."""
        env = dict(os.environ if base is None else base)
        for name in _PROXY_VARIABLES + _AWS_VARIABLES:
            env.pop(name, None)
        env.update(DUMMY_CREDENTIALS)
        env["AWS_ACCESS_KEY_ID"] = self.access_key_id
        env.update({
            "AWS_DEFAULT_REGION": self.region, "AWS_REGION": self.region,
            # botocore >= 1.31 sends every client here unless told otherwise: a safety net.
            "AWS_ENDPOINT_URL": self.ec2_endpoint,
            # Credentials come from the environment, never from a real metadata service.
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            "SPOTRUN_LOCALCLOUD_INSTANCE_ID": self.instance_id,
        })
        return env

    def start_process(self, argv: list[str], env: dict[str, str] | None = None,
                      **popen: Any) -> subprocess.Popen:
        popen.setdefault("cwd", str(self.root))
        proc = subprocess.Popen(argv, env=self.env() if env is None else env,
                                start_new_session=True, **popen)
        self.processes.append(proc)
        return proc

    def kill_processes(self) -> list[int]:
        """SIGKILL every process tree started on this instance (what power-off does)."""
        killed = []
        for proc in self.processes:
            victims = []
            try:
                parent = psutil.Process(proc.pid)
                victims = parent.children(recursive=True) + [parent]
            except psutil.NoSuchProcess:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the session's group, reparented ones too
            except (ProcessLookupError, PermissionError):
                pass
            for victim in victims:
                try:
                    victim.kill()
                    killed.append(victim.pid)
                except psutil.NoSuchProcess:
                    pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        return killed

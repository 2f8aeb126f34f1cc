"""The local spot cloud for the volume acceptance tests (C2): a started LocalCloud that is
always stopped (and leaves no loop device or mount), and a way to run the c2_agent helper
as a real process on one of its instances, with every AWS call it makes recorded."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "localcloud"))

from localcloud_helpers import loop_devices_backed_by, mounts_under, wait_until  # noqa: E402

from spotrun import iam  # noqa: E402
from spotrun import tags as T  # noqa: E402
from spotrun.localcloud import LocalCloud, TimingModel  # noqa: E402
from spotrun.localcloud.faultagent import RECORD_CALLS_ENV  # noqa: E402

JOB = "job-accept"
NAME = "DL-datasets-checkpoints"
USER = "nobody"
AGENT = HERE / "c2_agent.py"


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict:
        for line in self.stdout.splitlines():
            if line.startswith('{"result"'):
                return json.loads(line)["result"]
        raise AssertionError(f"no result (rc {self.rc}): {self.stderr[-3000:]}")

    def events(self) -> list[str]:
        names = []
        for line in self.stderr.splitlines():
            if line.startswith("<") and ">{" in line:
                try:
                    names.append(json.loads(line[line.index(">") + 1:])["event"])
                except (ValueError, KeyError):
                    pass
        return names


class World:
    def __init__(self, cloud: LocalCloud, tmp_path: Path):
        self.cloud = cloud
        self.tmp = tmp_path
        self.checker = cloud.client("ec2", faults=False)
        self.calls = tmp_path / "aws-calls.jsonl"
        self.runs = 0

    def config(self, inst, **sections) -> dict:
        mapping = copy.deepcopy(inst.agent_overrides())
        defaults = {
            "job": {"id": JOB},
            "trainer": {"user": USER},
            "metadata": {"deadline_s": 10.0},
            "aws": {"retry_mode": "standard", "max_attempts": 10},
            "volume": {"size_gib": 1, "snapshot_retention_days": 0.0, "device_timeout_s": 20.0,
                       "attach_timeout_s": 30.0, "create_timeout_s": 60.0,
                       "snapshot_timeout_s": 60.0},
        }
        for extra in (defaults, sections):
            for section, values in extra.items():
                mapping.setdefault(section, {}).update(values)
        return mapping

    def start(self, inst, *args: str, config: dict | None = None, env: dict | None = None):
        self.runs += 1
        path = self.tmp / f"agent-{self.runs}.json"
        path.write_text(json.dumps(config or self.config(inst)))
        out = open(self.tmp / f"agent-{self.runs}.out", "w+")
        err = open(self.tmp / f"agent-{self.runs}.err", "w+")
        proc_env = inst.env()
        proc_env[RECORD_CALLS_ENV] = str(self.calls)
        proc_env.update(env or {})
        proc = self.cloud.start_process(inst, [sys.executable, str(AGENT), str(path), *args],
                                        env=proc_env, stdout=out, stderr=err)
        proc.c2_files = (out, err)
        return proc

    @staticmethod
    def finish(proc, timeout: float = 180) -> Run:
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(30)
        out, err = proc.c2_files
        texts = []
        for handle in (out, err):
            handle.flush()
            handle.seek(0)
            texts.append(handle.read())
            handle.close()
        return Run(rc, *texts)

    def run(self, inst, *args: str, **kw) -> Run:
        return self.finish(self.start(inst, *args, **kw))

    @staticmethod
    def log_text(proc) -> str:
        err = proc.c2_files[1]
        err.flush()
        return Path(err.name).read_text()

    # -- what EC2 says ---------------------------------------------------------------------
    def job_volumes(self) -> list[dict]:
        found = self.checker.describe_volumes(Filters=T.job_filters(JOB))["Volumes"]
        return [v for v in found if v["State"] not in ("deleting", "deleted")]

    def job_snapshots(self) -> list[dict]:
        return self.checker.describe_snapshots(OwnerIds=["self"], Filters=T.job_filters(JOB))["Snapshots"]

    def assert_calls_listed(self) -> None:
        made = {json.loads(line)["action"] for line in self.calls.read_text().splitlines() if line}
        listed = {a.lower() for a, _ in iam.AGENT_CALLS}
        assert made, "no AWS call recorded"
        assert sorted(a for a in made if a.lower() not in listed) == [], "calls not in iam.AGENT_CALLS"


@pytest.fixture
def world(tmp_path):
    cloud = LocalCloud(root=tmp_path / "cloud", timing=TimingModel.fast())
    try:
        cloud.start()
        if not cloud.uses_loop_devices:
            pytest.skip("loop devices unavailable: the volume acceptance tests need real ones")
        yield World(cloud, tmp_path)
    finally:
        cloud.stop()
        # The cloud releases its devices as it stops; the kernel lets a lazily unmounted ext4
        # go once its journal is written back: seconds on a loaded machine (10 s was once not
        # enough in a CI dry run beside a soak and two rehearsals).
        left = []
        try:
            wait_until(lambda: not (loop_devices_backed_by(tmp_path) or mounts_under(tmp_path)),
                       timeout=30, what="loop devices and mounts to be released")
        except AssertionError:
            left = loop_devices_backed_by(tmp_path) + mounts_under(tmp_path)
        assert left == [], "loop devices or mounts left behind"


__all__ = ["world", "World", "Run", "JOB", "NAME", "USER", "wait_until"]

"""`spotrun rehearse`: a whole spot job on the local spot cloud, with the real agent.

A Spot Fleet (capacity 1, maintain) boots instances whose "AMI" runs `spotrun agent run`; the
agent finds (or creates) the job's volume, checks out the training code from a git repository,
and trains. The rehearsal sends spot notices at chosen training steps; the fleet replaces each
terminated instance in another AZ, the agent migrates the volume there and resumes; when
training finishes the agent cancels the fleet. The report is built from what the agents
logged (their JSON events) and what the cloud holds at the end.

It is `make demo`, the end-to-end tests' harness, and a way for users to rehearse their own
script's interruption handling (`--repository`, `--command`) before paying for GPUs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from spotrun.errors import SpotrunError, UsageError
from spotrun.log import get_logger
from spotrun.rehearsal_report import InterruptionRecord, build_report, format_report, read_events

log = get_logger("rehearsal")

DEMO_TRAIN_PY = '''\
"""Rehearsal training code: spotrun's reference trainer (tiny model) on a small synthetic
CIFAR10-format data set, generated onto the volume on first run (labelled as synthetic)."""
import os
import subprocess
import sys
from pathlib import Path

data = Path(os.environ["SPOTRUN_DATA_DIR"])
if not (data / "cifar-10-batches-py" / "test_batch").exists():
    subprocess.run([sys.executable, "-m", "spotrun_trainer.datasets", "synth", "--dest", str(data),
                    "--train", os.environ.get("DEMO_TRAIN", "2048"),
                    "--test", os.environ.get("DEMO_TEST", "512"), "--seed", "7"], check=True)
args = [sys.executable, "-m", "spotrun_trainer.resnet_cifar", "--model", "tiny",
        "--epochs", os.environ.get("DEMO_EPOCHS", "3"),
        "--batch-size", os.environ.get("DEMO_BATCH", "32")] + sys.argv[1:]
os.execv(sys.executable, args)  # the trainer takes this process's place: signals reach it
'''


@dataclass
class RehearsalPlan:
    out: Path
    job_id: str = "rehearsal"
    repository: str = ""  # "" = a generated repository with the reference trainer
    ref: str = "main"
    command: list[str] = field(default_factory=lambda: [sys.executable, "train.py"])
    trainer_env: dict[str, str] = field(default_factory=dict)
    trainer_user: str = "nobody"  # "" = nobody where it can reach the work, else root (said so)
    interrupt_at_steps: list[int] = field(default_factory=lambda: [40])
    notice_s: float = 20.0  # the two-minute notice, scaled down so the demo is quick
    az_policy: str = "round-robin"
    timeout_s: float = 900.0
    lease_table: str = ""
    # Extra agent config per section (e.g. {"trainer": {"max_restarts": 1}}), over the defaults here.
    agent_config: dict = field(default_factory=dict)


def commit_repository(path: Path, files: dict[str, str | Path], message: str) -> str:
    """A one-commit git repository (branch main) at ``path`` holding ``files`` (name -> text,
    or a file to copy); returns its file:// URL, as the agent's `code.repository` takes it."""
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = path / name
        if isinstance(content, Path):
            shutil.copy(content, target)
        else:
            target.write_text(content)
    git = ["git", "-c", "user.name=spotrun", "-c", "user.email=spotrun@localhost", "-C", str(path)]
    subprocess.run(git + ["init", "-q", "-b", "main"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", message], check=True)
    return f"file://{path}"


def make_demo_repository(path: Path) -> str:
    """A git repository holding the rehearsal's training code; returns its file:// URL."""
    return commit_repository(path, {"train.py": DEMO_TRAIN_PY}, "rehearsal training code")


class Rehearsal:
    def __init__(self, plan: RehearsalPlan, cloud=None, narrate=None):
        self.plan = plan
        self.say = narrate or (lambda message: None)
        self.out = Path(plan.out).absolute()
        self._own_cloud = cloud is None
        self.cloud = cloud
        self.fleet = None
        self.interruptions: list[InterruptionRecord] = []
        self.boots: list[dict] = []
        self._lock = threading.Lock()

    # -- set-up -----------------------------------------------------------------------------

    def _agent_config(self, inst) -> dict:
        overrides = inst.agent_overrides()
        overrides["metadata"]["poll_interval_s"] = 0.5
        overrides["volume"]["size_gib"] = 1
        overrides["volume"]["create_timeout_s"] = 120.0
        overrides["trainer"] = {"user": self.plan.trainer_user, "drain_reserve_s": 5.0,
                                "restart_backoff_s": 1.0}
        if self.plan.lease_table:
            overrides["aws"]["lease_table"] = self.plan.lease_table
        for section, values in self.plan.agent_config.items():
            overrides.setdefault(section, {}).update(values)
        return overrides

    def _job_overrides(self) -> dict:
        plan = self.plan
        return {"job": {"id": plan.job_id},
                "code": {"repository": plan.repository, "ref": plan.ref},
                "trainer": {"command": list(plan.command), "env": dict(plan.trainer_env)}}

    def boot(self, cloud, inst) -> subprocess.Popen:
        """What the AMI does at boot: systemd starts `spotrun agent run` (here, a process)."""
        import tomli_w

        config_path = inst.root / "agent.toml"
        config_path.write_text(tomli_w.dumps(self._agent_config(inst)))
        log_file = open(inst.root / "agent.log", "ab")
        argv = [sys.executable, "-m", "spotrun", "agent", "run", "--config", str(config_path)]
        boot = {"instance_id": inst.instance_id, "az": inst.az, "boot_wall": time.time(),
                "log": str(inst.root / "agent.log")}
        log.info("instance_booting", instance_id=inst.instance_id, az=inst.az)
        self.say(f"instance {inst.instance_id} boots in {inst.az}: the agent starts")
        boot["process"] = cloud.start_process(inst, argv, stdout=log_file, stderr=subprocess.STDOUT)
        with self._lock:
            self.boots.append(boot)
        return boot["process"]

    def start(self) -> None:
        from spotrun import userdata
        from spotrun.localcloud import LocalCloud, TimingModel
        from spotrun.localcloud.fleet import LaunchSpec

        self.out.mkdir(parents=True, exist_ok=True)
        needed = [self.out, Path(sys.executable).parent]
        if not self.plan.trainer_user:
            try:
                _check_reachable("nobody", needed)
                self.plan.trainer_user = "nobody"
            except SpotrunError as exc:
                self.plan.trainer_user = "root"
                self.say(f"the trainer runs as root here: {exc} (on AWS it runs as trainer.user)")
        _check_reachable(self.plan.trainer_user, needed)
        if not self.plan.repository:
            self.plan.repository = make_demo_repository(self.out / "repo")
        if self.cloud is None:
            self.say(f"starting the local spot cloud under {self.out / 'cloud'}")
            self.cloud = LocalCloud(self.out / "cloud", TimingModel.fast()).start()
        self.say(f"requesting a Spot Fleet: capacity 1, maintain, replacements {self.plan.az_policy}")
        launch = LaunchSpec(instance_type="p3.2xlarge",
                            user_data=userdata.render(self._job_overrides()))
        request_id = self.cloud.request_spot_fleet(1, launch=launch, az_policy=self.plan.az_policy,
                                                   boot=self.boot)
        self.fleet = self.cloud.fleets[request_id]
        log.info("fleet_requested", fleet=request_id, az_policy=self.plan.az_policy)

    def stop(self) -> None:
        if self.cloud is not None and self._own_cloud:
            self.cloud.stop()

    # -- watching -------------------------------------------------------------------------

    def current_instance(self):
        members = self.fleet.live_members() if self.fleet else []
        return self.cloud.instance(members[-1].instance_id) if members else None

    @staticmethod
    def progress_of(inst) -> dict:
        path = inst.mount_point / "checkpoints" / ".spotrun-progress.json"
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _await(self, what: str, condition, deadline: float, interval: float = 0.1):
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(interval)  # watching another process's files: nothing to wait on
        raise TimeoutError(f"rehearsal: timed out waiting for {what}")

    def run(self) -> dict:
        plan = self.plan
        deadline = time.monotonic() + plan.timeout_s
        self.start()
        try:
            for target in plan.interrupt_at_steps:
                def reached():
                    if self._fleet_cancelled():
                        raise RuntimeError(f"the fleet was cancelled before training step {target}; "
                                           f"see the agent and trainer logs under {self.out}")
                    inst = self.current_instance()
                    if inst is None:
                        return None
                    step = self.progress_of(inst).get("global_step")
                    return (inst, step) if isinstance(step, int) and step >= target else None

                inst, step = self._await(f"training step {target}", reached, deadline)
                record = InterruptionRecord(inst.instance_id, inst.az, step, time.time())
                self.cloud.interrupt(inst.instance_id, "terminate", in_seconds=plan.notice_s)
                self.interruptions.append(record)
                log.info("notice_sent", instance_id=inst.instance_id, at_step=step)
                self.say(f"spot interruption notice to {inst.instance_id} at training step {step} "
                         f"(termination in {plan.notice_s:g} s)")
                released = self._await(f"{inst.instance_id} to drain",
                                       lambda: self._drained_event(inst.instance_id), deadline)
                self.say(f"{inst.instance_id} drained in {released.get('drain_s')} s: checkpoint "
                         f"durable, volume unmounted, snapshotted ahead of need and released")
            self.say("training resumes on the replacement; waiting for completion")
            self._await("the fleet to be cancelled", lambda: self._fleet_cancelled(), deadline)
            self.say("training complete: the agent recorded it on the volume and cancelled the fleet")
            return self.report()
        finally:
            self.stop()

    def _agent_events(self, instance_id: str) -> list[dict]:
        for boot in self.boots:
            if boot["instance_id"] == instance_id:
                return read_events(Path(boot["log"]))
        return []

    def await_agent_event(self, instance_id: str, event: str, timeout: float = 60.0, **match) -> dict:
        """The first event named ``event`` (with fields equal to ``match``) in an agent's log."""
        def found():
            for item in self._agent_events(instance_id):
                if item.get("event") == event and all(item.get(k) == v for k, v in match.items()):
                    return item
            return None

        return self._await(f"{event} {match or ''} from {instance_id}", found, time.monotonic() + timeout)

    def _drained_event(self, instance_id: str) -> dict | None:
        for event in self._agent_events(instance_id):
            if event.get("event") == "phase_changed" and event.get("phase") == "released":
                return event
        return None

    def _fleet_cancelled(self) -> bool:
        return self.fleet.state.startswith("cancelled")

    # -- the report -----------------------------------------------------------------------

    def report(self) -> dict:
        return build_report(self)


def _check_reachable(user: str, paths: list[Path]) -> None:
    """The trainer runs as ``user``: it must be able to traverse to the work and interpreter."""
    import pwd
    import stat

    if user == "root" or os.geteuid() != 0:
        return
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"--trainer-user: no such user {user!r}") from None
    for path in paths:
        for directory in [path, *path.parents]:
            if directory != Path("/") and not directory.stat().st_mode & stat.S_IXOTH:
                raise UsageError(
                    f"the trainer runs as {user!r}, who cannot enter {directory} (mode "
                    f"{stat.filemode(directory.stat().st_mode)}): choose --out elsewhere, "
                    f"allow it (chmod o+x {directory}), or use --trainer-user root")


def cmd_rehearse(args) -> int:
    from spotrun import log as logmod

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logmod.configure(stream=open(out / "rehearsal.log", "w"))
    narrate = None if args.quiet else (lambda message: print(f"rehearse: {message}", file=sys.stderr,
                                                              flush=True))
    plan = RehearsalPlan(out=Path(args.out), job_id=args.job, repository=args.repository or "",
                         ref=args.ref, interrupt_at_steps=args.interrupt_at_step or [40],
                         notice_s=args.notice_seconds, az_policy=args.az_policy,
                         timeout_s=args.timeout, trainer_user=args.trainer_user)
    if args.command:
        plan.command = args.command
    report = Rehearsal(plan, narrate=narrate).run()
    (out / "report.json").write_text(json.dumps(report, indent=2))
    table = format_report(report)
    (out / "report.txt").write_text(table + "\n")
    print(table)
    ok = (report["fleet_state"] == "cancelled" and report["completed"]
          and len(report["volumes_left"]) == 1)
    return 0 if ok else 1


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "rehearse", help="run a whole spot job on the local spot cloud (the demo)",
        description="Train on the local spot cloud with the real agent: notices at chosen steps, "
                    "replacement in another AZ, migration, resume, completion, fleet cancelled.")
    parser.add_argument("--out", default="demo-out", help="working directory and report location")
    parser.add_argument("--job", default="rehearsal", help="job id")
    parser.add_argument("--repository", help="your training code (git URL or file://); default: "
                                             "the reference trainer on synthetic data")
    parser.add_argument("--ref", default="main", help="git ref to run")
    parser.add_argument("--command", nargs="+", help="trainer command (default: python train.py)")
    parser.add_argument("--interrupt-at-step", type=int, action="append",
                        help="send a spot notice when training reaches this global step (repeatable)")
    parser.add_argument("--notice-seconds", type=float, default=20.0,
                        help="time from notice to termination (AWS: 120; scaled down by default)")
    parser.add_argument("--az-policy", default="round-robin",
                        help="where replacements launch: random, round-robin, fixed:<az>")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    parser.add_argument("--trainer-user", default="",
                        help="user the trainer runs as (default: nobody, or root where nobody cannot "
                             "reach the work directory or the interpreter; on AWS: trainer.user)")
    parser.add_argument("--quiet", action="store_true", help="only the report")
    parser.set_defaults(func=cmd_rehearse)

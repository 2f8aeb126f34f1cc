"""The sweep figure (issue 19): N experiments on a fleet of capacity C, the same interruption
schedule, claimed zone-first (spotrun's default) vs in sweep order, each run on the local spot
cloud with real agents driven through the operator CLI, as `make demo-sweep` is.

Replacements land in random zones (`localcloud up --member-zones random:<seed>`, the same seed
for both policies). Every figure comes from the cloud's ledger of calls, none from the agents:
- cross-AZ migrations: volumes the agents created beyond one per experiment (a migration makes
  the experiment's volume again from a snapshot, in the claiming instance's zone);
- makespan: from the operator's CreateFleet to the agent's DeleteFleets;
- goodput: the training the sweep needed (Σ steps × step time) over the instance time paid
  for, each instance's from its first call to its last (the agent calls EC2 from boot on and
  until it is gone: a close lower bound of its lifetime).
The run fails (and says why) unless every experiment finished with its own right sum.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from spotrun import tags
from spotrun.localcloud.ledger import calls, performed, read_ledger
from spotrun.harness.rehearsal import commit_repository
from spotrun.harness.soaksweep import check_experiments, fleet_violations

COUNTING_TRAINER = Path(__file__).resolve().parents[1] / "agent" / "spotrun" / "harness" / "soak_trainer.py"
STEP_S = 0.05
JOB = """\
[job]
id = "bench-sweep"

[code]
repository = "{repository}"

[trainer]
command = ["{python}", "train.py"]
env = {{ STEP_S = "{step_s}", CKPT_EVERY = "20", STEPS = "{steps}" }}

[agent]
progress_tag_interval_s = 1.0
metrics_interval_s = 0.0

[launch]
fleet = "ec2-fleet"
target_capacity = {capacity}
image_id = "ami-0123456789abcdef0"
instance_types = ["p3.2xlarge"]
availability_zones = ["us-east-1a", "us-east-1b"]

[sweep]
claim = "{policy}"
{experiments}
"""


class SweepRunFailed(Exception):
    pass


def run(workdir: Path, policy: str, *, experiments: int = 6, capacity: int = 3, steps: int = 200,
        interrupt_after_s: tuple[float, ...] = (6.0, 14.0), seed: str = "7",
        timeout_s: float = 600.0) -> dict:
    root, work = workdir / "cloud", workdir / "work"
    work.mkdir(parents=True, exist_ok=True)
    repository = commit_repository(workdir / "repo", {"train.py": COUNTING_TRAINER}, "counting trainer")
    names = [f"e{n}" for n in range(experiments)]
    (work / "spotrun.toml").write_text(JOB.format(
        repository=repository, python=sys.executable, step_s=STEP_S, steps=steps,
        capacity=capacity, policy=policy,
        experiments="".join(f'\n[[sweep.experiments]]\nname = "{n}"\n' for n in names)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["SPOTRUN_LOCALCLOUD_ROOT"] = str(root)

    def spotrun(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "spotrun", *argv], cwd=work, env=env,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise SweepRunFailed(f"spotrun {' '.join(argv)}: exit {done.returncode}: "
                                 f"{(done.stderr or done.stdout)[-1000:]}")
        return done

    spotrun("localcloud", "up", "--run-agents", "--detach", "--member-zones", f"random:{seed}")
    try:
        info = json.loads((root / "localcloud.json").read_text())
        env.update(AWS_ENDPOINT_URL=info["ec2_endpoint"], AWS_ACCESS_KEY_ID="testing",
                   AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION=info["region"])
        spotrun("init")
        spotrun("launch")
        started = time.monotonic()
        interrupted = []
        for after in interrupt_after_s:  # the same schedule for every policy
            time.sleep(max(0.0, started + after - time.monotonic()))
            victim = _busiest_instance(env, [f"bench-sweep-{n}" for n in names])
            if victim:
                spotrun("localcloud", "interrupt", victim, "--in", "5")
                interrupted.append(victim)
        spotrun("status", "--watch", "--interval", "2", timeout=timeout_s)
        return _measure(root, env, names, steps, capacity, policy, interrupted)
    finally:
        subprocess.run([sys.executable, "-m", "spotrun", "localcloud", "down"], cwd=work, env=env,
                       capture_output=True, timeout=120)


def _ec2(env: dict):
    import boto3

    return boto3.client("ec2", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _busiest_instance(env: dict, jobs: list[str]) -> str | None:
    """The instance holding the first experiment (in the sweep's order) that is attached now."""
    ec2 = _ec2(env)
    for job in jobs:
        for volume in ec2.describe_volumes(Filters=tags.job_filters(job))["Volumes"]:
            for attachment in volume.get("Attachments", []):
                if attachment.get("State") == "attached":
                    return attachment["InstanceId"]
    return None


def _measure(root: Path, env: dict, names: list[str], steps: int, capacity: int, policy: str,
             interrupted: list[str]) -> dict:
    deadline = time.monotonic() + 60
    while True:
        ledger = read_ledger(root / "ledger.jsonl")
        deletes = [r for r in calls(ledger, action="DeleteFleets") if performed(r) and r["instance"]]
        if deletes or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not deletes:
        raise SweepRunFailed("no agent deleted the fleet")
    [create] = [r for r in calls(ledger, action="CreateFleet") if performed(r)]
    # The sweep's invariants as the soak and the e2e test judge them (spotrun.harness.soaksweep): one
    # volume per experiment, its own exact sum on it, the claim protocol, one fleet delete.
    jobs = {f"bench-sweep-{name}": steps for name in names}
    _, broken = check_experiments(ledger, _ec2(env), lambda volume_id: root / "ebs" / "volumes" /
                                  f"{volume_id}.img", jobs, wait_s=30)
    broken += fleet_violations(ledger, jobs, "bench-sweep", fleets=create["created"][:1])
    if broken:
        raise SweepRunFailed("; ".join(broken[:5]))
    created = [r for r in calls(ledger, action="CreateVolume") if performed(r) and r["instance"]]
    spans: dict[str, list[float]] = {}
    for record in ledger:
        if record.get("instance"):
            spans.setdefault(record["instance"], []).append(record["t"])
    paid = sum(max(ts) - min(ts) for ts in spans.values())
    needed = len(names) * steps * STEP_S
    return {"policy": policy, "experiments": len(names), "capacity": capacity, "steps": steps,
            "interruptions": len(interrupted), "instances": len(spans),
            "migrations": len(created) - len(names),
            "makespan_s": round(deletes[0]["t"] - create["t"], 1),
            "goodput": round(needed / paid, 3) if paid else None,
            "instance_seconds": round(paid, 1)}


if __name__ == "__main__":  # one policy by hand: python -m bench.sweep_runs zone-first /tmp/x
    print(json.dumps(run(Path(sys.argv[2]), sys.argv[1]), indent=2))

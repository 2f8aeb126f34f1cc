"""`make demo-sweep`: a sweep of four experiments on two instances, on the local spot cloud.

What an operator types (docs/operator.md, "Many experiments on one fleet"), each the real CLI
in its own process: `spotrun localcloud up --run-agents`, a dataset volume prepared once
(`datasets/` on ext4: docs/sweeps.md, "Data once") and named as `sweep.dataset_volume`, `init`
(which snapshots it once), `launch`, one spot interruption while the experiments train,
`status --watch` until the sweep ends, and `status --plot` for the learning curves. The report
is judged from what the agents cannot write: the cloud's ledger of calls and the bytes on the
volume images. Exit 1, naming every check that failed, unless every experiment finished with
the sum its own steps make (no step lost or trained twice, across the interruption), each on
exactly one volume, the interrupted experiment resumed by another instance, the fleet
cancelled exactly once by an instance, the dataset snapshotted exactly once and each
experiment's first volume made from that snapshot, holding the prepared bytes, and the figure
drew one curve per experiment.

    python examples/sweep/demo_sweep.py [--out demo-sweep-out] [--no-interrupt] [--no-dataset]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from spotrun import tags
from spotrun.localcloud.ledger import calls, performed, read_ledger
from spotrun.harness.rehearsal import commit_repository
# The checks the soak's sweep kinds and the sweep e2e test judge by too (issue 19).
from spotrun.harness.soaksweep import (check_experiments, dataset_violations, fleet_violations,
                                       prepare_dataset_volume)

COUNTING_TRAINER = Path(__file__).resolve().parents[2] / "agent" / "spotrun" / "harness" / "soak_trainer.py"
STEPS = {"lr0.1": 240, "lr0.03": 200, "lr0.01": 160, "lr0.003": 120}
JOB_TOML = """\
[job]
id = "demo-sweep"

[code]
repository = "{repository}"

[trainer]
command = ["{python}", "train.py"]
env = {{ STEP_S = "0.05", CKPT_EVERY = "20" }}

[agent]
progress_tag_interval_s = 1.0
metrics_interval_s = 1.0

[launch]
fleet = "ec2-fleet"
target_capacity = 2
image_id = "ami-0123456789abcdef0"
instance_types = ["p3.2xlarge"]
availability_zones = ["us-east-1a", "us-east-1b"]
{dataset}{experiments}
"""


class DemoFailed(Exception):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise DemoFailed(what)


class Cli:
    def __init__(self, work: Path, env: dict):
        self.work, self.env = work, env

    def __call__(self, *argv: str, timeout: float = 120, ok: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "spotrun", *argv], cwd=self.work,
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        if ok and done.returncode != 0:
            raise DemoFailed(f"`spotrun {' '.join(argv)}` exited {done.returncode}: "
                             f"{(done.stderr or done.stdout)[-1500:]}")
        return done


def wait_for(what: str, probe, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(interval)
    raise DemoFailed(f"timed out after {timeout:.0f} s waiting for {what}")


def dataset_files() -> dict[str, bytes]:
    """What the user prepares once: random bytes (no accident matches them) and a manifest."""
    data = os.urandom(256 * 1024)
    manifest = {"files": {"train.bin": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}
    return {"datasets/train.bin": data,
            "datasets/manifest.json": (json.dumps(manifest, indent=2) + "\n").encode()}


def volume_image(root: Path, volume_id: str) -> Path:
    """A volume's image in the local cloud (a directory when it runs without loop devices)."""
    image = root / "ebs" / "volumes" / f"{volume_id}.img"
    plain = image.with_suffix("")
    return plain if not image.exists() and plain.exists() else image


def run(out: Path, interrupt: bool = True, dataset: bool = True) -> dict:
    if out.exists():
        print(f"removing the previous run's state in {out}", file=sys.stderr)
        shutil.rmtree(out)
    root, work = out / "cloud", out / "work"
    work.mkdir(parents=True)
    repository = commit_repository(out / "repo", {"train.py": COUNTING_TRAINER}, "counting trainer")
    experiments = "".join(
        f'\n[[sweep.experiments]]\nname = "{name}"\nargs = ["--lr", "{name[2:]}"]\n'
        f'env = {{ STEPS = "{steps}" }}\n' for name, steps in STEPS.items())
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["SPOTRUN_LOCALCLOUD_ROOT"] = str(root)
    spotrun = Cli(work, env)
    # Replacements land in random zones of the fleet's, as on EC2: claims are zone-first.
    spotrun("localcloud", "up", "--run-agents", "--detach", "--member-zones", "random:1")
    try:
        info = json.loads((root / "localcloud.json").read_text())
        env.update(AWS_ENDPOINT_URL=info["ec2_endpoint"], AWS_ACCESS_KEY_ID="testing",
                   AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION=info["region"])
        _ENV.update(env)
        # The dataset, prepared once on a volume of the cloud's; `--no-dataset` prepares it but
        # does not name it: the experiments then start empty and the dataset check fails.
        files = dataset_files()
        volume_id = prepare_dataset_volume(_ec2(), lambda v: volume_image(root, v),
                                           "us-east-1a", files)
        print(f"dataset volume {volume_id}: " + ", ".join(
            f"{rel} ({len(data)} bytes)" for rel, data in files.items()))
        (work / "spotrun.toml").write_text(JOB_TOML.format(
            repository=repository, python=sys.executable, experiments=experiments,
            dataset=f'\n[sweep]\ndataset_volume = "{volume_id}"\n' if dataset else ""))
        return _journey(spotrun, root, out, interrupt,
                        {"volume": volume_id, "named": dataset, "files": files})
    finally:
        spotrun("localcloud", "down", ok=False)


def _journey(spotrun: Cli, root: Path, out: Path, interrupt: bool, dataset: dict) -> dict:
    print(spotrun("plan").stdout, end="")
    init = spotrun("init")
    print("".join(line for line in (init.stdout + init.stderr).splitlines(keepends=True)
                  if "dataset" in line), end="")
    spotrun("launch")

    def training_row():
        rows = json.loads(spotrun("status", "--json").stdout)["experiments"]
        return next((r for r in rows if r["phase"] == "training"
                     and 30 <= (r["progress"].get("global_step") or 0) <= STEPS[r["name"]] // 2),
                    None)

    row = wait_for("an experiment training (spotrun status)", training_row, 180)
    victim = _attached_instance(row["job"])
    if interrupt:
        print(f"interrupting {victim} while it trains {row['name']} "
              f"(step {row['progress'].get('global_step')})")
        spotrun("localcloud", "interrupt", victim, "--in", "5")

    watch = spotrun("status", "--watch", "--interval", "2", timeout=900, ok=False)
    check(watch.returncode == 0, f"the sweep did not end done: {watch.stderr[-1500:]}")
    plot_path = out / "curves.png"
    shown = json.loads(spotrun("status", "--json", "--plot", str(plot_path)).stdout)
    return _evidence(root, row, victim, shown, plot_path, dataset)


def _attached_instance(job_id: str) -> str:
    ec2 = _ec2()
    for volume in ec2.describe_volumes(Filters=tags.job_filters(job_id))["Volumes"]:
        for attachment in volume.get("Attachments", []):
            return attachment["InstanceId"]
    raise DemoFailed(f"no instance holds {job_id}'s volume")


_ENV: dict = {}  # the cloud's endpoint, once it is up


def _ec2():
    import boto3

    return boto3.client("ec2", endpoint_url=_ENV["AWS_ENDPOINT_URL"], region_name=_ENV["AWS_DEFAULT_REGION"],
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _evidence(root: Path, interrupted: dict, victim: str, shown: dict, plot_path: Path,
              dataset: dict) -> dict:
    deadline = time.monotonic() + 60
    while True:  # the last instance's DeleteFleets reaches the ledger just after the done tags
        ledger = read_ledger(root / "ledger.jsonl")
        deletes = [r for r in calls(ledger, action="DeleteFleets") if performed(r)]
        if deletes or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    jobs = {f"demo-sweep-{name}": steps for name, steps in STEPS.items()}
    # One volume each, finished with its own exact sum, the claim protocol kept (the ledger's
    # lease writes vs every change of an experiment's volumes), the fleet deleted once, by an
    # instance, after the last experiment finished.
    # Every check is judged and every one that failed is named.
    image_of = lambda volume_id: volume_image(root, volume_id)  # noqa: E731
    found, broken = check_experiments(ledger, _ec2(), image_of, jobs, wait_s=60)
    broken += fleet_violations(ledger, jobs, "demo-sweep")
    failed = ["; ".join(broken[:5])] if broken else []
    rows = [{"experiment": name, **row} for name, row in zip(STEPS, found)]
    resumed = next(r for r in rows if r["job"] == interrupted["job"])
    if not (len(resumed["instances"]) >= 2 and victim in resumed["instances"]):
        failed.append(f"{interrupted['job']} was not resumed by another instance: "
                      f"{resumed['instances']}")
    # Data once: one snapshot of the prepared volume (the ledger), each experiment's first
    # volume made from it, the prepared bytes on each experiment's volume image.
    data, unlike = dataset_violations(ledger, _ec2(), image_of,
                                      {row["job"]: row["volume"] for row in rows}, "demo-sweep",
                                      dataset["files"], dataset_volume=dataset["volume"])
    if unlike:
        failed.append(f"dataset check: {len(unlike)} violation(s): " + "; ".join(unlike[:3]))
    drawn = shown["plot"]["drawn"].get("loss", {})
    if len(drawn) != len(STEPS):
        failed.append(f"the figure has {len(drawn)} curves, not {len(STEPS)}")
    check(failed == [], " | ".join(failed))
    return {"experiments": rows, "interrupted": {"job": interrupted["job"], "instance": victim},
            "fleet_deleted_by": deletes[0]["instance"], "plot": str(plot_path),
            "curves": {label: len(points) for label, points in drawn.items()},
            "dataset": {"volume": dataset["volume"], "snapshot": data["snapshot"],
                        "made_from_it": data["made_from_it"],
                        "bytes_identical": data["bytes_identical"],
                        "files": {rel: len(b) for rel, b in dataset["files"].items()}}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-sweep-out"))
    parser.add_argument("--no-interrupt", action="store_true",
                        help="send no spot notice (the demo then fails: nothing was resumed)")
    parser.add_argument("--no-dataset", action="store_true",
                        help="prepare the dataset volume but leave sweep.dataset_volume out (the "
                             "demo then fails: the dataset check)")
    args = parser.parse_args(argv)
    try:
        report = run(args.out.resolve(), interrupt=not args.no_interrupt,
                     dataset=not args.no_dataset)
    except DemoFailed as exc:
        print(f"demo-sweep FAILED: {exc}", file=sys.stderr)
        return 1
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nspotrun demo-sweep: {len(report['experiments'])} experiments on 2 instances, done")
    for row in report["experiments"]:
        print(f"  {row['experiment']:8} {row['steps']:4} steps, sum right; volume {row['volume']}, "
              f"trained by {', '.join(row['instances'])}")
    print(f"  interrupted: {report['interrupted']['job']} on {report['interrupted']['instance']}, "
          "resumed by another instance")
    print(f"  fleet deleted once, by {report['fleet_deleted_by']}")
    data = report["dataset"]
    print(f"  dataset: one snapshot {data['snapshot']} of {data['volume']}, "
          f"{len(data['made_from_it'])} experiment volumes made from it, bytes identical "
          f"({', '.join(f'{rel} {size} B' for rel, size in data['files'].items())})")
    print(f"  learning curves: {report['plot']} ({len(report['curves'])} curves)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

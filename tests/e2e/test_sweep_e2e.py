"""A sweep on the local spot cloud, as an operator runs it (issue 19): three experiments on an
EC2 Fleet of capacity 2, with real agents.

`spotrun localcloud up --run-agents`, `spotrun init`, `spotrun launch`, `spotrun status
--watch` on the sweep's file until every experiment ends. Judged by what the cloud recorded
(its ledger of calls, its events, EC2's state) and the completion records on the volume
images -- never by the agents' logs: each experiment trained once, with its own settings, on
its own volume; one instance left the fleet when nothing was left for it (capacity lowered,
no replacement launched); one instance, the last, deleted the fleet.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from spotrun.localcloud.ledger import calls, performed, read_ledger
from spotrun.harness.rehearsal import commit_repository
# The sweep's checks, shared with the soak's sweep kinds and `make demo-sweep` (issue 19).
from spotrun.harness.soaksweep import check_experiments, fleet_violations
from spotrun.harness.sweepwitness import lease_history
from tests.helpers.operatorcloud import client, events, local_cloud, spotrun
from tests.helpers.testkit import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.loopdev]

COUNTING_TRAINER = Path(__file__).resolve().parents[2] / "agent" / "spotrun" / "harness" / "soak_trainer.py"
# Each experiment counts to its own number of steps: the completion record's sum says which
# settings the trainer that finished it really ran with.
STEPS = {"a": 40, "b": 60, "c": 200}
JOB_TOML = """\
[job]
id = "grid"

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
{experiments}
"""


@pytest.fixture
def sweep_cloud(tmp_path):
    root, work = tmp_path / "cloud", tmp_path / "work"
    work.mkdir()
    repository = commit_repository(tmp_path / "repo", {"train.py": COUNTING_TRAINER},
                                   "counting trainer")
    experiments = "".join(f'\n[[sweep.experiments]]\nname = "{name}"\nenv = {{ STEPS = "{steps}" }}\n'
                          for name, steps in STEPS.items())
    (work / "spotrun.toml").write_text(JOB_TOML.format(
        repository=repository, python=sys.executable, experiments=experiments))
    with local_cloud(root, work) as env:
        yield root, work, env


def test_three_experiments_on_two_instances_each_trained_once_then_one_cancel(sweep_cloud):
    root, work, env = sweep_cloud
    for command in ("init", "launch"):
        done = spotrun(command, cwd=work, env=env)
        assert done.returncode == 0, done.stdout + done.stderr

    watch = spotrun("status", "--watch", "--interval", "1", cwd=work, env=env, timeout=400)
    assert watch.returncode == 0, watch.stdout[-3000:] + watch.stderr[-3000:]

    # -- the cloud's own record ----------------------------------------------------------
    wait_until(lambda: any(performed(r) for r in calls(read_ledger(root / "ledger.jsonl"),
                                                       action="DeleteFleets")),
               60, "an agent's DeleteFleets in the cloud's ledger", interval=0.5)
    ledger = read_ledger(root / "ledger.jsonl")
    [create] = [r for r in calls(ledger, action="CreateFleet") if performed(r)]
    fleet_id = create["created"][0]
    deletes = [r for r in calls(ledger, action="DeleteFleets") if performed(r)]
    assert len({r["instance"] for r in deletes}) == 1 and deletes[0]["instance"], deletes
    assert all(fleet_id in r["resources"] for r in deletes)
    last = deletes[0]["instance"]
    # The other instance found nothing left to claim while the last experiment trained: it
    # lowered the fleet's capacity and ended itself; the fleet launched nobody in its place.
    modifies = [r for r in calls(ledger, action="ModifyFleet") if performed(r)]
    leavers = {r["instance"] for r in modifies}
    assert len(leavers) == 1 and last not in leavers and None not in leavers, modifies
    terminations = [r for r in calls(ledger, action="TerminateInstances") if performed(r)
                    and r["instance"] in leavers]
    assert terminations and all(r["resources"] == [r["instance"]] for r in terminations), terminations

    booted = [e["instance_id"] for e in events(work, env) if e["event"] == "instance_agent_booted"]
    assert sorted(booted) == sorted({last, *leavers}), booted  # two instances, no third

    # -- the bytes on the volumes: one volume per experiment, each trained to its own end,
    # the claim protocol kept (lease writes vs volume changes), one DeleteFleets after the
    # last experiment finished (spotrun.harness.soaksweep) --------------------------------------------
    ec2 = client(env)
    jobs = {f"grid-{name}": steps for name, steps in STEPS.items()}
    ledger = read_ledger(root / "ledger.jsonl")
    rows, broken = check_experiments(ledger, ec2, lambda volume_id: root / "ebs" / "volumes" /
                                     f"{volume_id}.img", jobs, wait_s=60)
    broken += fleet_violations(ledger, jobs, "grid", fleets=[fleet_id])
    assert broken == [], broken
    for row in rows:
        attaches = [r for r in calls(ledger, action="AttachVolume") if performed(r)
                    and row["volume"] in r["resources"]]
        assert len(attaches) == 1, (row["job"], attaches)  # trained by one instance, once

    [fleet] = ec2.describe_fleets(FleetIds=[fleet_id])["Fleets"]
    assert fleet["FleetState"].startswith("deleted"), fleet

    for job_id, writes in lease_history(ledger, jobs).items():
        # taken once (later writes by the holder: draining, release), then finished
        takes = [w for n, w in enumerate(writes)
                 if w["holder"] and (n == 0 or writes[n - 1]["holder"] != w["holder"])]
        assert len(takes) == 1 and writes[-1]["finished"], (job_id, writes)

    # -- the learning curves: published by each experiment's agent, drawn on one figure -----
    plot = tmp_path_of(work) / "curves.png"
    shown = spotrun("status", "--json", "--plot", str(plot), cwd=work, env=env)
    assert shown.returncode == 0, shown.stdout[-2000:] + shown.stderr[-2000:]
    drawn = json.loads(shown.stdout)["plot"]["drawn"]["loss"]
    # one line per experiment, labelled by its name and what it sets
    assert sorted(drawn) == [f"{name} (STEPS={steps})" for name, steps in STEPS.items()], drawn
    for label, points in drawn.items():
        steps = [int(x) for x, _ in points]
        # the last point is the trainer's last step, published as the experiment finished
        assert steps == sorted(set(steps)) and steps[-1] == STEPS[label[0]], points
        # the counting trainer's made-up loss, 1/(1+step): each value is at its own step
        assert all(abs(y - 1.0 / (1.0 + x)) < 1e-9 for x, y in points), points
    # The longest (10 s) trained through at least one 5 s status tick: points along the way.
    assert len(drawn[f"c (STEPS={STEPS['c']})"]) >= 2, drawn
    assert plot.read_bytes()[:4] == b"\x89PNG"



def tmp_path_of(work: Path) -> Path:
    return work.parent

"""The operator's journey of docs/operator.md on the local spot cloud, with real agents.

`spotrun localcloud up --run-agents`, `spotrun init` (twice), `spotrun launch`, one spot
interruption while the job trains, `spotrun status --watch` until it ends by itself: every
command is the real CLI in its own process, run where the job file is, as a newcomer would
(docs/operator.md, "The whole journey on the local cloud"). The instances that EC2 Fleet
launches boot the real agent (spotrun.localcloud.agents) with the counting trainer; the
job is judged by what the cloud recorded (its ledger, its events, EC2's state) and by the
completion record on the volume image, never by the agents' logs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from spotrun import tags
from spotrun.localcloud.ledger import calls, performed, read_ledger
from spotrun.harness.rehearsal import commit_repository
from spotrun.harness.rehearsal_volume import VolumeReadError, read_volume_state
from tests.helpers.operatorcloud import client, local_cloud, spotrun
from tests.helpers.operatorcloud import events as cloud_events
from tests.helpers.testkit import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.loopdev]

COUNTING_TRAINER = Path(__file__).resolve().parents[2] / "agent" / "spotrun" / "harness" / "soak_trainer.py"
STEPS = 400
JOB_TOML = """\
[job]
id = "journey"

[code]
repository = "{repository}"

[trainer]
command = ["{python}", "train.py"]
env = {{ STEPS = "{steps}", STEP_S = "0.05", CKPT_EVERY = "20" }}

[agent]
progress_tag_interval_s = 1.0

[launch]
fleet = "{fleet}"
image_id = "ami-0123456789abcdef0"
instance_types = ["p3.2xlarge"]
availability_zones = ["us-east-1a", "us-east-1b"]
"""


@pytest.fixture
def fleet_kind() -> str:
    return "ec2-fleet"  # docs/operator.md's default


@pytest.fixture
def journey(tmp_path, fleet_kind):
    root, work = tmp_path / "cloud", tmp_path / "work"
    work.mkdir()
    repository = commit_repository(tmp_path / "repo", {"train.py": COUNTING_TRAINER},
                                   "counting trainer")
    (work / "spotrun.toml").write_text(JOB_TOML.format(repository=repository, python=sys.executable,
                                                        steps=STEPS, fleet=fleet_kind))
    with local_cloud(root, work) as env:
        yield root, work, env


def test_init_launch_interrupt_watch_until_done(journey):
    root, work, env = journey

    first = spotrun("init", cwd=work, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "created  volume" in first.stdout and "created  lease-table" in first.stdout
    again = spotrun("init", cwd=work, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "created" not in again.stdout and "adopted" in again.stdout, again.stdout

    launched = spotrun("launch", cwd=work, env=env)
    assert launched.returncode == 0, launched.stdout + launched.stderr

    view = wait_until(lambda: training(work, env), 120,
                      "the agent to report training (spotrun status)", interval=0.5)
    [victim] = [i["id"] for i in view["instances"] if i["state"] == "running"]
    notice = spotrun("localcloud", "interrupt", victim, "--in", "5", cwd=work, env=env)
    assert notice.returncode == 0, notice.stdout + notice.stderr

    watch = spotrun("status", "--watch", "--interval", "1", cwd=work, env=env, timeout=300)
    assert watch.returncode == 0, watch.stdout[-3000:] + watch.stderr[-3000:]
    assert "job journey done" in watch.stderr, watch.stderr[-2000:]

    # -- judged by the cloud's own record ----------------------------------------------------
    # The watch ends when the job is recorded done; the agent deletes the fleet right after,
    # so its DeleteFleets may reach the ledger a moment later (a CI dry run read it first).
    wait_until(lambda: any(performed(r) for r in calls(read_ledger(root / "ledger.jsonl"),
                                                       action="DeleteFleets")),
               60, "the agent's DeleteFleets in the cloud's ledger", interval=0.5)
    ledger = read_ledger(root / "ledger.jsonl")
    [create] = [r for r in calls(ledger, action="CreateFleet") if performed(r)]
    assert create["instance"] is None  # the operator's `spotrun launch`
    fleet_id = create["created"][0] if create.get("created") else None
    assert fleet_id and fleet_id.startswith("fleet-"), create
    deletes = [r for r in calls(ledger, action="DeleteFleets") if performed(r)]
    assert deletes and all(r["instance"] for r in deletes), deletes  # by an agent, not the test
    assert all(fleet_id in r["resources"] for r in deletes), deletes
    agents = {r["instance"] for r in ledger if r.get("instance")}
    assert victim in agents and len(agents) >= 2, agents  # the replacement did work too

    events = cloud_events(work, env)
    booted = [e["instance_id"] for e in events if e["event"] == "instance_agent_booted"]
    assert victim in booted and len(booted) >= 2, booted
    assert any(e["event"] == "spot_interruption" and e["instance_id"] == victim for e in events)

    status = json.loads(spotrun("localcloud", "status", "--json", cwd=work, env=env).stdout)
    assert status, status
    ec2_state = {i: s for i, s in _instance_states(status).items() if i in booted}
    assert set(ec2_state.values()) == {"terminated"}, ec2_state  # the agent's delete ended them
    ec2 = client(env)
    [fleet] = ec2.describe_fleets(FleetIds=[fleet_id])["Fleets"]
    assert fleet["FleetState"].startswith("deleted"), fleet

    volumes = ec2.describe_volumes(Filters=tags.job_filters("journey"))["Volumes"]
    [volume_id] = [v["VolumeId"] for v in volumes if tags.as_dict(v.get("Tags")).get(tags.ROLE) == "volume"]
    image = root / "ebs" / "volumes" / f"{volume_id}.img"

    def completion_on_image() -> dict | None:
        try:  # whole on disk once the dead instance's mount is gone
            return read_volume_state(volume_id, image).completion
        except VolumeReadError:
            return None

    completion = wait_until(completion_on_image, 60,
                            "the volume image to hold the completion record", interval=0.5)
    # Every step of the persisted lineage ran exactly once, across the interruption.
    assert completion["metrics"]["sum"] == STEPS * (STEPS + 1) // 2, completion

    # -- the doc's last steps: cancel (twice: nothing is left to cancel), then teardown ------
    for _ in range(2):
        cancel = spotrun("cancel", cwd=work, env=env)
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    teardown = spotrun("teardown", "--yes", cwd=work, env=env)
    assert teardown.returncode == 0, teardown.stdout + teardown.stderr
    left = _job_resources(env, "journey")
    # What init and launch made is gone; the volume (and its data) stays unless asked.
    assert left == {"templates": [], "roles": [], "profiles": [], "leases": [],
                    "volumes": [volume_id]}, left


def training(work: Path, env: dict) -> dict | None:
    """`spotrun status` once the agent reports training, before the middle of the job."""
    shown = spotrun("status", "--json", cwd=work, env=env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    view = json.loads(shown.stdout)
    step = view["agent"]["progress"].get("global_step") or 0
    running = [i["id"] for i in view["instances"] if i["state"] == "running"]
    return view if view["agent"]["phase"] == "training" and 0 < step < STEPS // 2 and running else None


@pytest.mark.parametrize("fleet_kind", ["asg", "spot-fleet"])
def test_other_fleet_kinds_boot_the_agent_and_die_with_their_capacity(journey, fleet_kind):
    """The Auto Scaling group's and the Spot Fleet's instances boot the agent too (it trains
    from the launch template's user data), and `spotrun cancel` ends them, agent and all."""
    root, work, env = journey
    for command in (("init",), ("launch",)):
        done = spotrun(*command, cwd=work, env=env)
        assert done.returncode == 0, done.stdout + done.stderr

    view = wait_until(lambda: training(work, env), 120,
                      "the agent to report training (spotrun status)", interval=0.5)
    [trainer_host] = [i["id"] for i in view["instances"] if i["state"] == "running"]
    for _ in range(2):  # the second finds nothing left to cancel, and says so without failing
        cancel = spotrun("cancel", cwd=work, env=env)
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr

    def ended() -> dict | None:
        status = json.loads(spotrun("localcloud", "status", "--json", cwd=work, env=env).stdout)
        [host] = [i for i in status["instances"] if i["instance_id"] == trainer_host]
        return host if host["state"] == "terminated" and not host["processes"] else None

    wait_until(ended, 60, f"{trainer_host} and its agent to end", interval=0.5)
    events = cloud_events(work, env)
    [off] = [e for e in events if e["event"] == "instance_terminated" and e["instance_id"] == trainer_host]
    assert off["killed"], off  # the agent was still running when its instance went
    ledger = read_ledger(root / "ledger.jsonl")
    assert calls(ledger, caller_instance=trainer_host), "the agent made no AWS call as its instance"
    cancels = [r for r in calls(ledger, action=("DeleteAutoScalingGroup", "CancelSpotFleetRequests"))
               if performed(r)]
    assert cancels and all(r["instance"] is None for r in cancels), cancels  # the operator's


def _instance_states(status: dict) -> dict[str, str]:
    found = {}
    for item in status.get("instances", []):
        found[item.get("instance_id") or item.get("id")] = item.get("state")
    return found


def _job_resources(env: dict, job_id: str) -> dict[str, list]:
    ec2, iam, dynamodb = client(env, "ec2"), client(env, "iam"), client(env, "dynamodb")
    name = f"spotrun-{job_id}"
    leases = [item for table in dynamodb.list_tables()["TableNames"]
              for item in dynamodb.scan(TableName=table)["Items"]
              if job_id in json.dumps(item)]
    return {
        "templates": [t["LaunchTemplateName"] for t in ec2.describe_launch_templates()[
            "LaunchTemplates"] if t["LaunchTemplateName"] == name],
        "roles": [r["RoleName"] for r in iam.list_roles()["Roles"] if r["RoleName"] == name],
        "profiles": [p["InstanceProfileName"] for p in iam.list_instance_profiles()[
            "InstanceProfiles"] if p["InstanceProfileName"] == name],
        "leases": leases,
        "volumes": [v["VolumeId"] for v in ec2.describe_volumes(
            Filters=tags.job_filters(job_id))["Volumes"]],
    }

"""Issue 21: the lease is not optional where two instances can meet, its bounds are config,
and an instance that cannot win tells the operator.

- `agent check-config` / `agent run` refuse a config without a lease table (exit 2, naming
  aws.lease_table) unless aws.single_instance promises one instance;
- the [lease] bounds reach the Lease the agent makes;
- the soak plans jobs without a table only with kinds where no two agents meet, and gives
  them the promise;
- the lease's DynamoDB calls are exactly those the IAM policy allows;
- a loser exits 1, says so in the state file (`spotrun agent status`) and the journal, and
  made no mutating call: judged from the local cloud's ledger and the lease item.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomli_w

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from c2_world import JOB, aws, clients, launch  # noqa: E402,F401

from spotrun import config as configmod  # noqa: E402
from spotrun import iam  # noqa: E402
from spotrun import lease as L  # noqa: E402
from spotrun.localcloud.faultagent import recording_aws_calls  # noqa: E402

PYTHON = sys.executable


def check_config(tmp_path: Path, aws_section: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "agent.toml"
    path.write_text(tomli_w.dumps({"job": {"id": "j1"}, "trainer": {"user": "root"},
                                   "code": {"repository": "https://example.org/t.git"},
                                   "aws": aws_section}))
    return subprocess.run([PYTHON, "-m", "spotrun", "agent", "check-config", "--no-user-data",
                           "--config", str(path)], capture_output=True, text=True, timeout=60)


def test_check_config_refuses_a_config_without_a_lease_table(tmp_path):
    """Defect 3: before, no table was the agent's default and ran (two agents both trained)."""
    proc = check_config(tmp_path, {"region": "us-east-1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "aws.lease_table: is required" in proc.stderr
    assert "aws.single_instance = true" in proc.stderr and str(tmp_path / "agent.toml") in proc.stderr


@pytest.mark.parametrize("aws_section", [{"lease_table": "spotrun-leases"},
                                         {"single_instance": True}])
def test_check_config_accepts_a_table_or_the_single_instance_promise(tmp_path, aws_section):
    proc = check_config(tmp_path, aws_section)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: job j1")


def test_the_lease_is_required_only_of_the_whole_config():
    """The file alone may leave the table to the user data; `load` without require_lease (the
    file's first read, `agent status`) accepts it."""
    assert configmod.load(None).aws.lease_table == ""
    with pytest.raises(configmod.ConfigError) as err:
        configmod.load(None, ({"job": {"id": "j"}}, "user-data"), require_lease=True)
    assert err.value.key == "aws.lease_table" and err.value.source == "user-data"
    made = configmod.load(None, ({"aws": {"lease_table": "t"}}, "user-data"), require_lease=True)
    assert made.aws.lease_table == "t" and made.aws.single_instance is False


def test_the_lease_bounds_come_from_the_config():
    from spotrun.volumes import VolumeManager

    config = configmod.from_mapping({"aws": {"lease_table": "t", "region": "us-east-1"},
                                     "lease": {"takeover_window_s": 42.0, "takeover_lookups": 7,
                                               "loser_wait_s": 12.5}})
    ident = SimpleNamespace(instance_id="i-0123456789abcdef0", region="us-east-1",
                            availability_zone="us-east-1a")
    manager = VolumeManager(config, ident, ec2_client=object(), dynamodb_client=object())
    assert (manager.lease.absent_window_s, manager.lease.absent_lookups,
            manager.lease.loser_wait_s, manager.loser_wait_s) == (42.0, 7, 12.5, 12.5)
    default = VolumeManager(configmod.from_mapping({"aws": {"lease_table": "t"}}), ident,
                            ec2_client=object(), dynamodb_client=object())
    assert (default.lease.absent_window_s, default.lease.absent_lookups,
            default.lease.loser_wait_s) == (L.ABSENT_WINDOW_S, L.ABSENT_LOOKUPS, L.LOSER_WAIT_S)


def test_soak_jobs_without_a_table_promise_one_instance_and_meet_no_second_agent():
    from spotrun.harness import soakplan
    from spotrun.harness.soakjob import LEASE_TABLE, SoakJob

    plans = [p for seed in (1, 2, 3) for p in soakplan.plan_jobs("long", seed)]
    assert {p.lease for p in plans} == {True, False}, "the soak must keep testing both modes"
    for plan in plans:
        kinds = {s.kind for s in plan.slots}
        assert plan.lease or not kinds & soakplan.NEEDS_LEASE, plan.describe()
    inst = SimpleNamespace(agent_overrides=lambda: {"metadata": {}, "volume": {},
                                                    "aws": {"region": "us-east-1"}})
    for plan in (next(p for p in plans if p.lease), next(p for p in plans if not p.lease)):
        cloud = SimpleNamespace(ledger_path="/nonexistent/ledger.jsonl")  # only its config is read
        job = SoakJob(cloud, Path("/nonexistent"), plan, "file:///nonexistent", 1.0)
        mapping = job._agent_config(inst)
        for section, values in job._job_overrides().items():
            mapping.setdefault(section, {}).update(values)
        config = configmod.from_mapping(mapping)
        configmod.check_lease(config)  # what `agent run` requires
        assert config.aws.lease_table == (LEASE_TABLE if plan.lease else "")
        assert config.aws.single_instance is (not plan.lease)


def test_the_lease_makes_exactly_the_dynamodb_calls_the_policy_allows(aws, tmp_path):
    record = tmp_path / "calls.jsonl"
    ec2, db = clients(aws)
    db.create_table(**L.table_definition("leases"))
    a, b = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1b")
    with recording_aws_calls(record):  # recording from here on
        held = L.Lease(db, "leases", JOB, a.instance_id, a.availability_zone, ec2, poll_s=0.05)
        held.acquire(1)
        held.validate()
        held.mark_draining()
        held.release()
        held.acquire(1)
        with pytest.raises(L.LeaseHeld):  # a loser: reads only
            L.Lease(db, "leases", JOB, b.instance_id, b.availability_zone, ec2, poll_s=0.05,
                    loser_wait_s=0.1).acquire(5)
    made = {json.loads(line)["action"] for line in record.read_text().splitlines()}
    assert {m for m in made if m.startswith("dynamodb:")} == set(iam.LEASE_CALLS)
    statement = next(s for s in iam.agent_policy(JOB, lease_table="leases")["Statement"]
                     if s["Sid"] == "JobLease")
    assert sorted(statement["Action"]) == sorted(iam.LEASE_CALLS)


@pytest.mark.loopdev
def test_a_loser_exits_says_so_in_its_state_and_journal_and_changes_nothing(shared_tmp):
    """Before: the loser's state file said only "acquiring-volume" and nothing told the
    operator that the instance had given up and would be retried, then left failed."""
    from spotrun.localcloud import LocalCloud
    from spotrun.localcloud import ledger as ledgermod

    with LocalCloud(shared_tmp / "cloud") as cloud:
        holder = cloud.launch_instance(az=cloud.azs[0])
        loser = cloud.launch_instance(az=cloud.azs[1])
        db = cloud.client("dynamodb", faults=False)
        db.create_table(**L.table_definition("leases"))
        item = {"job": {"S": "lost"}, "holder": {"S": holder.instance_id},
                "az": {"S": holder.az}, "since": {"S": "then"}, "generation": {"N": "3"}}
        db.put_item(TableName="leases", Item=item)
        config = loser.agent_overrides()
        config["job"] = {"id": "lost"}
        config["code"] = {"repository": "file:///nonexistent"}
        config["trainer"] = {"user": "nobody"}
        config["aws"]["lease_table"] = "leases"
        config["lease"] = {"loser_wait_s": 1.0}
        path = shared_tmp / "loser.toml"
        path.write_text(tomli_w.dumps(config))
        proc = subprocess.run([PYTHON, "-m", "spotrun", "agent", "run", "--no-user-data",
                               "--exit-when-done", "--config", str(path)],
                              env=loser.env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert f"held by instance {holder.instance_id} (running" in proc.stderr
        # "<3>": the journal's error priority, as journald reads the agent's lines.
        events = [(m.group(1), json.loads(m.group(2))) for line in proc.stdout.splitlines()
                  if (m := re.match(r"^<(\d)>(\{.*\})$", line))]
        told = [(p, e) for p, e in events if e.get("event") == "agent_not_needed"]
        assert told, proc.stdout[-3000:]
        priority, event = told[0]
        assert priority == "3" and event["holder"] == holder.instance_id
        assert "lower the fleet's target capacity" in event["hint"]

        state = json.loads((loser.state_dir / "state.json").read_text())
        assert state["gave_up"]["holder"] == holder.instance_id, state
        assert "lower the fleet's target capacity" in state["next"]
        status = subprocess.run([PYTHON, "-m", "spotrun", "agent", "status", "--config", str(path)],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "not needed: job held by instance" in status.stdout

        records = cloud.ledger()
        mine = ledgermod.calls(records, caller_instance=loser.instance_id)
        assert ledgermod.calls(mine, action="GetItem"), "the loser never read the lease"
        assert ledgermod.calls(mine, mutating=True) == [], ledgermod.calls(mine, mutating=True)
        stored = db.get_item(TableName="leases", Key={"job": {"S": "lost"}},
                             ConsistentRead=True)["Item"]
        assert stored == item

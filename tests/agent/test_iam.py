"""The agent's IAM policy: parliament finds nothing, the shipped file is the rendered policy,
every listed call is allowed and scoped, and every call the agent made in the acceptance
tests (recorded through botocore's before-call event) is listed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import parliament
import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from c2_world import JOB, aws, clients, job_volume, launch, make_config  # noqa: E402,F401

from spotrun import iam  # noqa: E402
from spotrun import lease  # noqa: E402
from spotrun.tags import JOB as JOB_TAG  # noqa: E402
from spotrun import migration as M  # noqa: E402
from spotrun.localcloud.faultagent import recording_aws_calls  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "packaging" / "iam" / "agent-policy.json"


def allowed_actions(policy: dict) -> set[str]:
    actions = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        listed = statement["Action"]
        actions |= {listed} if isinstance(listed, str) else set(listed)
    return actions


@pytest.mark.parametrize("kwargs", [
    {}, {"region": "eu-west-1", "account_id": "123456789012", "lease_table": "leases"},
    {"lease_table": "leases", "sweep": True}])
def test_parliament_reports_no_findings(kwargs):
    policy = parliament.analyze_policy_string(json.dumps(iam.agent_policy("job-1", **kwargs)))
    assert [(f.issue, f.detail) for f in policy.findings] == []


def test_parliament_cli_on_the_shipped_file():
    # parliament's CLI refuses --file unless stdin is a terminal: give it one.
    primary, secondary = os.openpty()
    try:
        result = subprocess.run([str(Path(sys.executable).parent / "parliament"), "--file", str(SHIPPED)],
                                capture_output=True, text=True, stdin=secondary, timeout=120)
    finally:
        os.close(primary)
        os.close(secondary)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_shipped_file_is_the_rendered_policy():
    rendered = iam.agent_policy("EXAMPLE", lease_table="spotrun-leases")
    assert json.loads(SHIPPED.read_text()) == rendered


def test_policy_allows_exactly_the_listed_calls():
    actions = [a for a, _ in iam.AGENT_CALLS]
    assert len(actions) == len(set(actions))
    assert all(why for _, why in iam.AGENT_CALLS)
    assert allowed_actions(iam.agent_policy("j", lease_table="t")) == set(actions)
    assert allowed_actions(iam.agent_policy("j")) == set(actions) - set(iam.LEASE_CALLS)


def test_other_modules_calls_are_listed():
    needed = {"ec2:DescribeInstances", "ec2:DescribeTags", "ec2:CancelSpotFleetRequests",
              "ec2:DescribeSpotFleetRequests", "ec2:DeleteFleets", "ec2:DescribeFleets",
              "autoscaling:UpdateAutoScalingGroup", "autoscaling:DescribeAutoScalingGroups",
              "ssm:GetParameter", "secretsmanager:GetSecretValue"}
    assert needed <= {a for a, _ in iam.AGENT_CALLS}


def test_mutations_are_scoped_by_the_job_tag():
    policy = iam.agent_policy("job-1", region="us-east-1", account_id="123456789012", lease_table="t")
    for statement in policy["Statement"]:
        if statement["Sid"] == "Describe":
            continue
        if statement["Sid"] == "PublishLearningCurves":
            # PutMetricData names no resource: the namespace is all IAM can scope it by.
            assert statement["Action"] == "cloudwatch:PutMetricData"
            assert statement["Condition"] == {"StringEquals": {"cloudwatch:namespace": "spotrun"}}
            continue
        assert statement["Resource"] != "*", statement["Sid"]
        condition = json.dumps(statement.get("Condition", {}))
        assert "job-1" in condition or "ec2:CreateAction" in condition, statement["Sid"]
    tag_existing = next(s for s in policy["Statement"] if s["Sid"] == "TagJobResources")
    assert tag_existing["Condition"]["ForAllValues:StringNotEquals"]["aws:TagKeys"] == ["spotrun:job"]


def assert_listed(record_file: Path) -> set[str]:
    made = {json.loads(line)["action"] for line in record_file.read_text().splitlines() if line}
    listed = {a.lower() for a, _ in iam.AGENT_CALLS}
    assert made, "no AWS call was recorded"
    assert sorted(a for a in made if a.lower() not in listed) == []
    return made


def test_calls_made_by_migration_and_lease_are_listed(aws, tmp_path):
    """The same check the acceptance tests make, on moto: every call recorded is listed."""
    record = tmp_path / "calls.jsonl"
    ec2, db = clients(aws)
    db.create_table(**lease.table_definition("leases"))
    config = make_config(aws, volume={"snapshot_retention_days": 0.0})
    source = job_volume(ec2, "us-east-1a")
    here = launch(ec2, "us-east-1b")
    with recording_aws_calls(record):  # the test's own setup calls are not the agent's
        held = lease.Lease(db, "leases", JOB, here.instance_id, here.availability_zone, ec2)
        held.acquire(5)
        new = M.migrate_here(ec2, ec2, config, here, source, deadline_create_s=30)
        M.finish(ec2, source, new["VolumeId"], deadline_s=30)
        M.prune_snapshots(ec2, JOB, {new["VolumeId"]}, 0.0)
        held.release()
    made = assert_listed(record)
    assert {"ec2:CreateSnapshot", "ec2:CreateVolume", "ec2:DeleteVolume", "dynamodb:PutItem"} <= made


def test_readme_lists_every_call():
    assert iam.calls_table() in (ROOT / "packaging" / "iam" / "README.md").read_text()


def test_a_sweeps_policy_reaches_its_experiments_and_nothing_named_otherwise():
    """Issue 19: one role for the sweep's instances, each of which takes on any experiment."""
    policy = iam.agent_policy("cifar", lease_table="t", sweep=True)
    assert allowed_actions(policy) == {a for a, _ in iam.AGENT_CALLS}
    conditions = [st["Condition"] for st in policy["Statement"] if "Condition" in st]
    scoped = [c["StringLike"] for c in conditions if "StringLike" in c]
    assert scoped and all(list(v.values()) == [["cifar", "cifar-*"]] for v in scoped)
    assert not any("StringEquals" in c and any(k.endswith(JOB_TAG) for k in c["StringEquals"])
                   for c in conditions)  # no statement left scoped to the sweep's id alone
    [lease] = [st for st in policy["Statement"] if st["Sid"] == "JobLease"]
    assert lease["Condition"]["ForAllValues:StringLike"]["dynamodb:LeadingKeys"] == [
        "cifar-*", "sweep#cifar"]
    single = iam.agent_policy("cifar", lease_table="t")
    assert "StringLike" not in json.dumps(single)  # a single job's scope stays exact

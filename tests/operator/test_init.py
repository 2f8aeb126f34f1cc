"""spotrun init against moto's server: creates once, adopts after; the policy is the agent's."""
from __future__ import annotations

import json

import parliament

from spotrun import iam, tags

REGION = "us-west-2"


def _init(spotrun, moto, path):
    code, out, err = spotrun("init", "--json", "-f", path, "--endpoint-url", moto)
    assert code == 0, err
    return {s["resource"]: s for s in json.loads(out)["steps"]}


def _policy(client, job_id):
    document = client("iam").get_role_policy(RoleName=f"spotrun-{job_id}", PolicyName="spotrun-agent")["PolicyDocument"]
    return document if isinstance(document, dict) else json.loads(document)


def test_init_twice_creates_everything_once(moto, client, job_file, job_id, spotrun):
    path = job_file(fleet="spot-fleet")
    roles_before = len(client("iam").list_roles()["Roles"])
    first = _init(spotrun, moto, path)
    assert {s["action"] for s in first.values()} == {"created"}
    assert set(first) == {"volume", "role", "policy", "instance-profile", "spot-fleet-role", "lease-table"}
    second = _init(spotrun, moto, path)
    assert {s["action"] for s in second.values()} == {"adopted"}
    assert second["volume"]["name"] == first["volume"]["name"]

    volumes = client("ec2").describe_volumes(Filters=tags.job_filters(job_id))["Volumes"]
    assert len(volumes) == 1
    vol = volumes[0]
    assert vol["AvailabilityZone"] == "us-west-2b" and vol["Size"] == 20 and vol["Encrypted"]
    vtags = tags.as_dict(vol["Tags"])
    assert vtags[tags.NAME] == "DL-datasets-checkpoints" and vtags[tags.ROLE] == "volume"
    assert client("dynamodb").describe_table(TableName=f"leases-{job_id}")["Table"]["TableStatus"] == "ACTIVE"
    profile = client("iam").get_instance_profile(InstanceProfileName=f"spotrun-{job_id}")["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [f"spotrun-{job_id}"]
    assert len(client("iam").list_roles()["Roles"]) == roles_before + 2  # instance role + fleet role
    attached = client("iam").list_attached_role_policies(RoleName=f"fleet-role-{job_id}")["AttachedPolicies"]
    assert [p["PolicyName"] for p in attached] == ["AmazonEC2SpotFleetTaggingRole"]


def test_created_policy_is_exactly_the_agents(moto, client, job_file, job_id, spotrun):
    _init(spotrun, moto, job_file())
    account = client("sts").get_caller_identity()["Account"]
    assert _policy(client, job_id) == iam.agent_policy(job_id, region=REGION, account_id=account,
                                                       lease_table=f"leases-{job_id}")
    role = f"spotrun-{job_id}"
    assert client("iam").list_role_policies(RoleName=role)["PolicyNames"] == ["spotrun-agent"]
    assert client("iam").list_attached_role_policies(RoleName=role)["AttachedPolicies"] == []
    trust = client("iam").get_role(RoleName=role)["Role"]["AssumeRolePolicyDocument"]
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    # The parliament linter has nothing to say about what was created.
    assert parliament.analyze_policy_string(json.dumps(_policy(client, job_id))).findings == []


def test_a_drifted_policy_is_put_back(moto, client, job_file, job_id, spotrun):
    path = job_file()
    _init(spotrun, moto, path)
    wide = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    typo = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "ec2:DescribeVolume",
                                                     "Resource": "*"}]}
    assert parliament.analyze_policy_string(json.dumps(typo)).findings  # the linter does fire
    client("iam").put_role_policy(RoleName=f"spotrun-{job_id}", PolicyName="spotrun-agent",
                                  PolicyDocument=json.dumps(wide))
    assert _init(spotrun, moto, path)["policy"]["action"] == "updated"
    assert _init(spotrun, moto, path)["policy"]["action"] == "adopted"
    assert _policy(client, job_id) != wide


def test_dry_run_prints_the_plan(job_file, spotrun):
    code, out, _ = spotrun("init", "--dry-run", "-f", job_file(fleet="asg"))
    assert code == 0 and "dry run" in out and "volume" in out and "spot-fleet-role" not in out

"""`launch` checks everything `init` creates before creating anything (issue 20)."""
from __future__ import annotations

from spotrun import tags


def _ok(spotrun, *argv):
    code, out, err = spotrun(*argv)
    assert code == 0, err
    return out


def _nothing_launched(client, job_id):
    ec2 = client("ec2")
    templates = ec2.describe_launch_templates(
        Filters=[{"Name": f"tag:{tags.JOB}", "Values": [job_id]}])["LaunchTemplates"]
    fleets = [f for f in ec2.describe_fleets()["Fleets"] if tags.as_dict(f.get("Tags")).get(tags.JOB) == job_id]
    return templates == [] and fleets == []


def test_launch_after_a_half_done_init_names_what_is_missing(moto, client, job_file, job_id, spotrun):
    """Before the fix launch checked only the volume and the profile: with the lease table and
    the agent's policy gone it created a template and a fleet whose agents stop on every boot."""
    path = job_file()
    _ok(spotrun, "init", "-f", path, "--endpoint-url", moto)
    client("dynamodb").delete_table(TableName=f"leases-{job_id}")
    client("iam").delete_role_policy(RoleName=f"spotrun-{job_id}", PolicyName="spotrun-agent")
    code, _, err = spotrun("launch", "-f", path, "--endpoint-url", moto)
    assert code == 1, err
    assert f"lease table leases-{job_id} is missing" in err
    assert f"policy spotrun-{job_id}/spotrun-agent is missing" in err
    assert f"spotrun init -f {path}" in err and "Traceback" not in err
    assert _nothing_launched(client, job_id)
    # init puts back only what is missing; launch then goes ahead.
    _ok(spotrun, "init", "-f", path, "--endpoint-url", moto)
    _ok(spotrun, "launch", "-f", path, "--endpoint-url", moto)
    assert not _nothing_launched(client, job_id)


def test_launch_names_a_missing_role_and_a_drifted_policy(moto, client, job_file, job_id, spotrun):
    path = job_file(fleet="spot-fleet")
    _ok(spotrun, "init", "-f", path, "--endpoint-url", moto)
    iam = client("iam")
    iam.put_role_policy(RoleName=f"spotrun-{job_id}", PolicyName="spotrun-agent", PolicyDocument=(
        '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'))
    iam.detach_role_policy(RoleName=f"fleet-role-{job_id}",
                           PolicyArn="arn:aws:iam::aws:policy/service-role/AmazonEC2SpotFleetTaggingRole")
    code, _, err = spotrun("launch", "-f", path, "--endpoint-url", moto)
    assert code == 1, err
    assert "differs from what the agent needs" in err and f"fleet-role-{job_id} lacks" in err
    assert _nothing_launched(client, job_id)

"""`spotrun teardown`: what init and launch made for the job goes, the volume and snapshots
stay unless asked (issue 20). Judged by moto's own record, not by the command's output."""
from __future__ import annotations

import json

from spotrun import lease, tags


def _ok(spotrun, *argv):
    code, out, err = spotrun(*argv)
    assert code == 0, err
    return json.loads(out) if "--json" in argv else out


def _left(client, job_id):
    ec2, iam = client("ec2"), client("iam")
    return {
        "templates": [t["LaunchTemplateName"] for t in ec2.describe_launch_templates()["LaunchTemplates"]
                      if t["LaunchTemplateName"] == f"spotrun-{job_id}"],
        "roles": [r["RoleName"] for r in iam.list_roles()["Roles"] if r["RoleName"] == f"spotrun-{job_id}"],
        "profiles": [p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]
                     if p["InstanceProfileName"] == f"spotrun-{job_id}"],
        "tables": [t for t in client("dynamodb").list_tables()["TableNames"] if t == f"leases-{job_id}"],
        "volumes": [v["VolumeId"] for v in ec2.describe_volumes(Filters=tags.job_filters(job_id))["Volumes"]],
    }


def test_teardown_removes_what_init_and_launch_made_and_keeps_the_volume(moto, client, job_file, job_id, spotrun):
    path = job_file()
    _ok(spotrun, "init", "-f", path, "--endpoint-url", moto)
    _ok(spotrun, "launch", "-f", path, "--endpoint-url", moto)
    table = f"leases-{job_id}"
    client("dynamodb").put_item(TableName=table, Item={lease.KEY: {"S": job_id}, "holder": {"S": "i-1"}})
    client("dynamodb").put_item(TableName=table, Item={lease.KEY: {"S": "another-job"}})
    code, _, err = spotrun("teardown", "--yes", "-f", path, "--endpoint-url", moto)
    assert code == 1 and "cancel" in err, err  # still running: refused, nothing removed
    assert _left(client, job_id)["roles"]
    _ok(spotrun, "cancel", "-f", path, "--endpoint-url", moto)
    code, _, err = spotrun("teardown", "-f", path, "--endpoint-url", moto)  # no terminal, no --yes
    assert code == 2 and "--yes" in err and _left(client, job_id)["templates"]
    _ok(spotrun, "teardown", "--yes", "-f", path, "--endpoint-url", moto)
    left = _left(client, job_id)
    assert left["templates"] == left["roles"] == left["profiles"] == []
    assert left["tables"] == [table] and len(left["volumes"]) == 1
    items = client("dynamodb").scan(TableName=table)["Items"]
    assert [i[lease.KEY]["S"] for i in items] == ["another-job"]
    # Again: nothing left to remove, no error. Then the volume and the table on request.
    _ok(spotrun, "teardown", "--yes", "-f", path, "--endpoint-url", moto)
    _ok(spotrun, "teardown", "--yes", "--all", "--delete-volume", "-f", path, "--endpoint-url", moto)
    left = _left(client, job_id)
    assert left["tables"] == [] and left["volumes"] == []
    snaps = client("ec2").describe_snapshots(OwnerIds=["self"], Filters=tags.job_filters(job_id))["Snapshots"]
    assert [tags.as_dict(s["Tags"])[tags.ROLE] for s in snaps] == ["final-snapshot"]

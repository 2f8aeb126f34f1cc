"""Every AWS call the agent makes, with why, and the least-privilege policy allowing exactly those.

The policy is scoped by the job tag (invariant 6): the agent may act only on volumes,
snapshots, fleets and groups tagged ``spotrun:job = <job>``, may create volumes and
snapshots only when it tags them for the job in the same request, may add tags at creation
only from CreateVolume/CreateSnapshot, and may never rewrite the ``spotrun:job`` tag of an
existing resource. A sweep's instances may make volumes from its dataset snapshot (tagged with
the sweep's id, in the sweep's scope) but never delete it. Describe calls cannot be scoped by resource in EC2, so they are ``*``.
``packaging/iam/agent-policy.json`` is this policy rendered for job ``EXAMPLE``
(``python -m spotrun.iam > packaging/iam/agent-policy.json``; a test keeps them equal), and
``packaging/iam/README.md`` lists the calls (``python -m spotrun.iam --calls``).
"""
from __future__ import annotations

import json
import sys

from spotrun.metrics import NAMESPACE as METRICS_NAMESPACE
from spotrun.tags import DATASET_SNAPSHOT_ROLE, FIRST_VOLUME, JOB, LEFT_FLEET, ROLE

# (action, why). The IAM test checks every call the agent made in the tests is listed here.
AGENT_CALLS: list[tuple[str, str]] = [
    ("ec2:DescribeInstances", "identity fallback without metadata tags; the lease holder's state; "
                              "device names in use on this instance"),
    ("ec2:DescribeTags", "identity fallback: what launched this instance (fleet / group tags)"),
    ("ec2:DescribeVolumes", "find the job's volumes by tag; wait for volume and attachment states"),
    ("ec2:DescribeSnapshots", "find the job's migration/drain snapshots; wait for completion"),
    ("ec2:CreateVolume", "the job's first volume (a sweep's: from its dataset snapshot, when "
                         "init made one), and the copy in this AZ during a migration"),
    ("ec2:CreateSnapshot", "migration snapshot, and the ahead-of-need snapshot on drain"),
    ("ec2:CreateTags", "tags at creation; migration journal steps and progress on the job's "
                       "volume; a sweep's instance marks itself before it leaves the fleet; "
                       "without a lease table, an instance states it is making the first volume"),
    ("ec2:AttachVolume", "attach the job's volume to this instance"),
    ("ec2:DetachVolume", "detach the job's volume on drain"),
    ("ec2:DeleteVolume", "delete the old volume after its migrated copy is verified, and "
                         "unverified copies of an abandoned migration"),
    ("ec2:DeleteSnapshot", "migration/drain snapshots past their retention (never a sweep's "
                           "dataset snapshot)"),
    ("ec2:CancelSpotFleetRequests", "cancel the job's Spot Fleet after training completed"),
    ("ec2:DescribeSpotFleetRequests", "check the Spot Fleet before cancelling it"),
    ("ec2:DeleteFleets", "delete the job's EC2 Fleet after training completed"),
    ("ec2:DescribeFleets", "check the EC2 Fleet before deleting it"),
    ("ec2:ModifyFleet", "a sweep's instance with nothing left to claim: one fewer in the EC2 Fleet"),
    ("ec2:ModifySpotFleetRequest", "a sweep's instance with nothing left to claim: one fewer in "
                                   "the Spot Fleet"),
    ("ec2:TerminateInstances", "a sweep's instance with nothing left to claim ends itself, after "
                               "lowering its fleet's target capacity"),
    ("autoscaling:UpdateAutoScalingGroup", "scale the job's Auto Scaling group to zero when done"),
    ("autoscaling:TerminateInstanceInAutoScalingGroup", "a sweep's instance with nothing left to "
                                                        "claim: ends itself, one fewer desired"),
    ("autoscaling:DescribeAutoScalingGroups", "check the Auto Scaling group before scaling it"),
    ("cloudwatch:PutMetricData", "the trainer's learning curves (loss, accuracy, step), namespace "
                                 "spotrun, dimension job (what `spotrun status --plot` draws)"),
    ("ssm:GetParameter", "git credentials from an SSM parameter (code.credentials_ssm_parameter)"),
    ("secretsmanager:GetSecretValue", "git credentials from a secret (code.credentials_secret_id)"),
    ("dynamodb:GetItem", "read the job's lease (consistent read): who holds it, and the "
                         "holder's check of its generation before every change to the job"),
    ("dynamodb:PutItem", "every change to the job's lease, each a compare-and-swap on holder and "
                         "generation: take (or take over) it, mark it draining, release it "
                         "(the item stays, so the generation keeps counting)"),
]

# Exactly what spotrun.lease calls (a test records them): no DeleteItem or UpdateItem.
LEASE_CALLS = ("dynamodb:GetItem", "dynamodb:PutItem")


def agent_policy(job_id: str, *, region: str = "*", account_id: str = "*",
                 lease_table: str | None = None, sweep: bool = False) -> dict:
    """The agent's IAM policy document for ``job_id`` (least privilege, scoped by the job tag).

    ``sweep``: ``job_id`` is a sweep's, whose experiments are the jobs ``<job_id>-<name>``: the
    scope is the job tag ``job_id`` or ``job_id-*`` (job ids hold no ``*`` or ``?``, so the
    pattern is exact but for one thing, said in docs/sweeps.md: another job whose id starts
    with ``<job_id>-`` is in scope too; listing every experiment's id would outgrow IAM's
    policy size limit well before the sweep's 100 experiments)."""
    ec2 = f"arn:aws:ec2:{region}:{account_id}"
    volumes = f"{ec2}:volume/*"
    snapshots = f"arn:aws:ec2:{region}::snapshot/*"
    instances = f"{ec2}:instance/*"
    match, scope = ("StringLike", [job_id, f"{job_id}-*"]) if sweep else ("StringEquals", job_id)
    job_resource = {match: {f"aws:ResourceTag/{JOB}": scope}}
    job_request = {match: {f"aws:RequestTag/{JOB}": scope}}
    statements = [
        {"Sid": "Describe", "Effect": "Allow", "Resource": "*", "Action": [
            "ec2:DescribeInstances", "ec2:DescribeTags", "ec2:DescribeVolumes",
            "ec2:DescribeSnapshots", "ec2:DescribeSpotFleetRequests", "ec2:DescribeFleets",
            "autoscaling:DescribeAutoScalingGroups"]},
        {"Sid": "CreateJobVolumesAndSnapshots", "Effect": "Allow",
         "Action": ["ec2:CreateVolume", "ec2:CreateSnapshot"],
         "Resource": [volumes, snapshots], "Condition": job_request},
        {"Sid": "SnapshotAndRestoreJobResources", "Effect": "Allow",
         "Action": ["ec2:CreateSnapshot", "ec2:CreateVolume"],
         "Resource": [volumes, snapshots], "Condition": job_resource},
        {"Sid": "TagOnCreate", "Effect": "Allow", "Action": "ec2:CreateTags",
         "Resource": [volumes, snapshots],
         "Condition": {"StringEquals": {"ec2:CreateAction": ["CreateVolume", "CreateSnapshot"]}}},
        {"Sid": "TagJobResources", "Effect": "Allow", "Action": "ec2:CreateTags",
         "Resource": [volumes, snapshots],
         "Condition": {**job_resource, "ForAllValues:StringNotEquals": {"aws:TagKeys": [JOB]}}},
        {"Sid": "AttachJobVolumesToJobInstances", "Effect": "Allow",
         "Action": ["ec2:AttachVolume", "ec2:DetachVolume"],
         "Resource": [volumes, instances], "Condition": job_resource},
        {"Sid": "DeleteJobVolumes", "Effect": "Allow", "Action": "ec2:DeleteVolume",
         "Resource": volumes, "Condition": job_resource},
        # A sweep's dataset snapshot (tagged with the sweep's id) is the operator's to delete.
        {"Sid": "DeleteJobSnapshots", "Effect": "Allow", "Action": "ec2:DeleteSnapshot",
         "Resource": snapshots, "Condition": {**job_resource, "StringNotEquals": {
             f"aws:ResourceTag/{ROLE}": DATASET_SNAPSHOT_ROLE}}},
        {"Sid": "StopJobFleets", "Effect": "Allow",
         "Action": ["ec2:CancelSpotFleetRequests", "ec2:DeleteFleets"],
         "Resource": [f"{ec2}:spot-fleet-request/*", f"{ec2}:fleet/*"], "Condition": job_resource},
        {"Sid": "ShrinkJobFleets", "Effect": "Allow",
         "Action": ["ec2:ModifyFleet", "ec2:ModifySpotFleetRequest"],
         "Resource": [f"{ec2}:spot-fleet-request/*", f"{ec2}:fleet/*"], "Condition": job_resource},
        {"Sid": "EndJobInstances", "Effect": "Allow", "Action": "ec2:TerminateInstances",
         "Resource": instances, "Condition": job_resource},
        # spotrun.fleet.leave marks the instance before it lowers the fleet, so a retry never
        # lowers it twice; without a lease table a first boot states on its instance that it
        # is making the job's first volume (spotrun.firstvolume): those two tags, on the job's
        # instances, nothing else.
        {"Sid": "MarkJobInstance", "Effect": "Allow", "Action": "ec2:CreateTags",
         "Resource": instances,
         "Condition": {**job_resource, "ForAllValues:StringEquals": {
             "aws:TagKeys": [LEFT_FLEET, FIRST_VOLUME]}}},
        {"Sid": "ScaleJobGroup", "Effect": "Allow",
         "Action": ["autoscaling:UpdateAutoScalingGroup",
                    "autoscaling:TerminateInstanceInAutoScalingGroup"],
         "Resource": f"arn:aws:autoscaling:{region}:{account_id}:autoScalingGroup:*:autoScalingGroupName/*",
         "Condition": job_resource},
        # PutMetricData has no resource to scope: the namespace is the documented condition.
        {"Sid": "PublishLearningCurves", "Effect": "Allow", "Action": "cloudwatch:PutMetricData",
         "Resource": "*", "Condition": {"StringEquals": {"cloudwatch:namespace": METRICS_NAMESPACE}}},
        {"Sid": "ReadJobCredentials", "Effect": "Allow", "Action": "ssm:GetParameter",
         "Resource": f"arn:aws:ssm:{region}:{account_id}:parameter/*", "Condition": job_resource},
        {"Sid": "ReadJobSecret", "Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
         "Resource": f"arn:aws:secretsmanager:{region}:{account_id}:secret:*",
         "Condition": job_resource},
    ]
    if lease_table:
        statements.append(
            {"Sid": "JobLease", "Effect": "Allow", "Action": list(LEASE_CALLS),
             "Resource": f"arn:aws:dynamodb:{region}:{account_id}:table/{lease_table}",
             "Condition": {"ForAllValues:StringLike": {"dynamodb:LeadingKeys": [
                 f"{job_id}-*", f"sweep#{job_id}"]}} if sweep else
             {"ForAllValues:StringEquals": {"dynamodb:LeadingKeys": [job_id]}}})
    return {"Version": "2012-10-17", "Statement": statements}


def calls_table() -> str:
    """AGENT_CALLS as a Markdown table (packaging/iam/README.md carries it)."""
    rows = ["| action | why |", "|---|---|"]
    rows += [f"| `{action}` | {why} |" for action, why in AGENT_CALLS]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    if (argv if argv is not None else sys.argv[1:]) == ["--calls"]:
        sys.stdout.write(calls_table())
        return 0
    json.dump(agent_policy("EXAMPLE", lease_table="spotrun-leases"), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``spotrun launch``: a launch template (IMDSv2 only, the user-data stub, the instance
profile) and capacity through EC2 Fleet, an Auto Scaling group, or the seed's Spot Fleet.

Replaces the seed's steps 3, 4 and 6: no base64/sed substitution, no account ids pasted
into JSON, IMDSv1 closed, several instance types with price-capacity-optimized allocation.
"""
from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from spotrun import tags
from spotrun.errors import SpotrunError, UsageError
from spotrun.operator import fleets, validate
from spotrun.operator import init as init_mod
from spotrun.operator.aws import Aws, error_code, oplog as _log
from spotrun.operator.init import find_volumes
from spotrun.operator.jobfile import Job
from spotrun.operator.progress import Reporter


# Spot Fleet spells its strategies in camelCase.
_SPOT_FLEET_STRATEGY = {"price-capacity-optimized": "priceCapacityOptimized",
                        "capacity-optimized": "capacityOptimized", "lowest-price": "lowestPrice",
                        "diversified": "diversified",
                        "capacity-optimized-prioritized": "capacityOptimizedPrioritized"}


def template_data(job: Job, user_data: bytes) -> dict[str, Any]:
    """LaunchTemplateData; instance types come from the fleet's overrides, not from here."""
    launch = job.launch
    data: dict[str, Any] = {
        "ImageId": launch.image_id,
        "IamInstanceProfile": {"Name": job.role_name},
        "UserData": base64.b64encode(user_data).decode(),
        # IMDSv2 only; hop limit 1 keeps metadata (and the role's credentials) out of reach of
        # containers on the instance; tags in metadata let the agent read its own job tag.
        "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1,
                            "HttpEndpoint": "enabled", "InstanceMetadataTags": "enabled"},
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tags.as_list({
                tags.NAME: f"spotrun-{job.id}", tags.JOB: job.id})},
            # The root volume gets a name only: the job tag (and the IAM scope that follows it)
            # belongs to the data volume and its snapshots.
            {"ResourceType": "volume", "Tags": tags.as_list({tags.NAME: f"spotrun-{job.id}-root"})},
        ],
    }
    if launch.key_name:
        data["KeyName"] = launch.key_name
    if launch.security_group_ids:
        # Group ids (not names) hold for every subnet of the VPC the fleet's overrides choose.
        data["SecurityGroupIds"] = list(launch.security_group_ids)
    return data


def _overrides(job: Job, with_placement: bool = True) -> list[dict[str, Any]]:
    launch = job.launch
    out = []
    for instance_type in launch.instance_types:
        if with_placement and launch.subnets:
            out.extend({"InstanceType": instance_type, "SubnetId": s} for s in launch.subnets)
        elif with_placement and launch.availability_zones:
            out.extend({"InstanceType": instance_type, "AvailabilityZone": z}
                       for z in launch.availability_zones)
        else:
            out.append({"InstanceType": instance_type})
    return out


def ec2_fleet_request(job: Job, template: dict) -> dict[str, Any]:
    overrides = _overrides(job)
    if job.launch.max_price:
        for override in overrides:
            override["MaxPrice"] = f"{job.launch.max_price:.4f}"
    return {
        "Type": "maintain",  # replace interrupted instances, like the seed's Spot Fleet
        "TargetCapacitySpecification": {"TotalTargetCapacity": job.launch.target_capacity,
                                        "SpotTargetCapacity": job.launch.target_capacity,
                                        "OnDemandTargetCapacity": 0,
                                        "DefaultTargetCapacityType": "spot"},
        "SpotOptions": {"AllocationStrategy": job.launch.allocation_strategy,
                        "InstanceInterruptionBehavior": "terminate"},
        "LaunchTemplateConfigs": [{"LaunchTemplateSpecification": template, "Overrides": overrides}],
        "ReplaceUnhealthyInstances": False,
        "TagSpecifications": [{"ResourceType": "fleet", "Tags": tags.as_list({tags.JOB: job.id})}],
    }


def asg_request(job: Job, template: dict, zones: list[str]) -> dict[str, Any]:
    distribution: dict[str, Any] = {"OnDemandBaseCapacity": 0, "OnDemandPercentageAboveBaseCapacity": 0,
                                    "SpotAllocationStrategy": job.launch.allocation_strategy}
    if job.launch.max_price:
        distribution["SpotMaxPrice"] = f"{job.launch.max_price:.4f}"
    request: dict[str, Any] = {
        "AutoScalingGroupName": job.group_name,
        "MinSize": 0, "MaxSize": job.launch.target_capacity,
        "DesiredCapacity": job.launch.target_capacity,
        "MixedInstancesPolicy": {
            "LaunchTemplate": {"LaunchTemplateSpecification": template,
                               "Overrides": _overrides(job, with_placement=False)},
            "InstancesDistribution": distribution},
        # No CapacityRebalance: a proactive replacement would start while the old instance
        # still holds the job's single volume; the agent checkpoints on the recommendation instead.
        "CapacityRebalance": False,
        "Tags": [{"Key": tags.JOB, "Value": job.id, "PropagateAtLaunch": True,
                  "ResourceId": job.group_name, "ResourceType": "auto-scaling-group"}],
    }
    if job.launch.subnets:
        request["VPCZoneIdentifier"] = ",".join(job.launch.subnets)
    else:
        request["AvailabilityZones"] = zones
    return request


def spot_fleet_request(job: Job, template: dict, fleet_role_arn: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "IamFleetRole": fleet_role_arn,
        "AllocationStrategy": _SPOT_FLEET_STRATEGY[job.launch.allocation_strategy],
        "TargetCapacity": job.launch.target_capacity,
        "Type": "maintain",
        "InstanceInterruptionBehavior": "terminate",
        "LaunchTemplateConfigs": [{"LaunchTemplateSpecification": template, "Overrides": _overrides(job)}],
        "TagSpecifications": [{"ResourceType": "spot-fleet-request",
                               "Tags": tags.as_list({tags.JOB: job.id})}],
    }
    if job.launch.max_price:
        config["SpotPrice"] = f"{job.launch.max_price:.4f}"
    return config


def plan(job: Job) -> dict[str, Any]:
    """Everything launch would send, from the job file alone (``--dry-run``; no AWS call)."""
    if not job.launch.image_id:
        raise UsageError(f"{job.source}: launch.image_id: is required to launch (the AMI with spotrun installed)")
    stub = validate.render_user_data(job)
    template = {"LaunchTemplateName": job.launch_template_name, "Version": "(new version)"}
    if job.launch.fleet == "ec2-fleet":
        request = ec2_fleet_request(job, template)
    elif job.launch.fleet == "asg":
        request = asg_request(job, template, list(job.launch.availability_zones) or ["(all in region)"])
    else:
        request = spot_fleet_request(job, template, f"arn:aws:iam::(account):role/{job.launch.spot_fleet_role}")
    result = {"launch_template": {"name": job.launch_template_name, "data": template_data(job, stub)},
              "user_data": stub.decode(), "user_data_bytes": len(stub),
              "fleet": {"kind": job.launch.fleet, "request": request}}
    if job.dataset_volume:
        result["dataset_snapshot"] = (
            f"the sweep's completed snapshot of {job.dataset_volume} (tagged {tags.JOB}={job.id}, "
            f"{tags.ROLE}={tags.DATASET_SNAPSHOT_ROLE}; `spotrun init` makes it), added to the user "
            "data as [volume] source_snapshot")
    return result


def dataset_snapshot(aws: Aws, job: Job) -> str:
    """The sweep's completed dataset snapshot (what every experiment's first volume is made
    from); UsageError (exit 2, nothing launched) when init has not finished making it."""
    found = init_mod.dataset_snapshots(aws.client("ec2"), job)
    completed = [s for s in found if s["State"] == "completed"
                 and s.get("VolumeId") == job.dataset_volume]
    if completed:
        return completed[0]["SnapshotId"]
    if any(s.get("VolumeId") != job.dataset_volume for s in found):
        init_mod.check_dataset_volume(aws.client("ec2"), job)  # names the other volume's snapshot
    state = f"is still {found[0]['State']}" if found else "does not exist"
    raise UsageError(f"{job.source}: sweep.dataset_volume: the sweep's dataset snapshot of "
                     f"{job.dataset_volume} {state}; nothing was launched. Run `spotrun init -f "
                     f"{job.source}` (it makes the snapshot and waits for it), then launch again")


def _ensure_template(ec2: Any, job: Job, data: dict) -> dict[str, str]:
    """Create the template, or add a version to it; returns the spec pinned to that version."""
    name = job.launch_template_name
    try:
        created = ec2.create_launch_template(
            LaunchTemplateName=name, LaunchTemplateData=data, ClientToken=str(uuid.uuid4()),
            TagSpecifications=[{"ResourceType": "launch-template", "Tags": tags.as_list({tags.JOB: job.id})}])
        version = created["LaunchTemplate"]["LatestVersionNumber"]
    except Exception as exc:  # noqa: BLE001
        if error_code(exc) not in ("InvalidLaunchTemplateName.AlreadyExistsException",
                                   "InvalidLaunchTemplateName.AlreadyExists"):
            raise
        created = ec2.create_launch_template_version(LaunchTemplateName=name, LaunchTemplateData=data,
                                                     ClientToken=str(uuid.uuid4()))
        version = created["LaunchTemplateVersion"]["VersionNumber"]
        ec2.modify_launch_template(LaunchTemplateName=name, DefaultVersion=str(version))
    _log.info("launch_template_ready", job=job.id, name=name, version=version)
    return {"LaunchTemplateName": name, "Version": str(version)}


def _missing(aws: Aws, job: Job) -> list[str]:
    """Everything ``init`` makes that is not there (or not as the agent needs it)."""
    iam = aws.client("iam")
    problems = []
    # A sweep's volumes are made by the agents, each when its experiment is first claimed.
    if not job.experiments and not find_volumes(aws.client("ec2"), job):
        problems.append(f"no volume tagged {tags.JOB}={job.id}")

    def absent(call, code: str = "NoSuchEntity", **kwargs) -> dict | None:
        try:
            return call(**kwargs)
        except Exception as exc:  # noqa: BLE001 - only "not found" is a finding; the rest is a failure
            if error_code(exc) != code:
                raise
            return None

    if absent(iam.get_role, RoleName=job.role_name) is None:
        problems.append(f"role {job.role_name} is missing")
    else:
        policy = absent(iam.get_role_policy, RoleName=job.role_name, PolicyName=init_mod.AGENT_POLICY_NAME)
        if policy is None:
            problems.append(f"policy {job.role_name}/{init_mod.AGENT_POLICY_NAME} is missing")
        else:
            document = policy["PolicyDocument"]
            document = json.loads(document) if isinstance(document, str) else document
            if document != init_mod.agent_policy_for(job, aws.region, aws.account_id()):
                problems.append(f"policy {job.role_name}/{init_mod.AGENT_POLICY_NAME} differs from "
                                "what the agent needs")
    profile = absent(iam.get_instance_profile, InstanceProfileName=job.role_name)
    if profile is None:
        problems.append(f"instance profile {job.role_name} is missing")
    elif not any(r["RoleName"] == job.role_name for r in profile["InstanceProfile"].get("Roles", [])):
        problems.append(f"instance profile {job.role_name} does not hold role {job.role_name}")
    if job.launch.fleet == "spot-fleet":
        if absent(iam.get_role, RoleName=job.launch.spot_fleet_role) is None:
            problems.append(f"spot fleet role {job.launch.spot_fleet_role} is missing")
        else:
            attached = iam.list_attached_role_policies(RoleName=job.launch.spot_fleet_role)["AttachedPolicies"]
            if not any(p["PolicyArn"] == init_mod.SPOT_FLEET_MANAGED_POLICY for p in attached):
                problems.append(f"spot fleet role {job.launch.spot_fleet_role} lacks "
                                f"{init_mod.SPOT_FLEET_MANAGED_POLICY}")
    if job.lease_table:
        table = absent(aws.client("dynamodb").describe_table, "ResourceNotFoundException",
                       TableName=job.lease_table)
        if table is None:
            problems.append(f"lease table {job.lease_table} is missing (the agents would stop on every boot)")
        elif table["Table"].get("TableStatus") not in ("ACTIVE", "UPDATING"):
            problems.append(f"lease table {job.lease_table} is {table['Table'].get('TableStatus')}")
    return problems


def _preflight(aws: Aws, job: Job) -> None:
    """What init must have made, all of it, before anything is created: one message naming
    every missing piece and what to run, instead of agents failing on boot."""
    ec2 = aws.client("ec2")
    if job.launch.availability_zones or job.launch.volume_availability_zone:
        validate.check_zones(job, aws.region, validate.known_zones(ec2))
    problems = _missing(aws, job)
    if problems:
        raise SpotrunError(f"job {job.id} is not ready to launch: {'; '.join(problems)}. "
                           f"Run `spotrun init -f {job.source}` first (it creates only what is missing)")
    completed = [tags.as_dict(v.get("Tags")).get(tags.COMPLETED) for v in find_volumes(ec2, job)]
    if any(completed):
        # The agent would see the completion record, finish at once and cancel the fleet.
        raise SpotrunError(f"job {job.id} completed at {next(c for c in completed if c)}; "
                           "use a new job.id to train again (the volume and its checkpoints stay)")
    live = fleets.find(aws, job.id)
    if live:
        ids = ", ".join(f"{c.kind} {c.id}" for c in live)
        raise SpotrunError(f"job {job.id} already has capacity ({ids}); `spotrun cancel` it first")


def apply(aws: Aws, job: Job, reporter: Reporter, wait: bool = False, timeout_s: float = 900) -> dict:
    stub = validate.render_user_data(job)  # before any call: a stub we can't send stops here
    if not job.launch.image_id:
        raise UsageError(f"{job.source}: launch.image_id: is required to launch")
    _preflight(aws, job)
    if job.dataset_volume:
        job = job.with_source_snapshot(dataset_snapshot(aws, job))
        stub = validate.render_user_data(job)
    ec2 = aws.client("ec2")
    template = _ensure_template(ec2, job, template_data(job, stub))
    kind = job.launch.fleet
    if kind == "ec2-fleet":
        answer = ec2.create_fleet(ClientToken=str(uuid.uuid4()), **ec2_fleet_request(job, template))
        for error in answer.get("Errors", []):
            _log.warning("fleet_launch_error", job=job.id, code=error.get("ErrorCode"),
                         message=error.get("ErrorMessage"))
        fleet_id = answer["FleetId"]
    elif kind == "asg":
        zones = [z["ZoneName"] for z in ec2.describe_availability_zones(
            Filters=[{"Name": "state", "Values": ["available"]}])["AvailabilityZones"]]
        request = asg_request(job, template, list(job.launch.availability_zones) or zones)
        aws.client("autoscaling").create_auto_scaling_group(**request)
        fleet_id = job.group_name
    else:
        role_arn = aws.client("iam").get_role(RoleName=job.launch.spot_fleet_role)["Role"]["Arn"]
        fleet_id = ec2.request_spot_fleet(
            SpotFleetRequestConfig=spot_fleet_request(job, template, role_arn))["SpotFleetRequestId"]
    _log.info("capacity_requested", job=job.id, kind=kind, fleet_id=fleet_id)
    result = {"job": job.id, "launch_template": template, "fleet": {"kind": kind, "id": fleet_id},
              "user_data_bytes": len(stub), "instances": []}
    if wait:
        def running() -> tuple[bool, str]:
            found = [c for c in fleets.find(aws, job.id) if c.id == fleet_id]
            ids = found[0].instance_ids if found else []
            states = [i["State"]["Name"] for i in fleets.describe_instances(aws, ids)]
            result["instances"] = ids
            return "running" in states, ",".join(states) or "no instance yet"

        reporter.wait(f"{kind} {fleet_id} capacity", running, timeout_s)
    return result

"""moto's fleets and Auto Scaling groups, read and mended where moto stops short of EC2.

The one place (with motoserver.py's patches) that reaches into moto's backends: which
instances moto's EC2 Fleets, API-made Spot Fleets and Auto Scaling groups launched, and the
replacement a ``maintain`` fleet launches for a lost member (moto's fleets never replace one).
agents.InstanceAgents calls these on each pass. ``own`` is the cloud's own Spot Fleets
(fleet.py, ``cloud.fleets``): they run their own instances and are left alone.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from spotrun import tags as tagkeys

GONE = ("shutting-down", "terminated")


def backends(account_id: str, region: str) -> tuple[Any, Any]:
    """moto's EC2 and Auto Scaling backends of the cloud's account and region."""
    from moto.autoscaling.models import autoscaling_backends
    from moto.ec2.models import ec2_backends

    return ec2_backends[account_id][region], autoscaling_backends[account_id][region]


def members(ec2: Any, autoscaling: Any, own: Mapping[str, Any],
            api_spot_fleets: set[str]) -> dict[str, tuple[Any, dict[str, str]]]:
    """instance id -> (moto's instance, the reserved tags EC2 puts on it and moto does not)
    for every instance of moto's fleets and groups. Records in ``api_spot_fleets`` the Spot
    Fleets moto itself fulfilled (the cloud's own are made with capacity 0 and registered in
    ``own`` only once started: never "replace" for them in between)."""
    found: dict[str, tuple[Any, dict[str, str]]] = {}
    for fleet in list(ec2.fleets.values()):
        for request in list(fleet.spot_requests):
            found[request.instance.id] = (request.instance, {tagkeys.EC2_FLEET: fleet.id})
        for item in list(fleet.on_demand_instances):
            found[item["instance"].id] = (item["instance"], {tagkeys.EC2_FLEET: fleet.id})
    for request_id, fleet in list(ec2.spot_fleet_requests.items()):
        if request_id in own:
            continue
        for request in list(fleet.spot_requests):
            api_spot_fleets.add(request_id)
            found[request.instance.id] = (request.instance, {tagkeys.SPOT_FLEET_REQUEST: request_id})
    for group in list(autoscaling.autoscaling_groups.values()):
        chosen = _first_override_type(group)
        for state in list(group.instance_states):
            if not state.instance.instance_type and chosen:
                # moto leaves a mixed-instances group's type empty (the template names
                # none); EC2 launches one of the overrides, and says so everywhere.
                state.instance.instance_type = chosen
            found[state.instance.id] = (state.instance, {})  # moto tags these itself
    return found


def replace_lost(ec2: Any, own: Mapping[str, Any], api_spot_fleets: set[str],
                 record_event: Callable[..., Any]) -> None:
    """A ``maintain`` fleet (moto's EC2 Fleets and API-made Spot Fleets) keeps its target:
    a terminated member leaves its requests (moto drops some itself) and a new one is
    launched, as EC2 does."""
    fleets = [f for f in list(ec2.fleets.values())
              if f.fleet_type == "maintain" and f.state == "active"]
    fleets += [f for request_id, f in list(ec2.spot_fleet_requests.items())
               if request_id in api_spot_fleets and request_id not in own and f.state == "active"]
    for fleet in fleets:
        lost = [r.instance.id for r in fleet.spot_requests if r.instance.state in GONE]
        fleet.spot_requests = [r for r in fleet.spot_requests if r.instance.state not in GONE]
        live = len(fleet.spot_requests) + len([
            i for i in getattr(fleet, "on_demand_instances", []) if i["instance"].state not in GONE])
        missing = fleet.target_capacity - live
        if missing <= 0:
            continue
        fleet.fulfilled_capacity = float(live)
        record_event("fleet_replacing", fleet_id=fleet.id, lost=lost, launching=missing)
        fleet.create_spot_requests(missing)


def _first_override_type(group: Any) -> str:
    policy = getattr(group, "mixed_instances_policy", None) or {}
    overrides = policy.get("LaunchTemplate", {}).get("Overrides", [])
    return next((o["InstanceType"] for o in overrides if o.get("InstanceType")), "")

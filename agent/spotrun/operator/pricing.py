"""On-demand list prices for the cost comparison in ``spotrun status`` (an estimate).

Linux, US East (N. Virginia), USD per instance-hour, from the public price list at
https://aws.amazon.com/ec2/pricing/on-demand/ as of 2025-01 (P2/P3/G4dn/G5/G6; P4d/P5 are
left out: AWS cut their prices in mid-2025 and the table would mislead). Other regions
differ by roughly ±20 %; the status output says "estimate" and names this table's date.
The spot side uses DescribeSpotPriceHistory for the instance's own type and AZ.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

TABLE_DATE = "2025-01"
TABLE_SOURCE = "https://aws.amazon.com/ec2/pricing/on-demand/ (us-east-1, Linux)"

ON_DEMAND_USD_PER_HOUR = {
    "p2.xlarge": 0.900, "p2.8xlarge": 7.200, "p2.16xlarge": 14.400,
    "p3.2xlarge": 3.060, "p3.8xlarge": 12.240, "p3.16xlarge": 24.480, "p3dn.24xlarge": 31.212,
    "g4dn.xlarge": 0.526, "g4dn.2xlarge": 0.752, "g4dn.4xlarge": 1.204, "g4dn.12xlarge": 3.912,
    "g5.xlarge": 1.006, "g5.2xlarge": 1.212, "g5.4xlarge": 1.624, "g5.12xlarge": 5.672,
    "g6.xlarge": 0.805, "g6.2xlarge": 0.978, "g6.12xlarge": 4.602,
}


def on_demand(instance_type: str) -> float | None:
    return ON_DEMAND_USD_PER_HOUR.get(instance_type)


def current_spot_prices(ec2: Any, instance_types: list[str]) -> dict[tuple[str, str], float]:
    """{(instance_type, az): USD/hour}, the newest Linux price per pair."""
    if not instance_types:
        return {}
    answer = ec2.describe_spot_price_history(
        InstanceTypes=sorted(set(instance_types)), ProductDescriptions=["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
        StartTime=datetime.now(timezone.utc))
    newest: dict[tuple[str, str], tuple[datetime, float]] = {}
    for item in answer.get("SpotPriceHistory", []):
        if not item.get("ProductDescription", "").startswith("Linux/UNIX"):
            continue
        key = (item["InstanceType"], item["AvailabilityZone"])
        stamp = item.get("Timestamp") or datetime.min.replace(tzinfo=timezone.utc)
        if key not in newest or stamp > newest[key][0]:
            newest[key] = (stamp, float(item["SpotPrice"]))
    return {key: price for key, (_, price) in newest.items()}


def estimate(instances: list[dict], spot_prices: dict[tuple[str, str], float],
             now: datetime | None = None) -> dict[str, Any]:
    """Spot cost so far vs the same hours on demand, over the instances we can still see.

    Uses the current spot price for the whole run (AWS bills the price in effect each
    second, so this drifts when the price moved); terminated instances count until their
    termination time when EC2 still reports it. An instance type missing from the on-demand
    table still costs its spot price: only the comparison leaves it out (``spot_only_types``).
    """
    now = now or datetime.now(timezone.utc)
    hours_total = spot_total = compared_spot = on_demand_total = 0.0
    unpriced, spot_only = set(), set()
    for inst in instances:
        started = inst.get("LaunchTime")
        if not started:
            continue
        ended = inst.get("_ended") or now
        hours = max(0.0, (ended - started).total_seconds() / 3600.0)
        itype, az = inst.get("InstanceType", ""), inst.get("Placement", {}).get("AvailabilityZone", "")
        spot = spot_prices.get((itype, az))
        if spot is None:
            unpriced.add(itype)
            continue
        hours_total += hours
        spot_total += hours * spot
        od = on_demand(itype)
        if od is None:
            spot_only.add(itype)
            continue
        compared_spot += hours * spot
        on_demand_total += hours * od
    saving = (1 - compared_spot / on_demand_total) if on_demand_total else None
    return {"estimate": True, "instance_hours": round(hours_total, 3),
            "spot_usd": round(spot_total, 2), "compared_spot_usd": round(compared_spot, 2),
            "on_demand_usd": round(on_demand_total, 2),
            "savings_percent": round(100 * saving, 1) if saving is not None else None,
            "unpriced_instance_types": sorted(unpriced),
            "spot_only_types": sorted(spot_only),
            "on_demand_table": f"{TABLE_SOURCE}, {TABLE_DATE}"}

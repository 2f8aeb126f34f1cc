"""`status --watch` ends with the job; finished fleets are finished capacity; the cost stops
at termination and is known from the spot price alone (issue 20). On moto's real server."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from spotrun import tags
from spotrun.operator import status as status_mod
from spotrun.operator.aws import Aws

REGION = "us-west-2"


def _ok(spotrun, *argv):
    code, out, err = spotrun(*argv)
    assert code == 0, err
    return json.loads(out) if "--json" in argv else out


@pytest.fixture
def launched(moto, client, job_file, job_id, spotrun):
    def make(types: str = "", **kw):
        path = job_file(**kw)
        if types:
            path.write_text(path.read_text().replace('["p3.2xlarge", "p2.xlarge"]', types))
        _ok(spotrun, "init", "-f", path, "--endpoint-url", moto)
        fleet = _ok(spotrun, "launch", "--json", "-f", path, "--endpoint-url", moto)["fleet"]["id"]
        volume = client("ec2").describe_volumes(Filters=tags.job_filters(job_id))["Volumes"][0]["VolumeId"]
        return path, fleet, volume
    return make


def _watch(spotrun, path, moto):
    # --count bounds the old, endless behaviour so that it fails instead of hanging.
    return spotrun("status", "--watch", "--interval", "0.05", "--count", "20", "-f", path, "--endpoint-url", moto)


def test_watch_ends_when_the_job_is_cancelled(launched, moto, job_id, spotrun):
    """Before the fix the deleted fleet, found through the terminated instances' tags, counted
    as capacity ("deleted_terminating 1/1") and the watch went on for as long as EC2 lists them."""
    path, fleet_id, _ = launched()
    _ok(spotrun, "cancel", "-f", path, "--endpoint-url", moto)
    view = _ok(spotrun, "status", "--json", "-f", path, "--endpoint-url", moto)
    assert view["capacity"] == [] and [c["id"] for c in view["finished_capacity"]] == [fleet_id]
    assert view["outcome"] == "cancelled"
    code, out, err = _watch(spotrun, path, moto)
    assert code == 3 and f"job {job_id} cancelled" in err, err
    assert out.count("phase ") == 1 and f"finished       ec2-fleet {fleet_id}" in out


def test_watch_ends_when_the_job_is_done(launched, moto, client, job_id, spotrun):
    """What the agent does on completion: the record on the volume, then the fleet cancelled."""
    path, fleet_id, volume_id = launched()
    client("ec2").create_tags(Resources=[volume_id], Tags=tags.as_list({
        tags.PHASE: "done", tags.COMPLETED: "2026-01-01T00:00:00+00:00"}))
    client("ec2").delete_fleets(FleetIds=[fleet_id], TerminateInstances=True)
    code, _, err = _watch(spotrun, path, moto)
    assert code == 0 and f"job {job_id} done (completed 2026-01-01T00:00:00+00:00)" in err, err
    assert "capacity still up" not in err


def test_watch_ends_when_the_job_failed_and_says_capacity_is_still_up(launched, moto, client, job_id, spotrun):
    """failure_policy = "keep-running": the fleet stays, the watch still ends, and says so."""
    path, fleet_id, volume_id = launched()
    client("ec2").create_tags(Resources=[volume_id], Tags=tags.as_list({
        tags.PHASE: "failed", tags.FAILURE: "trainer exited 1 three times"}))
    code, _, err = _watch(spotrun, path, moto)
    assert code == 1 and f"job {job_id} FAILED: trainer exited 1 three times" in err, err
    assert f"capacity still up (ec2-fleet {fleet_id})" in err


def test_cost_stops_at_termination_in_motos_utc_form(launched, moto, job_id, spotrun, monkeypatch):
    """moto (so the local cloud) writes 'User initiated (... UTC)'; only '... GMT' was parsed, so
    a cancelled job's cost kept growing: ten hours later it showed ten instance-hours."""
    from spotrun.operator import pricing

    # m5.large: moto has its spot price in us-west-2; an on-demand price makes it fully priced.
    monkeypatch.setitem(pricing.ON_DEMAND_USD_PER_HOUR, "m5.large", 0.096)
    path, _, _ = launched(types='["m5.large"]')
    _ok(spotrun, "cancel", "-f", path, "--endpoint-url", moto)
    later = datetime.now(timezone.utc) + timedelta(hours=10)
    view = status_mod.gather(Aws(region=REGION, endpoint_url=moto), job_id, ["m5.large"], now=later)
    assert [i["state"] for i in view["instances"]] == ["terminated"]
    assert view["cost"]["unpriced_instance_types"] == [] and view["cost"]["on_demand_usd"] < 0.01
    assert view["cost"]["instance_hours"] < 0.1, view["cost"]


@pytest.mark.parametrize("reason, expected", [
    ("User initiated (2017-03-22 19:40:37 GMT)", datetime(2017, 3, 22, 19, 40, 37, tzinfo=timezone.utc)),
    ("User initiated (2024-01-01 12:00:00 UTC)", datetime(2024, 1, 1, 12, tzinfo=timezone.utc)),
    ("Service initiated (2024-01-01T12:00:00.250Z)", datetime(2024, 1, 1, 12, tzinfo=timezone.utc)),
    ("User initiated (2024-01-01 14:00:00+02:00)", datetime(2024, 1, 1, 12, tzinfo=timezone.utc)),
    ("Server.SpotInstanceTermination: Spot instance termination", None),
])
def test_termination_times_in_every_form(reason, expected):
    assert status_mod.transition_time(reason) == expected


def test_cost_from_the_spot_price_alone_when_no_on_demand_price_is_known(launched, moto, job_id):
    """Before the fix: $0.00 for a type missing from the on-demand table, spot price known.
    (moto has spot prices for m5.large in us-west-2; the table has GPU types only.)"""
    from spotrun.operator import pricing

    assert pricing.on_demand("m5.large") is None
    launched(types='["m5.large"]')
    view = status_mod.gather(Aws(region=REGION, endpoint_url=moto), job_id, ["m5.large"],
                             now=datetime.now(timezone.utc) + timedelta(hours=2))
    [inst] = view["instances"]
    assert inst["type"] == "m5.large" and inst["spot_price_usd_per_hour"], view["spot_prices_now"]
    cost = view["cost"]
    # moto's price is $0.00001/h, so the dollars round to 0.00: the hours show it was counted
    # (the estimate's arithmetic is test_status_cancel's test_cost_estimate_compares_with_on_demand).
    assert cost["instance_hours"] >= 2
    assert cost["on_demand_usd"] == 0 and cost["spot_only_types"] == ["m5.large"]
    text = status_mod.render(view)
    assert "from the spot price history only: no on-demand price known for m5.large" in text

"""status reads the agent's progress tags; cancel stops capacity and keeps the volume."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from spotrun import tags
from spotrun.operator import pricing


def _run_ok(spotrun, *argv):
    code, out, err = spotrun(*argv)
    assert code == 0, err
    return json.loads(out) if "--json" in argv else out


@pytest.fixture
def launched(moto, client, job_file, job_id, spotrun):
    path = job_file()
    _run_ok(spotrun, "init", "--json", "-f", path, "--endpoint-url", moto)
    result = _run_ok(spotrun, "launch", "--json", "-f", path, "--endpoint-url", moto)
    volume = client("ec2").describe_volumes(Filters=tags.job_filters(job_id))["Volumes"][0]
    return path, result["fleet"]["id"], volume["VolumeId"]


def _agent_reports(client, volume_id, checkpoint_age_s=90):
    """What the agent writes on the job's volume as it trains (spotrun.tags)."""
    checkpoint = (datetime.now(timezone.utc) - timedelta(seconds=checkpoint_age_s)).isoformat()
    client("ec2").create_tags(Resources=[volume_id], Tags=tags.as_list({
        tags.PHASE: "train", tags.INTERRUPTIONS: "2", tags.COMMIT: "0123abcd",
        tags.PROGRESS: json.dumps({"epoch": 3, "epochs": 30, "step": 120, "steps_per_epoch": 390,
                                   "checkpoint_time": checkpoint}, separators=(",", ":"))}))


def test_status_shows_the_agents_progress(launched, moto, client, job_id, spotrun):
    path, fleet_id, volume_id = launched
    _agent_reports(client, volume_id)
    view = _run_ok(spotrun, "status", "--json", "-f", path, "--endpoint-url", moto)
    assert view["job"] == job_id
    assert view["agent"]["phase"] == "train" and view["agent"]["interruptions"] == 2
    assert view["agent"]["progress"]["epoch"] == 3 and view["agent"]["progress"]["step"] == 120
    assert 80 <= view["agent"]["checkpoint_age_s"] <= 600
    assert [c["id"] for c in view["capacity"]] == [fleet_id]
    assert [v["id"] for v in view["volumes"]] == [volume_id]
    assert view["cost"]["estimate"] is True and "on_demand_table" in view["cost"]
    assert all(i["type"] in ("p3.2xlarge", "p2.xlarge") for i in view["instances"])
    text = _run_ok(spotrun, "status", "-f", path, "--endpoint-url", moto)
    assert "epoch 3/30, step 120/390" in text and "interruptions  2" in text and "estimate" in text
    assert fleet_id in text and volume_id in text
    # By id alone (from any laptop, no job file), with a bounded --watch.
    code, out, err = spotrun("status", "--json", "--job", job_id, "--region", "us-west-2",
                             "--endpoint-url", moto, "--watch", "--interval", "0", "--count", "2")
    assert code == 0, err
    views = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(views) == 2 and all(v["agent"]["phase"] == "train" for v in views)


def test_status_without_a_job_is_a_clear_usage_error(tmp_path, monkeypatch, spotrun):
    monkeypatch.chdir(tmp_path)
    code, _, err = spotrun("status")
    assert code == 2 and "--job" in err


def test_cancel_stops_capacity_and_keeps_the_volume(launched, moto, client, job_id, spotrun):
    path, fleet_id, volume_id = launched
    result = _run_ok(spotrun, "cancel", "--json", "-f", path, "--endpoint-url", moto)
    assert [c["id"] for c in result["cancelled"]] == [fleet_id]
    assert result["volumes_kept"] == [volume_id] and result["volumes_deleted"] == []
    fleet = client("ec2").describe_fleets(FleetIds=[fleet_id])["Fleets"][0]
    assert fleet["FleetState"].startswith("deleted")
    running = client("ec2").describe_instances(Filters=tags.job_filters(job_id) + [
        {"Name": "instance-state-name", "Values": ["pending", "running"]}])["Reservations"]
    assert running == []
    assert client("ec2").describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["State"] == "available"
    view = _run_ok(spotrun, "status", "--json", "-f", path, "--endpoint-url", moto)
    assert view["capacity"] == [] and [v["id"] for v in view["volumes"]] == [volume_id]


def test_delete_volume_refuses_without_a_terminal_or_yes(launched, moto, client, spotrun, monkeypatch):
    path, fleet_id, volume_id = launched
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    code, _, err = spotrun("cancel", "--delete-volume", "-f", path, "--endpoint-url", moto)
    assert code == 2 and "--yes" in err
    # Nothing changed: the fleet still runs, the volume is there.
    assert client("ec2").describe_fleets(FleetIds=[fleet_id])["Fleets"][0]["FleetState"] == "active"
    assert client("ec2").describe_volumes(VolumeIds=[volume_id])["Volumes"]


def test_delete_volume_snapshots_first(launched, moto, client, job_id, spotrun):
    path, _, volume_id = launched
    result = _run_ok(spotrun, "cancel", "--json", "--delete-volume", "--yes", "-f", path, "--endpoint-url", moto)
    [deleted] = result["volumes_deleted"]
    assert deleted["volume"] == volume_id
    snap = client("ec2").describe_snapshots(SnapshotIds=[deleted["snapshot"]])["Snapshots"][0]
    assert snap["VolumeId"] == volume_id and snap["State"] == "completed"
    snap_tags = tags.as_dict(snap["Tags"])
    assert snap_tags[tags.JOB] == job_id and snap_tags[tags.ROLE] == "final-snapshot"
    assert client("ec2").describe_volumes(Filters=tags.job_filters(job_id))["Volumes"] == []


def test_cost_estimate_compares_with_on_demand():
    now = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
    instances = [{"LaunchTime": now - timedelta(hours=2), "InstanceType": "p3.2xlarge",
                  "Placement": {"AvailabilityZone": "us-west-2b"}},
                 {"LaunchTime": now - timedelta(hours=1), "InstanceType": "x9.weird",
                  "Placement": {"AvailabilityZone": "us-west-2b"}},
                 {"LaunchTime": now - timedelta(hours=1), "InstanceType": "x8.nospot",
                  "Placement": {"AvailabilityZone": "us-west-2b"}}]
    cost = pricing.estimate(instances, {("p3.2xlarge", "us-west-2b"): 0.918, ("x9.weird", "us-west-2b"): 1.0}, now)
    # x9.weird has no on-demand price: its spot hours count, the comparison leaves it out.
    assert cost["instance_hours"] == 3.0 and cost["spot_usd"] == 2.84 and cost["on_demand_usd"] == 6.12
    assert cost["compared_spot_usd"] == 1.84 and cost["savings_percent"] == 70.0
    assert cost["spot_only_types"] == ["x9.weird"] and cost["unpriced_instance_types"] == ["x8.nospot"]


def test_spot_prices_are_read_from_the_api(moto, client):
    # moto offers m5.large in us-west-2 (its GPU types have no spot offerings there).
    prices = pricing.current_spot_prices(client("ec2"), ["m5.large"])
    assert prices and all(t == "m5.large" and z.startswith("us-west-2") for t, z in prices)
    assert all(isinstance(p, float) and p > 0 for p in prices.values())


def test_status_on_an_instance_without_a_job_shows_the_local_agent(tmp_path, monkeypatch, spotrun):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_text(json.dumps({
        "phase": "training", "job": "local-job", "instance_id": "i-0123", "az": "us-west-2b",
        "progress": {"epoch": 2, "step": 17}}))
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nstate_dir = "{state_dir}"\n')
    monkeypatch.setenv("SPOTRUN_CONFIG", str(config))
    monkeypatch.chdir(tmp_path)
    code, out, err = spotrun("status")
    assert code == 0, err
    assert "training" in out and "local-job" in out and "epoch 2, step 17" in out

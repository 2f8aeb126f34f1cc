"""One refresh of a sweep's status costs the same AWS calls whatever its number of experiments
(review of issue 19): the spot prices, the volumes, the snapshots, the instances and the
fleets are described once for the whole sweep and split by the job tag, not once per
experiment; every experiment's latest metrics come from one ListMetrics and one GetMetricData
(CloudWatch). Counted at the client (every request botocore sends, pages included) against
moto's real server."""
from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from spotrun import metrics, tags
from spotrun.operator import jobfile
from spotrun.operator import status as status_mod
from spotrun.operator.aws import Aws

REGION = "us-west-2"


def _sweep(job_file, spotrun, client, moto, sweep_id: str, grid: str, path=None) -> jobfile.Job:
    """A sweep launched as one fleet of two instances, every experiment with its volume (as
    its agent makes it), two of them attached to the fleet's instances, one with a snapshot,
    and its metrics in CloudWatch at two steps (the latest: 10 x its number)."""
    path = path or job_file(job_id=sweep_id)
    path.write_text(path.read_text().replace("[launch]", "[launch]\ntarget_capacity = 2")
                    + f"\n[sweep.grid]\n{grid}\n")
    job = jobfile.load(path)
    for command in ("init", "launch"):
        code, _, err = spotrun(command, "--json", "-f", path, "--endpoint-url", moto)
        assert code == 0, err
    ec2 = client("ec2")
    running = [i for r in ec2.describe_instances(Filters=tags.job_filters(sweep_id))["Reservations"]
               for i in r["Instances"]]
    assert len(running) == 2, running
    cloudwatch, now = client("cloudwatch"), int(time.time())
    for n, experiment in enumerate(job.experiments):
        publisher = metrics.MetricsPublisher(cloudwatch, experiment.job_id)
        for step in (n + 1, 10 * (n + 1)):
            publisher.publish({"global_step": step, "time": now - 100 + step,
                               "metrics": {"loss": 1.0 / step, "accuracy": step / 100}})
        zone = running[n % 2]["Placement"]["AvailabilityZone"]
        volume = ec2.create_volume(AvailabilityZone=zone, Size=1, TagSpecifications=[{
            "ResourceType": "volume", "Tags": tags.as_list({
                tags.JOB: experiment.job_id, tags.ROLE: "volume", tags.GENERATION: "1",
                tags.PHASE: "training",
                tags.PROGRESS: json.dumps({"epoch": n + 1, "epochs": 9, "step": 3})})}])["VolumeId"]
        if n < 2:
            ec2.attach_volume(VolumeId=volume, InstanceId=running[n]["InstanceId"], Device="/dev/sdf")
        if n == 0:
            ec2.create_snapshot(VolumeId=volume, TagSpecifications=[{
                "ResourceType": "snapshot", "Tags": tags.as_list({
                    tags.JOB: experiment.job_id, tags.ROLE: "drain-snapshot"})}])
    return job


def _calls(moto, job: jobfile.Job) -> tuple[Counter, dict]:
    aws = Aws(region=REGION, endpoint_url=moto)
    seen: Counter = Counter()
    for service in ("ec2", "autoscaling", "cloudwatch"):
        aws.client(service).meta.events.register(
            "before-call", lambda model, **_: seen.update([model.name]))
    experiments = [(e.name, e.job_id, dict(e.parameters)) for e in job.experiments]
    view = status_mod.gather_sweep(aws, job.id, experiments, list(job.launch.instance_types))
    return seen, view


def test_a_sweeps_status_makes_as_many_calls_for_four_experiments_as_for_two(
        moto, client, job_file, spotrun):
    two = _sweep(job_file, spotrun, client, moto, "calls-two", "lr = [0.1, 0.01]")
    four = _sweep(job_file, spotrun, client, moto, "calls-four",
                  "lr = [0.1, 0.01]\nbatch_size = [64, 128]")
    calls_two, view_two = _calls(moto, two)
    calls_four, view_four = _calls(moto, four)
    # What was found is the same kind of thing either way: every row its own volume and
    # progress, the two attached ones on their instances.
    for view, job in ((view_two, two), (view_four, four)):
        rows = view["experiments"]
        assert [r["job"] for r in rows] == [e.job_id for e in job.experiments]
        assert [r["progress"]["epoch"] for r in rows] == list(range(1, len(rows) + 1))
        assert [len(r["instances"]) for r in rows[:2]] == [1, 1]
        assert [len(v["snapshots"]) for v in view["views"]][:2] == [1, 0]
        assert [r["metrics_step"] for r in rows] == [10 * n for n in range(1, len(rows) + 1)]
        assert [r["metrics"]["loss"] for r in rows] == [
            pytest.approx(1 / (10 * n)) for n in range(1, len(rows) + 1)]
    assert sum(calls_four.values()) == sum(calls_two.values()), (calls_two, calls_four)
    assert calls_four == calls_two
    # Before the metrics column: 0 CloudWatch calls; now 2 (ListMetrics, GetMetricData),
    # whatever the number of experiments.
    assert calls_four["ListMetrics"] == 1 and calls_four["GetMetricData"] == 1
    # One spot-price lookup, one Describe each for the volumes and the snapshots.
    assert calls_four["DescribeSpotPriceHistory"] == 1
    assert calls_four["DescribeVolumes"] == 1 and calls_four["DescribeSnapshots"] == 1




def test_a_sweeps_cost_is_its_instances_once_and_a_row_its_holders_kept_time(
        moto, client, job_file, spotrun, monkeypatch):
    """Before: each row's cost came from the instances tagged with the experiment's job (none:
    the fleet's carry the sweep's tag) or attached to its volume now, so rows showed $0.00
    or an instance's whole life, and the total summed those. Now: the sweep's total counts each
    instance of the sweep once; a row prices the time its holders kept on its volume
    (``spotrun:held``, spotrun.heldtime: EC2 keeps no attach history to apportion by), "-"
    when none did."""
    from datetime import datetime, timedelta, timezone

    from spotrun.operator import pricing

    monkeypatch.setitem(pricing.ON_DEMAND_USD_PER_HOUR, "m5.large", 0.096)
    path = job_file(job_id="sweep-cost")
    path.write_text(path.read_text().replace('["p3.2xlarge", "p2.xlarge"]', '["m5.large"]'))
    job = _sweep(job_file, spotrun, client, moto, "sweep-cost", "lr = [0.1, 0.01]",
                 path=path)
    experiments = [(e.name, e.job_id, dict(e.parameters)) for e in job.experiments]
    # The first experiment held for 90 min in its zone by its holders (two entries of one
    # key add up), and 10 min on a type with no price; the second never tagged.
    ec2 = client("ec2")
    [first] = ec2.describe_volumes(Filters=tags.job_filters(job.experiments[0].job_id))["Volumes"]
    zone = first["AvailabilityZone"]
    ec2.create_tags(Resources=[first["VolumeId"]], Tags=tags.as_list({
        tags.HELD: f"m5.large@{zone}=3600 m5.large@{zone}=1800 x9.huge@{zone}=600"}))
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    view = status_mod.gather_sweep(Aws(region=REGION, endpoint_url=moto), job.id, experiments,
                                   ["m5.large"], now=later)
    price = {(p["type"], p["az"]): p["usd_per_hour"] for p in view["views"][0]["spot_prices_now"]}
    assert [row["cost_usd"] for row in view["experiments"]] == [
        round(1.5 * price[("m5.large", zone)], 2), None]
    cost = view["cost"]
    assert cost["unpriced_instance_types"] == [] and 4 <= cost["instance_hours"] < 4.1, cost
    text = status_mod.render_sweep(view)
    rows = text.splitlines()[2:4]
    # The cost column, then each row's latest metrics.
    assert rows[0].split("  loss ")[0].endswith(f"${view['experiments'][0]['cost_usd']:>8.2f}"), text
    assert rows[1].split("  loss ")[0][-2:] == " -", text
    assert rows[0].endswith("  loss 0.1 acc 0.1") and rows[1].endswith("  loss 0.05 acc 0.2"), text
    assert f"over {cost['instance_hours']:.2f} instance-hours, the whole sweep" in text
    assert "a row's cost: the time its holders kept on its volume" in text


def test_one_wording_of_epoch_and_step_for_every_report():
    from spotrun.progress import epoch_step, training_status

    progress = {"epoch": 3, "epochs": 30, "step": 120, "steps_per_epoch": 390}
    assert epoch_step(progress) == "epoch 3/30, step 120/390"
    assert training_status(progress) == "training epoch 3/30, step 120/390"
    assert epoch_step({"step": 5}) == "epoch ?, step 5" and epoch_step({"epoch": 1}) == "epoch 1"
    assert epoch_step({}) == "" and epoch_step({"unreadable": "x"}) == ""
    row = status_mod.sweep_row("a", {}, {
        "job": "s-a", "volumes": [{}], "instances": [], "outcome": None, "cost": {},
        "agent": {"phase": "training", "progress": progress, "interruptions": 0}}, 1.5)
    text = status_mod.render_sweep({"sweep": "s", "time": "t", "experiments": [row],
                                    "cost": {"spot_usd": 1.5, "instance_hours": 3.0,
                                             "unpriced_instance_types": []},
                                    "cost_note": "n"})
    assert "epoch 3/30, step 120/390" in text and "$    1.50" in text
    assert "               n" in text.splitlines()  # how a row is costed, always said

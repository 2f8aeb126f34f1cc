"""`spotrun status` on a sweep shows each experiment's latest metrics (issue 19): read back from
moto's CloudWatch as the agents' publisher (spotrun.metrics) put them, one read for every
experiment; an experiment that has published none shows "-", and a CloudWatch that cannot be
read leaves the rest of the status as it was, with a note naming the error."""
from __future__ import annotations

import json
import time
from datetime import datetime

import botocore.exceptions
import pytest

from spotrun import metrics
from spotrun.operator import status as status_mod
from spotrun.operator.aws import Aws


def _sweep_file(job_file, job_id):
    path = job_file(job_id=job_id)
    path.write_text(path.read_text() + '\n[[sweep.experiments]]\nname = "a"\n'
                    '\n[[sweep.experiments]]\nname = "bb"\n\n[[sweep.experiments]]\nname = "c"\n')
    return path


def _publish(client, job_id):
    """a and bb publish a few points each, seconds apart (so a minute's average is not the
    latest value); c publishes nothing."""
    cloudwatch = client("cloudwatch")
    now = int(time.time())
    curves = {"a": [(1, 2.0, 0.1), (2, 1.0, 0.5), (3, 0.41234, 0.871)],
              "bb": [(10, 9.0, 0.2), (20, 0.0567891, 0.99)]}
    for name, points in curves.items():
        publisher = metrics.MetricsPublisher(cloudwatch, f"{job_id}-{name}")
        for n, (step, loss, accuracy) in enumerate(points):
            assert publisher.publish({"global_step": step, "time": now - 60 + 3 * n,
                                      "metrics": {"loss": loss, "accuracy": accuracy,
                                                  "val_loss": loss * 2, "lr": 0.001}}) == 5
    return now


def test_each_row_shows_its_own_latest_metrics_and_a_row_without_any_a_dash(
        moto, client, job_file, job_id, spotrun):
    path = _sweep_file(job_file, job_id)
    now = _publish(client, job_id)
    code, out, err = spotrun("status", "-f", path, "--endpoint-url", moto, "--json")
    assert code == 0, err
    rows = {row["name"]: row for row in json.loads(out)["experiments"]}
    assert rows["a"]["metrics"] == pytest.approx(
        {"loss": 0.41234, "val_loss": 0.82468, "accuracy": 0.871, "lr": 0.001})
    assert rows["a"]["metrics_step"] == 3
    assert rows["bb"]["metrics"] == pytest.approx(
        {"loss": 0.0567891, "val_loss": 0.1135782, "accuracy": 0.99, "lr": 0.001})
    assert rows["bb"]["metrics_step"] == 20
    # The datapoint's own time: a's last point went 6 s after its first, bb's 3 s.
    assert [datetime.fromisoformat(rows[n]["metrics_time"]).timestamp() for n in ("a", "bb")] \
        == [now - 54, now - 57]
    assert rows["c"]["metrics"] == {} and rows["c"]["metrics_step"] is None
    assert json.loads(out)["metrics_note"] is None

    code, text, err = spotrun("status", "-f", path, "--endpoint-url", moto)
    assert code == 0, err
    lines = text.splitlines()
    assert lines[1].rstrip().endswith("metrics")
    table = {line.split()[0]: line for line in lines[2:5]}
    # At most three, the preferred first, three significant digits.
    assert table["a"].rstrip().endswith("  loss 0.412 val_loss 0.825 acc 0.871"), text
    assert table["bb"].rstrip().endswith("  loss 0.0568 val_loss 0.114 acc 0.99"), text
    assert table["c"].rstrip().endswith("  -"), text
    assert "metrics could not be read" not in text


def _deny(model, **_):
    raise botocore.exceptions.ClientError(
        {"Error": {"Code": "AccessDenied",
                   "Message": f"not authorized to perform: cloudwatch:{model.name}"}}, model.name)


@pytest.mark.parametrize("failure", ["denied", "unreachable"])
def test_cloudwatch_failing_leaves_the_status_with_a_note(moto, client, job_file, job_id,
                                                          spotrun, monkeypatch, failure):
    path = _sweep_file(job_file, f"{job_id}-{failure}"[:50])
    _publish(client, f"{job_id}-{failure}"[:50])
    real = Aws.client

    def broken(self, service):
        if service == "cloudwatch" and service not in self._clients:
            if failure == "unreachable":  # nothing listens there: connection refused
                self._clients[service] = real(Aws(region=self.region,
                                                  endpoint_url="http://127.0.0.1:9"), service)
            else:
                real(self, service).meta.events.register("before-call", _deny)
        return real(self, service)

    monkeypatch.setattr(Aws, "client", broken)
    code, out, err = spotrun("status", "-f", path, "--endpoint-url", moto, "--json")
    assert code == 0, err
    view = json.loads(out)
    assert [row["metrics"] for row in view["experiments"]] == [None, None, None]
    note = view["metrics_note"]
    assert note.startswith("metrics could not be read from CloudWatch ("), note
    assert ("AccessDenied: not authorized to perform: cloudwatch:ListMetrics" in note
            if failure == "denied" else "EndpointConnectionError" in note), note
    assert [row["phase"] for row in view["experiments"]] == ["not started"] * 3

    code, text, err = spotrun("status", "-f", path, "--endpoint-url", moto)
    assert code == 0, err
    assert all(line.rstrip().endswith("  -") for line in text.splitlines()[2:5]), text
    assert f"metrics        {note}" in text.splitlines()


def test_the_column_is_compact():
    assert status_mod.metrics_text(None) == "-" and status_mod.metrics_text({}) == "-"
    assert status_mod.metrics_text({"zeta": 1234567.0, "accuracy": 0.87, "loss": 0.41249,
                                    "val_accuracy": 1e-05}) \
        == "loss 0.412 acc 0.87 val_acc 1e-05"

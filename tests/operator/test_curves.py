"""Learning curves end to end on moto's CloudWatch (issue 19): the agent's publisher
(spotrun.metrics) sends progress records, `spotrun status --plot` reads them back and draws one
line per job, with its points at the published steps -- checked from the figure's own lines."""
from __future__ import annotations

import json
import math
import time

import pytest

from spotrun import metrics
from spotrun.operator import curves


def loss_at(job: str, step: int) -> float:
    return (1.0 + len(job)) / (1.0 + step)


@pytest.fixture
def published(client, job_id):
    """Two jobs' curves as their agents publish them: a point every few steps, the same step
    offered twice, one record with a value CloudWatch cannot hold."""
    cloudwatch = client("cloudwatch")
    jobs = {f"{job_id}-a": [5, 10, 15, 20], f"{job_id}-bb": [4, 8, 12]}
    sent = {}
    start = int(time.time()) - 600
    for job, steps in jobs.items():
        publisher = metrics.MetricsPublisher(cloudwatch, job)
        counts = []
        for n, step in enumerate(steps):
            record = {"global_step": step, "time": start + 10 * n + 0.5,
                      "metrics": {"loss": loss_at(job, step), "accuracy": step / 100,
                                  "lr": math.nan}}
            counts.append(publisher.publish(record))
            counts.append(publisher.publish({**record, "time": record["time"] + 1}))  # again
        # A later step written in the same second as the last point is kept, a second on.
        last = {"global_step": steps[-1] + 1, "time": start + 10 * (len(steps) - 1) + 0.9,
                "metrics": {"loss": loss_at(job, steps[-1] + 1), "accuracy": 1.0}}
        counts.append(publisher.publish(last))
        steps.append(steps[-1] + 1)
        sent[job] = counts
    return cloudwatch, jobs, sent


def test_each_step_is_published_once_without_values_cloudwatch_cannot_hold(published):
    cloudwatch, jobs, sent = published
    for job, steps in jobs.items():
        # loss, accuracy, global_step; then nothing for the same step again
        assert sent[job] == [3, 0] * (len(steps) - 1) + [3]
        assert curves.metric_names(cloudwatch, job) == ["accuracy", "global_step", "loss"]


def test_the_curves_read_back_are_the_points_published(published):
    cloudwatch, jobs, _ = published
    found = curves.fetch(cloudwatch, [*jobs, "never-published"])
    assert sorted(found) == sorted(jobs)  # a job without metrics is absent, not empty
    for job, steps in jobs.items():
        assert found[job]["loss"] == [(s, pytest.approx(loss_at(job, s))) for s in steps]
        assert found[job]["accuracy"] == [(s, pytest.approx(s / 100)) for s in steps[:-1]] + [
            (steps[-1], 1.0)]


def test_the_plot_draws_one_line_per_job_at_the_published_steps(published, tmp_path):
    cloudwatch, jobs, _ = published
    labels = {job: f"experiment {job[-2:]}" for job in jobs}
    path = tmp_path / "out" / "curves.png"
    drawn = curves.plot(curves.fetch(cloudwatch, list(jobs)), path, labels=labels)
    assert list(drawn) == ["loss", "accuracy"]  # the preferred order
    for name in drawn:
        assert sorted(drawn[name]) == sorted(labels.values())
    for job, steps in jobs.items():
        line = drawn["loss"][labels[job]]
        assert [x for x, _ in line] == steps
        assert all(y == pytest.approx(loss_at(job, int(x))) for x, y in line)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nothing_published_is_a_clear_error_not_an_empty_picture(tmp_path):
    from spotrun.errors import SpotrunError

    with pytest.raises(SpotrunError, match="no learning curves"):
        curves.plot({}, tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


def test_status_plot_draws_a_sweeps_experiments_on_one_figure(moto, client, job_file, job_id,
                                                              spotrun, tmp_path):
    path = job_file(job_id=job_id)
    path.write_text(path.read_text() + '\n[[sweep.experiments]]\nname = "a"\n'
                    '\n[[sweep.experiments]]\nname = "bb"\n\n[[sweep.experiments]]\nname = "c"\n')
    cloudwatch = client("cloudwatch")
    now = int(time.time())
    for name, steps in (("a", [1, 2, 3]), ("bb", [2, 4])):
        publisher = metrics.MetricsPublisher(cloudwatch, f"{job_id}-{name}")
        for n, step in enumerate(steps):
            publisher.publish({"global_step": step, "time": now - 100 + n,
                               "metrics": {"loss": 1.0 / step}})
    out = tmp_path / "curves.png"
    code, text, err = spotrun("status", "-f", path, "--endpoint-url", moto, "--json",
                              "--plot", out)
    assert code == 0, err
    plot = json.loads(text)["plot"]
    assert plot["jobs"] == [f"{job_id}-a", f"{job_id}-bb"]  # c has not published yet
    assert {label: [x for x, _ in points] for label, points in plot["drawn"]["loss"].items()} == {
        "a": [1.0, 2.0, 3.0], "bb": [2.0, 4.0]}
    assert f"learning curves: {out}" in err and "2 of 3 jobs" in err
    assert out.stat().st_size > 1000


def test_latest_is_each_jobs_newest_point_in_one_read(published, client, job_id):
    """`status` on a sweep (issue 19): every job's newest step and values from one ListMetrics
    and one GetMetricData; a job whose points are older than the three high-resolution hours
    is read from the minute data in one more; a job with none is absent."""
    cloudwatch, jobs, _ = published
    old_job = f"{job_id}-old"
    old = metrics.MetricsPublisher(cloudwatch, old_job)
    hours_ago = int(time.time()) - 5 * 3600
    for n, step in enumerate((7, 8)):
        old.publish({"global_step": step, "time": hours_ago + 120 * n,
                     "metrics": {"loss": 1.0 / step}})
    seen = []
    counter = client("cloudwatch")
    counter.meta.events.register("before-call", lambda model, **_: seen.append(model.name))
    found = curves.latest(counter, [*jobs, "never-published"])
    assert seen == ["ListMetrics", "GetMetricData"]
    assert sorted(found) == sorted(jobs)
    for job, steps in jobs.items():
        assert found[job]["step"] == steps[-1]
        assert found[job]["metrics"] == {"loss": pytest.approx(loss_at(job, steps[-1])),
                                         "accuracy": 1.0}
        assert list(found[job]["metrics"]) == ["loss", "accuracy"]  # the preferred order
    seen.clear()
    found = curves.latest(counter, [*jobs, old_job])
    assert seen == ["ListMetrics", "GetMetricData", "GetMetricData"]
    assert found[old_job]["step"] == 8 and found[old_job]["metrics"] == {"loss": 0.125}
    # The minute data's time is its minute bucket's (the point within the minute from it).
    from datetime import datetime
    bucket = datetime.fromisoformat(found[old_job]["time"]).timestamp()
    assert hours_ago + 120 - 60 < bucket <= hours_ago + 120

"""Learning curves, read back from CloudWatch and drawn (``spotrun status --plot curves.png``).

The agent publishes each job's metrics with ``global_step`` at the same timestamp
(spotrun.metrics); here every metric of every job is read with GetMetricData and put at its
step by that timestamp. High-resolution points keep their second for three hours, then
CloudWatch keeps one a minute (and the agent publishes at most one a minute by default), so the
last three hours are read at a 1 s period and the fortnight before them at 60 s: a bucket holds
one point either way. matplotlib (the ``plot`` extra) is imported only to draw.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from spotrun.errors import SpotrunError
from spotrun.metrics import DIMENSION, NAMESPACE, STEP_METRIC, dimensions

# Drawn first, in this order, when logged; then the rest by name. One panel each.
PREFERRED = ("loss", "val_loss", "accuracy", "val_accuracy")
MAX_PANELS = 4
HIGH_RESOLUTION_KEPT = timedelta(hours=3)
MINUTE_DATA_KEPT = timedelta(days=15)

Curves = dict[str, dict[str, list[tuple[int, float]]]]  # job -> metric -> [(step, value)]


def metric_names(cloudwatch: Any, job_id: str) -> list[str]:
    names: set[str] = set()
    for page in cloudwatch.get_paginator("list_metrics").paginate(
            Namespace=NAMESPACE, Dimensions=[{"Name": DIMENSION, "Value": job_id}]):
        names.update(m["MetricName"] for m in page["Metrics"])
    return sorted(names)


def fetch(cloudwatch: Any, job_ids: Sequence[str], *, now: datetime | None = None) -> Curves:
    """Every job's metrics as (step, value) points, in step order; a job with none is absent."""
    now = now or datetime.now(timezone.utc)
    recent = now - HIGH_RESOLUTION_KEPT
    windows = ((now - MINUTE_DATA_KEPT, recent, 60), (recent, now + timedelta(minutes=1), 1))
    found: Curves = {}
    for job_id in job_ids:
        names = metric_names(cloudwatch, job_id)
        if STEP_METRIC not in names:
            continue
        series: dict[str, dict[datetime, float]] = {}
        for start, end, period in windows:
            queries = [{"Id": f"m{n}", "Label": name, "ReturnData": True, "MetricStat": {
                "Metric": {"Namespace": NAMESPACE, "MetricName": name,
                           "Dimensions": dimensions(job_id)},
                "Period": period, "Stat": "Maximum" if name == STEP_METRIC else "Average"}}
                for n, name in enumerate(names)]
            for page in cloudwatch.get_paginator("get_metric_data").paginate(
                    MetricDataQueries=queries, StartTime=start, EndTime=end):
                for result in page["MetricDataResults"]:
                    points = series.setdefault(result["Label"], {})
                    points.update(zip(result["Timestamps"], result["Values"]))
        steps = series.pop(STEP_METRIC, {})
        job: dict[str, list[tuple[int, float]]] = {}
        for name, points in series.items():
            joined = sorted((int(steps[when]), value) for when, value in points.items()
                            if when in steps)
            if joined:
                job[name] = joined
        if job:
            found[job_id] = job
    return found


def panels(curves: Curves) -> list[str]:
    """The metrics to draw, one panel each: the preferred ones first, at most MAX_PANELS."""
    logged = {name for job in curves.values() for name in job}
    ordered = [n for n in PREFERRED if n in logged] + sorted(logged - set(PREFERRED))
    return ordered[:MAX_PANELS]


def plot(curves: Curves, path: Path, *, labels: Mapping[str, str] | None = None,
         title: str = "") -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Draw every job's curves on one figure (a panel per metric, a line per job) into
    ``path``; returns what was drawn, read back from the figure's own lines:
    metric -> line label -> [(step, value)]."""
    if not curves:
        raise SpotrunError("no learning curves to draw: no job has published metrics to "
                           f"CloudWatch (namespace {NAMESPACE}) yet")
    try:
        import matplotlib
    except ImportError:
        raise SpotrunError("drawing the curves needs matplotlib: pip install 'spotrun[plot]'") from None
    matplotlib.use("Agg")  # a file, never a window: this runs on laptops and CI alike
    from matplotlib import pyplot

    names = panels(curves)
    figure, axes = pyplot.subplots(len(names), 1, figsize=(8, 3 * len(names)), squeeze=False)
    drawn: dict[str, dict[str, list[tuple[float, float]]]] = {}
    try:
        for axis, name in zip(axes[:, 0], names):
            for job_id, job in curves.items():
                if name in job:
                    steps, values = zip(*job[name])
                    axis.plot(steps, values, marker=".", label=(labels or {}).get(job_id, job_id))
            axis.set_ylabel(name)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
            axis.legend(fontsize="small")
            drawn[name] = {line.get_label(): list(zip(map(float, line.get_xdata()),
                                                      map(float, line.get_ydata())))
                           for line in axis.get_lines()}
        if title:
            figure.suptitle(title)
        figure.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    finally:
        pyplot.close(figure)
    return drawn

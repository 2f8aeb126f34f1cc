"""Learning curves, read back from CloudWatch and drawn (``spotrun status --plot curves.png``).

The agent publishes each job's metrics with ``global_step`` at the same timestamp
(spotrun.metrics); here every metric of every job is read with GetMetricData and put at its
step by that timestamp. High-resolution points keep their second for three hours, then
CloudWatch keeps one a minute (and the agent publishes at most one a minute by default), so the
last three hours are read at a 1 s period and the fortnight before them at 60 s: a bucket holds
one point either way. matplotlib (the ``plot`` extra) is imported only to draw.

``latest`` reads only each job's newest point, for the metrics column of a sweep's status: one
ListMetrics and one GetMetricData for every experiment together.
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


# -- the latest point of each job, for `spotrun status` on a sweep (issue 19) ----------------

# GetMetricData takes at most 500 queries a call: a refresh reads every job's latest point in
# one call (two when a job's newest point is older than the high-resolution three hours).
MAX_QUERIES = 500

Latest = dict[str, dict[str, Any]]  # job -> {"metrics": {name: value}, "step": int, "time": str}


def listed_names(cloudwatch: Any, job_ids: Sequence[str]) -> dict[str, list[str]]:
    """{job: its metric names} for these jobs, from ONE listing of the namespace (paged),
    however many jobs: ListMetrics filters by one dimension value at a time."""
    wanted = set(job_ids)
    names: dict[str, set[str]] = {}
    for page in cloudwatch.get_paginator("list_metrics").paginate(Namespace=NAMESPACE):
        for metric in page["Metrics"]:
            for dim in metric.get("Dimensions", []):
                if dim.get("Name") == DIMENSION and dim.get("Value") in wanted:
                    names.setdefault(dim["Value"], set()).add(metric["MetricName"])
    return {job: sorted(found) for job, found in names.items()}


def ordered(names: Sequence[str]) -> list[str]:
    """The preferred metrics first (loss, val_loss, accuracy, val_accuracy), then by name."""
    return [n for n in PREFERRED if n in names] + sorted(set(names) - set(PREFERRED))


def _read_points(cloudwatch: Any, wanted: dict[str, list[str]], start: datetime, end: datetime,
                 period: int) -> dict[str, dict[str, dict[datetime, float]]]:
    """job -> metric -> {time: value}, every query in one GetMetricData (paged)."""
    queries, label = [], {}
    for job_id, names in wanted.items():
        for name in names:
            query_id = f"q{len(queries)}"
            label[query_id] = (job_id, name)
            queries.append({"Id": query_id, "ReturnData": True, "MetricStat": {
                "Metric": {"Namespace": NAMESPACE, "MetricName": name,
                           "Dimensions": dimensions(job_id)},
                "Period": period, "Stat": "Maximum" if name == STEP_METRIC else "Average"}})
    found: dict[str, dict[str, dict[datetime, float]]] = {}
    if not queries:
        return found
    for page in cloudwatch.get_paginator("get_metric_data").paginate(
            MetricDataQueries=queries, StartTime=start, EndTime=end,
            ScanBy="TimestampDescending"):
        for result in page["MetricDataResults"]:
            job_id, name = label[result["Id"]]
            found.setdefault(job_id, {}).setdefault(name, {}).update(
                zip(result["Timestamps"], result["Values"]))
    return found


def _newest(series: dict[str, dict[datetime, float]]) -> dict[str, Any] | None:
    """The newest step and, at it, each metric's value (a metric without a point then, such as
    val_loss between epochs: its newest point before it)."""
    steps = series.get(STEP_METRIC) or {}
    if not steps:
        return None
    when = max(steps)
    values = {}
    for name in ordered([n for n in series if n != STEP_METRIC]):
        before = [t for t in series[name] if t <= when]
        if before:
            values[name] = series[name][max(before)]
    if not values:
        return None
    return {"metrics": values, "step": int(steps[when]),
            "time": when.astimezone(timezone.utc).isoformat(timespec="seconds")}


def latest(cloudwatch: Any, job_ids: Sequence[str], *, now: datetime | None = None) -> Latest:
    """Each job's newest published point: its metrics, the step and the time; a job that has
    published none is absent. One ListMetrics (paged) and one GetMetricData for all the jobs,
    however many (a second one only for jobs whose newest point is older than three hours).
    With more metrics than 500 queries hold, each job keeps the preferred ones first."""
    now = now or datetime.now(timezone.utc)
    listed = {job: names for job, names in listed_names(cloudwatch, job_ids).items()
              if STEP_METRIC in names and len(names) > 1}
    if not listed:
        return {}
    per_job = max(2, MAX_QUERIES // len(listed))
    wanted = {job: [STEP_METRIC] + ordered([n for n in names if n != STEP_METRIC])[:per_job - 1]
              for job, names in listed.items()}
    # Whole seconds and minutes: each bucket starts on its period, so a 1 s one is the point's
    # own second and a minute one its minute.
    recent = (now - HIGH_RESOLUTION_KEPT).replace(microsecond=0)
    found: Latest = {}
    points = _read_points(cloudwatch, wanted, recent, now + timedelta(minutes=1), 1)
    for job_id, series in points.items():
        if (point := _newest(series)) is not None:
            found[job_id] = point
    older = {job: names for job, names in wanted.items() if job not in found}
    if older:
        start = (now - MINUTE_DATA_KEPT).replace(second=0, microsecond=0)
        points = _read_points(cloudwatch, older, start, recent, 60)
        for job_id, series in points.items():
            if (point := _newest(series)) is not None:
                found[job_id] = point
    return found


def panels(curves: Curves) -> list[str]:
    """The metrics to draw, one panel each: the preferred ones first, at most MAX_PANELS."""
    return ordered({name for job in curves.values() for name in job})[:MAX_PANELS]


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

"""The trainer's learning curves in CloudWatch (issue 19): the AWS-native place, graphed by the
console too, read back by `spotrun status --plot`.

What is published comes from the trainer's own progress record (``metrics``: the latest values
Keras logged; spotrun_trainer writes them). Each point goes under the namespace ``spotrun`` with
one dimension, ``job`` (the experiment's job id): every metric the trainer logged, plus
``global_step`` at the same timestamp, which is how a reader puts a value at its step (a
CloudWatch metric is a time series; the step is not part of it). Timestamps are whole seconds
and one point per metric per second at most (a step written in the same second as the last
point goes at the next one), so the join by timestamp is exact.

A report, like the progress tags: a failed publish is logged and training goes on; the agent's
IAM policy allows PutMetricData only in this namespace.
"""
from __future__ import annotations

import math
from datetime import datetime, timezone

from spotrun.log import get_logger

NAMESPACE = "spotrun"
DIMENSION = "job"
STEP_METRIC = "global_step"
# PutMetricData takes up to 1,000 metrics a call; a trainer logging more than this many
# names is publishing something other than a learning curve.
MAX_METRICS = 30

log = get_logger("metrics")


def dimensions(job_id: str) -> list[dict[str, str]]:
    return [{"Name": DIMENSION, "Value": job_id}]


def metric_values(progress: dict) -> dict[str, float]:
    """The progress record's metrics CloudWatch can take (named, finite numbers), by name; {}
    for a trainer that reports none (the agent then never makes a CloudWatch client)."""
    values = progress.get("metrics")
    if not isinstance(values, dict):
        return {}
    return {name: float(value) for name, value in sorted(values.items())
            if isinstance(name, str) and 0 < len(name) <= 255 and name != STEP_METRIC
            and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


class MetricsPublisher:
    """Publishes a job's progress records as CloudWatch points, each step once."""

    def __init__(self, cloudwatch, job_id: str):
        self.cloudwatch = cloudwatch
        self.job_id = job_id
        self.last_step: int | None = None
        self.last_second: int | None = None

    def publish(self, progress: dict) -> int:
        """Send ``progress``'s metrics if it is a step not yet published; the number of points
        sent (0 when there was nothing new)."""
        step = progress.get("global_step")
        values = progress.get("metrics")
        written = progress.get("time")
        if (not isinstance(step, int) or isinstance(step, bool) or not isinstance(values, dict)
                or not isinstance(written, (int, float))):
            return 0
        if self.last_step is not None and step <= self.last_step:
            return 0
        # One point per second, so the step joins its values by timestamp exactly: a step
        # written in the second of the last point (the last step, just after a tick) goes at
        # the next second.
        second = int(written)
        if self.last_second is not None and second <= self.last_second:
            second = self.last_second + 1
        numbers = metric_values(progress)
        if not numbers:
            return 0
        when = datetime.fromtimestamp(second, timezone.utc)
        # High resolution: a point keeps its second (for three hours), so a run publishing more
        # often than once a minute still joins each value to its step exactly.
        data = [{"MetricName": name, "Dimensions": dimensions(self.job_id), "Timestamp": when,
                 "Value": value, "StorageResolution": 1}
                for name, value in list(numbers.items())[:MAX_METRICS]]
        data.append({"MetricName": STEP_METRIC, "Dimensions": dimensions(self.job_id),
                     "Timestamp": when, "Value": float(step), "StorageResolution": 1})
        self.cloudwatch.put_metric_data(Namespace=NAMESPACE, MetricData=data)
        self.last_step, self.last_second = step, second
        log.debug("metrics_published", step=step, metrics=sorted(numbers))
        return len(data)

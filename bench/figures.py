"""One benchmark figure: what was measured, its unit, the samples, median and p99, and the
configuration it was measured under. Results are reported against the goals, never asserted."""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence


def median(values: Sequence[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def p99(values: Sequence[float]) -> float | None:
    """Nearest-rank 99th percentile: with fewer than 100 samples it is the largest one,
    which is the honest reading of "p99" for 30 samples (no interpolation past the data)."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def _round(value: Any, digits: int = 4) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def figure(name: str, *, scheme: str, unit: str, samples: Sequence[float] | None = None,
           value: float | None = None, config: dict | None = None, with_p99: bool = True,
           goal: str | None = None, meets: Callable[[dict], bool] | None = None,
           note: str | None = None) -> dict:
    """A figure from samples (median, p99) or from one derived value (ratios, footprints).

    ``value=None`` with no samples means "not applicable" (e.g. a scheme that never
    checkpoints on a notice): median stays None and ``note`` says why."""
    samples = [float(s) for s in (samples or [])]
    entry: dict[str, Any] = {
        "name": name, "scheme": scheme, "unit": unit,
        "samples": [_round(s) for s in samples], "n": len(samples),
        "median": _round(median(samples)) if samples else _round(value),
        "p99": _round(p99(samples)) if samples and with_p99 else None,
        "config": config or {},
    }
    if goal:
        entry["goal"] = goal
        entry["goal_met"] = bool(meets(entry)) if meets and entry["median"] is not None else None
    if note:
        entry["note"] = note
    return entry

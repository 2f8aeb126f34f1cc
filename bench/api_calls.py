"""AWS calls per boot and per drain, counted from the local cloud's call ledger.

The ledger (spotrun/localcloud/ledger.py) is written by the cloud's proxy and names the caller
instance by its own credentials, so these counts are evidence the agent cannot write. Only the
window edges come from elsewhere (the rehearsal's boot and notice times, the agent's phase
events); a call is in a window when the cloud recorded its answer inside it.

Pure functions over ledger records: no cloud needed to test them (tests/bench/test_api_calls.py).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from spotrun.localcloud.ledger import is_mutating

# A read repeated more often than this with nothing changed by its caller in between is shown.
REPEAT_LIMIT = 3


def _key(record: dict) -> str:
    return f"{record.get('service')}:{record.get('action') or record.get('path') or '?'}"


def _in_window(records: Iterable[dict], instance: str, start: float, end: float) -> list[dict]:
    """The instance's own calls answered in [start, end], checker calls left out, in order."""
    return [r for r in records
            if r.get("instance") == instance and not r.get("checker")
            and start <= float(r.get("t") or 0.0) <= end]


def count_calls(records: Iterable[dict], instance: str, start: float, end: float) -> dict[str, Any]:
    """Calls ``instance`` made in [start, end]: total, errors, and one count per service:action
    (most frequent first)."""
    mine = _in_window(records, instance, start, end)
    by_action = Counter(_key(r) for r in mine)
    return {"total": len(mine), "errors": sum(1 for r in mine if r.get("error")),
            "mutating": sum(1 for r in mine if is_mutating(r.get("service"), r.get("action"),
                                                           r.get("method", "POST"))),
            "by_action": dict(sorted(by_action.items(), key=lambda kv: (-kv[1], kv[0])))}


def repeated_unchanged(records: Iterable[dict], instance: str, start: float, end: float,
                       more_than: int = REPEAT_LIMIT) -> list[dict[str, Any]]:
    """Reads ``instance`` repeated more than ``more_than`` times in [start, end] with the same
    action and resources while it changed nothing in that service: the runs, longest first.

    "Nothing changed" is judged from the caller's side only: a mutating call of the same
    instance to the same service ends every run there, its other reads in between do not (a
    loop over device names alternates two reads). A run after a mutating call may be a
    legitimate wait on something the cloud is still changing (a volume attaching); ``after``
    names that call so the reader can judge, as the ledger does not keep the answers."""
    runs: dict[tuple, dict] = {}
    done: list[dict] = []
    last_change: dict[str, str | None] = {}
    for record in _in_window(records, instance, start, end):
        service, action = record.get("service"), record.get("action")
        if is_mutating(service, action, record.get("method", "POST")):
            done += [run for key, run in runs.items() if key[0] == service]
            runs = {key: run for key, run in runs.items() if key[0] != service}
            last_change[service] = action
            continue
        key = (service, action, tuple(record.get("resources") or ()))
        run = runs.setdefault(key, {"action": _key(record), "resources": list(key[2]), "count": 0,
                                    "after": last_change.get(service),
                                    "first_t": record.get("t")})
        run["count"] += 1
        run["last_t"] = record.get("t")
    done += runs.values()
    found = [run for run in done if run["count"] > more_than]
    for run in found:
        run["seconds"] = round(float(run.pop("last_t")) - float(run.pop("first_t")), 3)
    return sorted(found, key=lambda run: -run["count"])


def instance_calls(records: list[dict], instance: dict, more_than: int = REPEAT_LIMIT) -> dict:
    """The boot and drain windows of one instance.

    ``instance``: ``instance_id``, ``kind`` (first / same-az / cross-az), ``boot_wall``,
    ``training_wall`` (None if it never trained), ``notice_wall`` and ``released_wall`` (None
    without a notice or a finished drain). A window without its end is left out (None). The
    drain also says how many calls came after ``released`` (the instance not yet gone)."""
    iid = instance["instance_id"]
    out: dict[str, Any] = {"instance_id": iid, "kind": instance.get("kind"), "boot": None,
                           "drain": None}
    for window, start, end in (("boot", instance.get("boot_wall"), instance.get("training_wall")),
                               ("drain", instance.get("notice_wall"),
                                instance.get("released_wall"))):
        if start is None or end is None:
            continue
        counted = {"instance_id": iid, **count_calls(records, iid, start, end)}
        counted["seconds"] = round(end - start, 3)
        counted["repeated_unchanged"] = repeated_unchanged(records, iid, start, end, more_than)
        if window == "drain":  # released, but not yet terminated: shown, not counted
            counted["after_released"] = count_calls(records, iid, end + 1e-6, float("inf"))["total"]
        out[window] = counted
    return out


def median_sample(windows: list[dict]) -> dict | None:
    """The window whose total is the (lower) median: the one whose breakdown is shown."""
    ordered = sorted(windows, key=lambda w: w["total"])
    return ordered[(len(ordered) - 1) // 2] if ordered else None


def longest_repeat(windows: list[dict]) -> dict | None:
    runs = [run for w in windows for run in w["repeated_unchanged"]]
    return max(runs, key=lambda run: run["count"]) if runs else None


# -- figures ---------------------------------------------------------------------------------

GOALS = {"same-az": 25, "cross-az": 45}  # issue 15: calls per same-AZ boot / per migration
SCHEMES = {"same-az": "spotrun (same-az, {model})", "cross-az": "spotrun (cross-az / migration, {model})",
           "first": "spotrun (first, {model})"}
CONFIG = {
    "counted_by": "the local cloud's call ledger (every request through its proxy, caller named by "
                  "the instance's own access key); checker calls left out",
    "polling": "the agent's waits poll from 0.2 s backing off to their poll interval (ec2._poll): "
               "on a slower timing model, or on AWS, a wait lasts longer and polls more often, so "
               "the Describe* share of these counts is a floor",
    "repeated_unchanged": f"a read with the same action and resources more than {REPEAT_LIMIT} "
                          "times by one instance in one window, with no mutating call of that "
                          "instance to the same service in between; 'after' names the last such "
                          "call (a wait after AttachVolume is a legitimate poll)",
}


def _window_config(windows: list[dict], what: str, timing_model: dict) -> dict:
    sample = median_sample(windows)
    return {**CONFIG, "timing_model": timing_model, "window": what,
            "median_sample": {k: sample[k] for k in ("instance_id", "total", "mutating", "errors",
                                                     "seconds", "after_released", "by_action")
                              if k in sample} if sample else None,
            "longest_repeated_unchanged": longest_repeat(windows),
            "repeated_unchanged_per_sample": [
                [f"{run['action']} {','.join(run['resources'])} ×{run['count']}"
                 f"{' after ' + run['after'] if run['after'] else ''}"
                 for run in w["repeated_unchanged"]] for w in windows]}


def figures(boots: list[dict], timing_model: dict, note: str | None = None) -> list[dict]:
    """api_calls_per_boot per boot kind and api_calls_per_drain, from ``boots`` entries
    carrying ``kind`` and ``api_calls`` (instance_calls's answer), all counted on a local cloud
    under ``timing_model`` (bench.agent_runs.timing_config: ``name`` and ``durations_s``): the
    name goes into every scheme, the whole of it into every config. ``note`` replaces the
    "n/a" of an empty kind (a run left out on purpose says why)."""
    from bench.figures import figure

    model = timing_model["name"]
    out = []
    for kind in ("same-az", "cross-az", "first"):
        windows = [b["api_calls"]["boot"] for b in boots
                   if b["kind"] == kind and b.get("api_calls", {}).get("boot")]
        limit = GOALS.get(kind)
        out.append(figure(
            "api_calls_per_boot", scheme=SCHEMES[kind].format(model=model), unit="calls",
            samples=[w["total"] for w in windows],
            config=_window_config(windows, "the instance boots → the agent starts training", timing_model),
            goal=f"<= {limit} calls" if limit else None,
            meets=(lambda e, limit=limit: e["p99"] <= limit) if limit else None,
            note=None if windows else note or f"n/a: no {kind} boot reached training in this run"))
    drains = [b["api_calls"]["drain"] for b in boots if b.get("api_calls", {}).get("drain")]
    out.append(figure("api_calls_per_drain", scheme=f"spotrun ({model})", unit="calls",
                      samples=[w["total"] for w in drains],
                      config=_window_config(drains, "spot notice posted → the agent released the "
                                                    "volume (phase released)", timing_model),
                      note=None if drains else note or "n/a: no drain finished in this run"))
    return out

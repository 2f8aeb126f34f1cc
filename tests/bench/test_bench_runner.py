"""The bench runner: its statistics, its refusals, and that `--quick` produces well-formed
results for every figure. Timing is never asserted here (the goals are reported, not tested)."""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench.figures import figure, median, p99

ROOT = Path(__file__).resolve().parents[2]

LOCAL_CLOUD_MODELS = ("fast timing model", "aws timing model ×0.25")
EXPECTED = {  # name -> schemes that must have it
    "notice_to_sigterm": {"spotrun (poll 0.25 s)", "spotrun (poll 1 s)", "seed"},
    "notice_to_durable_checkpoint": {"spotrun (poll 0.25 s)", "spotrun (poll 1 s)", "seed"},
    "metadata_requests_per_second_idle": {"spotrun (default intervals)"},
    "work_lost_per_interruption": {"spotrun", "seed (per-epoch ModelCheckpoint)",
                                   "Keras BackupAndRestore(epoch)", "Keras BackupAndRestore(step 3)",
                                   "Keras BackupAndRestore(step 3) + SIGTERM handler that saves"},
    "goodput": {"spotrun", "seed (per-epoch ModelCheckpoint)", "Keras BackupAndRestore(epoch)",
                "Keras BackupAndRestore(step 3)"},
    # Local-cloud figures name their timing model (bench/agent_runs.py timing_label); --quick
    # gives the aws model's entries as notes.
    **{name: {f"spotrun ({kind}, {model})" for kind in kinds for model in LOCAL_CLOUD_MODELS}
       for name, kinds in (("boot_to_training", ("first", "same-az", "cross-az")),
                           ("agent_share_of_boot", ("first", "same-az", "cross-az")),
                           ("api_calls_per_boot", ("first", "same-az", "cross-az / migration")),
                           ("notice_to_durable_checkpoint_whole_agent", ("poll 1 s",)))},
    "api_calls_per_drain": {f"spotrun ({model})" for model in LOCAL_CLOUD_MODELS},
    "steps_redone_whole_agent": {f"spotrun ({model})" for model in LOCAL_CLOUD_MODELS},
    "checkpoint_overhead": {"spotrun (sync, every 1 s)", "spotrun (async, every 1 s)"},
    "idle_agent_rss": {"spotrun agent"},
    "idle_agent_cpu": {"spotrun agent"},
}


def test_median_and_nearest_rank_p99():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([]) is None
    values = list(range(1, 31))  # 30 samples: nearest rank of 0.99 is the largest
    assert p99(values) == 30
    assert p99(list(range(1, 201))) == 198


def test_figure_reports_goal_without_asserting_it():
    met = figure("x", scheme="s", unit="s", samples=[0.2, 0.4, 1.5], goal="p99 <= 1", meets=lambda e: e["p99"] <= 1)
    assert (met["n"], met["median"], met["p99"], met["goal_met"]) == (3, 0.4, 1.5, False)
    na = figure("x", scheme="seed", unit="s", note="never: no checkpoint on a notice")
    assert na["median"] is None and na["n"] == 0 and na["note"].startswith("never")
    single = figure("g", scheme="s", unit="ratio", value=0.98, with_p99=False, goal=">= 0.97",
                    meets=lambda e: e["median"] >= 0.97)
    assert (single["median"], single["p99"], single["goal_met"]) == (0.98, None, True)


def _bench(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "bench.run", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=570)


def test_unknown_figure_group_and_missing_out_directory_are_refused(tmp_path):
    bad = _bench("--only", "reaction,nonsense", "--out", str(tmp_path / "r.json"))
    assert bad.returncode == 2 and "nonsense" in bad.stderr
    missing = _bench("--out", str(tmp_path / "no" / "such" / "r.json"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.fixture
def scratch():
    path = Path(tempfile.mkdtemp(prefix="spotrun-bench-test-"))
    path.chmod(0o755)  # the rehearsals' trainer runs as nobody
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# Runs every figure's real code (~2-4 min on 2 cores): `make bench` runs it before the
# benchmark itself, `make test` leaves it out.
@pytest.mark.bench
@pytest.mark.slow
@pytest.mark.loopdev
def test_quick_run_writes_well_formed_results_for_every_figure(scratch):
    out = scratch / "results.json"
    proc = _bench("--quick", "--out", str(out), "--workdir", str(scratch / "work"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["mode"] == "quick" and results["errors"] == {}
    assert set(results["group_seconds"]) == {"reaction", "schemes", "boots", "overhead", "footprint",
                                              "sweep"}
    seen: dict[str, set] = {}
    for entry in results["figures"]:
        assert {"name", "scheme", "unit", "samples", "n", "median", "p99", "config"} <= set(entry), entry
        assert entry["n"] == len(entry["samples"])
        if entry["samples"]:
            assert min(entry["samples"]) <= entry["median"] <= max(entry["samples"])
            assert entry["p99"] is None or entry["median"] <= entry["p99"] <= max(entry["samples"])
        else:  # a derived value, or a "not applicable" that says why
            assert entry["median"] is not None or entry.get("note"), entry
        if "goal" in entry and entry["median"] is not None:
            assert isinstance(entry["goal_met"], bool)
        seen.setdefault(entry["name"], set()).add(entry["scheme"])
    for name, schemes in EXPECTED.items():
        assert schemes <= seen.get(name, set()), (name, seen.get(name))
    # spotrun's callback checkpoints at the step it was stopped: nothing redone, the seed redoes.
    lost = {e["scheme"]: e for e in results["figures"] if e["name"] == "work_lost_per_interruption"}
    assert lost["spotrun"]["samples"] == [0]
    assert lost["seed (per-epoch ModelCheckpoint)"]["median"] > 0
    sweep = {(e["name"], e["scheme"]): e["median"] for e in results["figures"]
             if e["name"].startswith("sweep_")}
    assert {scheme for _, scheme in sweep} == {"spotrun sweep (zone-first)", "spotrun sweep (in-order)"}
    assert all(0 < sweep[("sweep_goodput", s)] <= 1 for _, s in sweep)
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| ") == len(results["figures"]) + 1  # header + one row per figure

"""`make demo-sweep` (examples/sweep/demo_sweep.py): it fails, naming each check, when nothing was
interrupted and resumed and when the experiments' data did not come from the sweep's dataset
snapshot (issue 19, "data once"), and passes on a real run, whose report is read back here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.loopdev, pytest.mark.slow]

DEMO = Path(__file__).resolve().parents[2] / "examples" / "sweep" / "demo_sweep.py"


def _demo(out, *extra):
    return subprocess.run([sys.executable, str(DEMO), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600)


def test_demo_sweep_fails_without_an_interruption_or_the_dataset_and_passes_with_both(shared_tmp):
    out = shared_tmp / "demo-sweep-out"
    # Both planted in one run (each check is judged and named): no spot notice, and the
    # prepared dataset volume left out of the job file (no snapshot, the experiments start empty).
    quiet = _demo(out, "--no-interrupt", "--no-dataset")
    assert quiet.returncode == 1, quiet.stdout[-2000:] + quiet.stderr[-2000:]
    assert "demo-sweep FAILED" in quiet.stderr and "was not resumed by another instance" in quiet.stderr
    assert "dataset check:" in quiet.stderr, quiet.stderr[-3000:]
    assert "0 CreateSnapshot calls with spotrun:role=dataset-snapshot" in quiet.stderr
    assert "not made from the dataset snapshot" in quiet.stderr
    assert not (out / "report.json").exists()

    demo = _demo(out)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "removing the previous run's state" in demo.stderr
    report = json.loads((out / "report.json").read_text())
    assert [row["experiment"] for row in report["experiments"]] == ["lr0.1", "lr0.03", "lr0.01", "lr0.003"]
    assert all(row["sum_ok"] and len(row["instances"]) >= 1 for row in report["experiments"])
    interrupted = next(r for r in report["experiments"] if r["job"] == report["interrupted"]["job"])
    assert len(interrupted["instances"]) >= 2
    assert len(report["curves"]) == 4 and (out / "curves.png").stat().st_size > 1000
    assert f"learning curves: {out / 'curves.png'}" in demo.stdout
    # Data once: one snapshot of the prepared volume, every experiment's first volume made
    # from it, the prepared bytes on every experiment's volume image (judged in the demo by
    # spotrun.harness.soaksweep.dataset_violations, from the ledger and the images).
    data = report["dataset"]
    jobs = [row["job"] for row in report["experiments"]]
    assert data["snapshot"].startswith("snap-") and data["volume"].startswith("vol-")
    assert data["made_from_it"] == jobs and data["bytes_identical"] == jobs
    assert (f"dataset: one snapshot {data['snapshot']} of {data['volume']}, 4 experiment volumes "
            "made from it, bytes identical") in demo.stdout
    assert any("dataset-snapshot" in line and data["snapshot"] in line  # init's own line
               for line in demo.stdout.splitlines()), demo.stdout[-3000:]

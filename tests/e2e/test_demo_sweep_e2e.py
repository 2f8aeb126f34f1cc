"""`make demo-sweep` (examples/sweep/demo_sweep.py): it fails, naming why, when nothing was
interrupted and resumed, and passes on a real run, whose report is read back here."""
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


def test_demo_sweep_fails_without_an_interruption_and_passes_with_one(shared_tmp):
    out = shared_tmp / "demo-sweep-out"
    quiet = _demo(out, "--no-interrupt")
    assert quiet.returncode == 1, quiet.stdout[-2000:] + quiet.stderr[-2000:]
    assert "demo-sweep FAILED" in quiet.stderr and "was not resumed by another instance" in quiet.stderr

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

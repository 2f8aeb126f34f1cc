"""`make demo` as a newcomer runs it (`spotrun rehearse --out DIR`), twice in the same
directory: a plan whose notice can never land fails naming why, and the rerun starts clean and
shows a real resume — the notice inside training, the replacement training the rest, at most
one step redone — counted from the checkpoints on the volume images."""
import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.loopdev, pytest.mark.slow]


def _rehearse(out, *extra):
    return subprocess.run([sys.executable, "-m", "spotrun", "rehearse", "--out", str(out),
                           "--timeout", "480", *extra],
                          capture_output=True, text=True, timeout=600)


def test_demo_fails_without_a_resume_then_a_rerun_shows_one(shared_tmp):
    out = shared_tmp / "demo-out"

    # A notice for a step after the end is never sent: no resume, and the demo says so.
    missed = _rehearse(out, "--interrupt-at-step", "100000")
    assert missed.returncode == 1, missed.stderr[-3000:]
    assert "rehearse: a fresh run in" in missed.stderr
    assert "no interruption landed at step 100000" in missed.stderr
    assert "Traceback" not in missed.stderr
    assert "FAILED" in (out / "report.txt").read_text()

    # The rerun in the same directory (the defect: CalledProcessError from `git commit`).
    demo = _rehearse(out)
    assert demo.returncode == 0, demo.stderr[-5000:] + demo.stdout[-3000:]
    assert "starting clean: removed the previous run's repo, cloud" in demo.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["failures"] == [] and not report["missed_interruptions"]
    (r,) = report["interruptions"]
    trained = report["steps_trained"]
    assert trained == 192 == report["final_volume"]["completion"]["global_step"]
    # Mid-training: the notice, then the checkpoint, then steps left for the replacement.
    assert r["notice_at_step"] < r["checkpoint_step"] + 1 < trained, r
    assert r["checkpoint_optimizer_iterations"] == r["checkpoint_step"]  # the model's own count
    assert r["resumed_from_source"] == "trainer"
    assert r["steps_redone"] <= 1
    assert r["replacement_trained_steps"] == trained - r["resumed_from_step"] > 0
    whats = [e["what"] for e in report["timeline"]]
    assert any(w.startswith("spot notice posted") for w in whats)
    assert any(w.startswith("trainer exits 75") for w in whats)
    assert whats.index(next(w for w in whats if w.startswith("spot notice posted"))) < \
        whats.index(next(w for w in whats if "durable at step 192" in w))
    text = (out / "report.txt").read_text()
    assert "OK: interrupted mid-training" in text
    assert f"trained {r['replacement_trained_steps']} steps" in text

"""`spotrun rehearse` on a user's own script, as a user types it: a bare `python` in --command
runs, --env reaches the trainer, no notice is sent unless asked for, --interrupt-after sends
exactly one, a job that outruns its asked-for notice is a success with a report saying so, and
a bad --env is a usage error naming it. Notices are judged by the local cloud's own record
(cloud/cloud-events.jsonl, written by the cloud, never the agent), steps by the volume image."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from spotrun.harness.rehearsal import commit_repository

pytestmark = [pytest.mark.loopdev]

COUNTING_TRAINER = Path(__file__).resolve().parents[2] / "agent" / "spotrun" / "harness" / "soak_trainer.py"


def _rehearse(out, repo, *extra, timeout=300):
    return subprocess.run([sys.executable, "-m", "spotrun", "rehearse", "--out", str(out),
                           "--repository", repo, "--timeout", "240", *extra],
                          capture_output=True, text=True, timeout=timeout)


def _notices(out) -> list[dict]:
    events = [json.loads(line) for line in (out / "cloud" / "cloud-events.jsonl").read_text().splitlines()]
    return [e for e in events if e.get("event") == "spot_interruption_notice"]


def _ok(run) -> str:
    return f"rc={run.returncode}\nstderr:\n{run.stderr[-4000:]}\nstdout:\n{run.stdout[-2000:]}"


def test_bare_python_command_runs_without_an_unasked_notice(shared_tmp, counting_repo):
    out = shared_tmp / "out"
    # The trainer's PATH has no python that can import spotrun_trainer: only the resolved
    # interpreter (the one running spotrun) can run the counting trainer to its end.
    run = _rehearse(out, counting_repo, "--command", "python", "train.py")
    assert run.returncode == 0, _ok(run)
    report = json.loads((out / "report.json").read_text())
    assert report["completed"] and report["steps_trained"] == 200, report["failures"]
    assert report["interruptions"] == [] and _notices(out) == []
    assert "OK: finished without an interruption" in run.stdout


def test_env_reaches_the_trainer(shared_tmp, counting_repo):
    out = shared_tmp / "out"
    run = _rehearse(out, counting_repo, "--env", "STEPS=30", "--env", "STEP_S=0.01",
                    "--env", "CKPT_EVERY=5")
    assert run.returncode == 0, _ok(run)
    report = json.loads((out / "report.json").read_text())
    # The counting trainer's default is 200 steps: 30 is only there if --env reached it.
    final = report["final_volume"]  # read from the volume image, not the agent's log
    assert final["checkpoints"][-1]["step"] == 30 == final["completion"]["metrics"]["steps"]
    assert _notices(out) == []


def test_path_prepend_puts_a_directory_first_on_the_trainers_path(shared_tmp):
    out, bin_dir = shared_tmp / "out", shared_tmp / "bin"
    bin_dir.mkdir(mode=0o755)
    # The trainer's own PATH has no `python` that can import spotrun_trainer: only this one can.
    (bin_dir / "python").write_text(f'#!/bin/sh\necho via-path-prepend >&2\nexec {sys.executable} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    repo = commit_repository(shared_tmp / "repo", {"train.py": COUNTING_TRAINER,
                                                   "run.sh": "exec python train.py\n"}, "code")
    run = _rehearse(out, repo, "--path-prepend", str(bin_dir), "--command", "sh", "run.sh",
                    "--env", "STEPS=10", "--env", "CKPT_EVERY=5")
    assert run.returncode == 0, _ok(run)
    report = json.loads((out / "report.json").read_text())
    assert report["final_volume"]["checkpoints"][-1]["step"] == 10
    (log,) = (out / "cloud" / "instances").glob("*/state/trainer.log")
    assert "via-path-prepend" in log.read_text()


@pytest.mark.slow  # ~25 s: a drain, a termination and a replacement's boot
def test_interrupt_after_sends_one_notice_and_the_job_resumes(shared_tmp, counting_repo):
    out = shared_tmp / "out"
    run = _rehearse(out, counting_repo, "--interrupt-after", "1", "--notice-seconds", "8",
                    "--env", "STEPS=300",
                    "--env", "STEP_S=0.02", "--env", "CKPT_EVERY=10")
    assert run.returncode == 0, _ok(run)
    report = json.loads((out / "report.json").read_text())
    notices = _notices(out)
    assert len(notices) == 1, notices
    (r,) = report["interruptions"]
    assert notices[0]["instance_id"] == r["instance_id"]
    assert report["steps_trained"] == 300 and r["replacement_trained_steps"] > 0, r
    assert report["failures"] == []


def test_job_finishing_before_its_asked_step_is_a_success_that_says_so(shared_tmp, counting_repo):
    out = shared_tmp / "out"
    run = _rehearse(out, counting_repo, "--interrupt-at-step", "100000", "--env", "STEPS=20",
                    "--env", "STEP_S=0.01", "--env", "CKPT_EVERY=5")
    assert run.returncode == 0, _ok(run)
    assert "Traceback" not in run.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["failures"] == [] and report["completed"]
    assert [m["target_step"] for m in report["missed_interruptions"]] == [100000]
    text = (out / "report.txt").read_text()
    assert "no interruption landed at step 100000" in text and "not needed" in text
    assert _notices(out) == []


@pytest.mark.parametrize("bad", ["NOEQUALS", "=value"])
def test_bad_env_is_a_usage_error_naming_it(shared_tmp, bad):
    out = shared_tmp / "out"
    run = _rehearse(out, "file:///nonexistent", "--env", bad, timeout=60)
    assert run.returncode == 2, _ok(run)
    assert "--env" in run.stderr and repr(bad) in run.stderr
    assert "Traceback" not in run.stderr
    assert not out.exists()  # refused before anything was made


@pytest.mark.slow  # ~25 s: a drain, a termination and a replacement's boot
def test_interrupt_on_file_sends_the_notice_once_that_file_is_on_the_volume(shared_tmp, counting_repo):
    out = shared_tmp / "out"
    run = _rehearse(out, counting_repo, "--interrupt-on-file", "checkpoints/spotrun/ckpt-*03",
                    "--notice-seconds", "8", "--env", "STEPS=300", "--env", "STEP_S=0.02",
                    "--env", "CKPT_EVERY=10")
    assert run.returncode == 0, _ok(run)
    notices = _notices(out)
    report = json.loads((out / "report.json").read_text())
    (r,) = report["interruptions"]
    assert [n["instance_id"] for n in notices] == [r["instance_id"]]
    # Read from the released volume's image: the third save was there before the notice.
    assert r["checkpoint"] >= "ckpt-000000000003", r
    assert report["steps_trained"] == 300 and report["failures"] == []


@pytest.mark.parametrize("bad", ["/dltraining/checkpoints/*", "../elsewhere/*", " "])
def test_a_file_glob_outside_the_volume_is_a_usage_error(shared_tmp, bad):
    out = shared_tmp / "out"
    run = _rehearse(out, "file:///nonexistent", "--interrupt-on-file", bad, timeout=60)
    assert run.returncode == 2, _ok(run)
    assert "--interrupt-on-file" in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()


@pytest.mark.slow  # ~30 s: a drain ahead of the event, the retirement and a replacement's boot
def test_maintenance_after_retires_the_instance_and_the_job_resumes(shared_tmp, counting_repo):
    out = shared_tmp / "out"
    run = _rehearse(out, counting_repo, "--maintenance-after", "1", "--notice-seconds", "6",
                    "--env", "STEPS=300", "--env", "STEP_S=0.02", "--env", "CKPT_EVERY=10")
    assert run.returncode == 0, _ok(run)
    events = [json.loads(line) for line in (out / "cloud" / "cloud-events.jsonl").read_text().splitlines()]
    scheduled = [e for e in events if e.get("event") == "maintenance_scheduled"]
    report = json.loads((out / "report.json").read_text())
    (r,) = report["interruptions"]
    assert [e["instance_id"] for e in scheduled] == [r["instance_id"]] and _notices(out) == []
    assert scheduled[0]["code"] == "instance-retirement"
    terminated = [e["instance_id"] for e in events if e.get("event") == "instance_terminated"]
    assert r["instance_id"] in terminated
    assert r["cause"] == "instance-retirement" and r["replacement_trained_steps"] > 0, r
    assert report["steps_trained"] == 300 and report["failures"] == []
    assert "scheduled instance-retirement event reached" in run.stdout

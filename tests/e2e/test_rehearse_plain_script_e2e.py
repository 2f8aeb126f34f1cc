"""#18's acceptance: the README's "Rehearse your own script" command, as written there: a
script in the seed's style (examples/plain_script: per-epoch ModelCheckpoint, hard-coded
/dltraining, no signal handling, no progress file) rehearses unchanged, as the unprivileged
trainer user, under two time-based notices and one rebalance recommendation. Judged by the
local cloud's own record (cloud-events.jsonl), the bytes on the job's volume image (the
files, their owner, their epoch numbers, read with debugfs), the trainer's own output and the
host's /dltraining, never by the agent's log."""
import json
import os
import pwd
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from spotrun.harness.rehearsal import commit_repository
from spotrun.harness.rehearsal_volume import list_script_files

pytestmark = [pytest.mark.loopdev, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "examples/plain_script/train.py"
EPOCHS = 16  # the script's default


def readme_command() -> list[str]:
    """The command in the README's "Rehearse your own script" section, as a user types it."""
    section = (ROOT / "README.md").read_text().split("## Rehearse your own script", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))
HOST_MOUNT_POINT = Path("/dltraining")


def _host_mount_point_empty() -> bool:
    return not HOST_MOUNT_POINT.exists() or not any(HOST_MOUNT_POINT.iterdir())


def test_seed_style_script_resumes_from_its_newest_file_on_its_own_volume(shared_tmp):
    if not _host_mount_point_empty():
        pytest.skip(f"{HOST_MOUNT_POINT} on this machine holds files: cannot judge what a run adds")
    argv = readme_command()
    assert argv[:2] == [".venv/bin/spotrun", "rehearse"], argv
    # The README clones this checkout (file://$PWD, ref main); here a repository holding the
    # same script at the same path stands for it, so uncommitted work is what is tested.
    repo = commit_repository(shared_tmp / "repo", {SCRIPT: ROOT / SCRIPT}, "the plain script")
    out = shared_tmp / "out"
    flags = {"--repository": repo, "--out": str(out)}
    args = [flags.get(prev, arg) for prev, arg in zip([None] + argv[2:], argv[2:])]
    assert args.count(repo) == 1 and args.count(str(out)) == 1, args
    run = subprocess.run([sys.executable, "-m", "spotrun", "rehearse", *args,
                          "--trainer-user", "nobody", "--timeout", "420"],
                         capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, f"rc={run.returncode}\n{run.stderr[-5000:]}\n{run.stdout[-3000:]}"

    events = [json.loads(line) for line in (out / "cloud" / "cloud-events.jsonl").read_text().splitlines()]
    notices = [e["instance_id"] for e in events if e.get("event") == "spot_interruption_notice"]
    rebalanced = [e["instance_id"] for e in events if e.get("event") == "rebalance_recommendation"]
    assert len(notices) == 2 and len(set(notices)) == 2, events
    assert len(rebalanced) == 1 and rebalanced[0] == notices[0], (rebalanced, notices)

    report = json.loads((out / "report.json").read_text())
    assert report["completed"] and report["failures"] == [], report["failures"]
    rows = report["script_interruptions"]
    assert [r["instance_id"] for r in rows] == notices
    for r in rows:
        assert r["trainer_returncode"] == -15, r  # no handler: SIGTERM ended it
        assert r["resumed_from_newest"] is True, r
        assert r["training_lost_s"] is not None and r["training_lost_s"] >= 0, r
    assert any(r["newest_checkpoint_number"] for r in rows), "no notice came after a checkpoint"

    # The volume image itself: every epoch's file once, written by the trainer user, whole.
    (volume,) = report["volumes_left"]
    (image,) = (out / "cloud" / "ebs" / "volumes").glob(f"{volume['id']}*")
    files = list_script_files(image, check_newest=EPOCHS)
    names = sorted(Path(f["path"]).name for f in files)
    assert names == [f"cifar10_model.{n:03d}.keras" for n in range(1, EPOCHS + 1)], names
    assert {f["uid"] for f in files} == {pwd.getpwnam("nobody").pw_uid}
    assert all(f["intact"] for f in files), [f for f in files if not f["intact"]]

    # Each replacement's trainer started where the volume said (its own words, once per boot),
    # and the rebalance did not kill the first one (it would have started twice there).
    starts = {}
    for log in (out / "cloud" / "instances").glob("*/state/trainer.log"):
        starts[log.parts[-3]] = [line for line in log.read_text().splitlines()
                                 if line.startswith("starting at epoch")]
    assert len(starts[notices[0]]) == 1, starts
    assert starts[notices[0]] == ["starting at epoch 1"]
    for row in rows:
        assert starts[row["replacement"]] == [
            f"starting at epoch {(row['newest_checkpoint_number'] or 0) + 1}"], (row, starts)
    (rebalance,) = report["rebalances"]
    assert rebalance["trainer_next_exit"]["returncode"] == -15  # at the notice, not -10 before

    assert _host_mount_point_empty(), sorted(os.listdir(HOST_MOUNT_POINT))
    assert "training lost" in run.stdout and "advice:" in run.stdout


def test_compare_with_callback_replays_the_schedule_with_spotruns_trainer(shared_tmp):
    repo = commit_repository(shared_tmp / "repo", {SCRIPT: ROOT / SCRIPT}, "the plain script")
    out = shared_tmp / "out"
    run = subprocess.run(
        [sys.executable, "-m", "spotrun", "rehearse", "--out", str(out), "--repository", repo,
         "--command", "python", SCRIPT, "--env", "EPOCHS=8", "--interrupt-after", "12",
         "--notice-seconds", "8", "--compare-with-callback", "--timeout", "300"],
        capture_output=True, text=True, timeout=700)
    assert run.returncode == 0, f"rc={run.returncode}\n{run.stderr[-5000:]}\n{run.stdout[-3000:]}"
    comparison = json.loads((out / "report.json").read_text())["compare_with_callback"]
    (row,) = comparison["interruptions"]
    assert row["script_training_lost_s"] is not None and comparison["callback_failures"] == []
    # The second run is a run of its own: its cloud's record, its volume images.
    second = out / "with-callback"
    events = [json.loads(line) for line in (second / "cloud" / "cloud-events.jsonl").read_text().splitlines()]
    assert len([e for e in events if e.get("event") == "spot_interruption_notice"]) == 1
    callback = json.loads((second / "report.json").read_text())
    (theirs,) = callback["interruptions"]
    assert callback["completed"] and theirs["steps_redone"] is not None and theirs["steps_redone"] <= 1
    assert row["callback_steps_redone"] == theirs["steps_redone"]
    assert "with spotrun's callback" in run.stdout

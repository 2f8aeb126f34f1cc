"""`spotrun rehearse --sweep` without a cloud (issue 19): the plan's checks, the per-experiment
figures read from a ledger and a runs log, and the verdict failing on each planted fault. The
whole run, against the local cloud: tests/e2e/test_demo_sweep_e2e.py."""
import json
import subprocess
import sys

import pytest

from spotrun import migration as M
from spotrun import tags
from spotrun.harness import rehearsal_sweep as RS


def test_experiments_are_named_by_rate_and_their_steps_spread_out():
    assert RS.experiment_steps(4) == {"lr0.1": 240, "lr0.03": 200, "lr0.01": 160, "lr0.003": 120}
    eight = RS.experiment_steps(8)
    assert list(eight.values())[-3:] == [80, 80, 80]
    for bad in (0, 9):
        with pytest.raises(ValueError, match="--experiments: 1 to 8"):
            RS.experiment_steps(bad)


@pytest.mark.parametrize("kwargs, words", [
    ({"capacity": 5}, "--capacity: 1 to the number of experiments (4), not 5"),
    ({"interrupts": 5}, "--interrupts: 0 to the number of experiments (4), not 5"),
    ({"member_zones": "fixed:us-east-1a"}, "--az-policy (with --sweep)"),
    ({"sweep_id": "a b"}, "--job 'a b'"),
    ({"sweep_id": "x" * 60}, "at most 63 characters"),
])
def test_a_bad_plan_is_refused_naming_the_option(tmp_path, kwargs, words):
    with pytest.raises(ValueError) as refused:
        RS.SweepPlan(out=tmp_path, **kwargs)
    assert words in str(refused.value)


def test_the_job_file_names_every_experiment_the_dataset_and_the_claim_policy(tmp_path):
    import tomllib

    plan = RS.SweepPlan(out=tmp_path, experiments=3, capacity=3, claim="in-order")
    job = tomllib.loads(RS.SweepRehearsal(plan).job_file("file:///repo", "vol-0123"))
    assert job["sweep"] == {"claim": "in-order", "dataset_volume": "vol-0123", "experiments": [
        {"name": "lr0.1", "args": ["--lr", "0.1"], "env": {"STEPS": "240"}},
        {"name": "lr0.03", "args": ["--lr", "0.03"], "env": {"STEPS": "200"}},
        {"name": "lr0.01", "args": ["--lr", "0.01"], "env": {"STEPS": "160"}}]}
    assert job["launch"]["target_capacity"] == 3
    without = RS.SweepRehearsal(RS.SweepPlan(out=tmp_path, dataset=False)).job_file("file:///r", "vol-1")
    assert "dataset_volume" not in tomllib.loads(without)["sweep"]


def test_steps_redone_are_those_each_run_reached_beyond_the_checkpoint_the_next_resumed_from():
    drained = [{"resumed_from": 0, "reached_before": None}, {"resumed_from": 95, "reached_before": 95}]
    assert RS.steps_redone(drained) == 0
    killed_twice = [{"resumed_from": 0, "reached_before": None},
                    {"resumed_from": 40, "reached_before": 50},  # killed at 50, checkpoint at 40
                    {"resumed_from": 40, "reached_before": 45}]  # killed again before 60
    assert RS.steps_redone(killed_twice) == 15
    assert RS.steps_redone([]) is None


def test_the_runs_log_is_read_from_the_volume_image_and_a_torn_last_line_is_skipped(tmp_path):
    image = tmp_path / "vol-1"  # a directory-backed volume, as the cloud without loop devices
    (image / "checkpoints").mkdir(parents=True)
    (image / RS.RUNS_LOG).write_text('{"resumed_from": 0, "reached_before": null}\n'
                                     '{"resumed_from": 20, "reached_before": 27}\n{"resum')
    runs, error = RS.read_runs_log(image)
    assert error is None and RS.steps_redone(runs) == 7
    (image / RS.RUNS_LOG).unlink()
    assert RS.read_runs_log(image) == ([], f"{RS.RUNS_LOG}: not on the volume")
    assert "no such volume image" in RS.read_runs_log(tmp_path / "vol-gone")[1]


def _create_volume(seq, job, instance, origin=None):
    record_tags = {tags.JOB: job, **({M.ORIGIN: origin} if origin else {})}
    return {"seq": seq, "t": float(seq), "service": "ec2", "action": "CreateVolume",
            "instance": instance, "tags": record_tags, "created": [f"vol-{seq}"], "status": 200}


def _lease(seq, job, holder, finished=False):
    return {"seq": seq, "t": float(seq), "service": "dynamodb", "action": "PutItem",
            "instance": holder, "item": {"job": job, "holder": holder, "finished": finished},
            "status": 200}


def test_the_lease_was_held_from_each_claim_to_the_write_that_let_it_go_or_passed_it_on():
    writes = [{"seq": 1, "t": 10.0, "holder": "i-1"}, {"seq": 2, "t": 12.0, "holder": "i-1"},
              {"seq": 3, "t": 15.0, "holder": None}, {"seq": 4, "t": 20.0, "holder": "i-2"},
              {"seq": 6, "t": 31.0, "holder": None}, {"seq": 5, "t": 25.0, "holder": "i-3"}]
    assert RS.lease_seconds(writes) == 5.0 + 5.0 + 6.0
    assert RS.lease_seconds([]) == 0.0


def test_migrations_count_the_volumes_made_beyond_the_first_and_holders_keep_their_order():
    ledger = [_create_volume(1, "s-a", "i-1", M.FROM_DATASET[M.ORIGIN]),
              _create_volume(2, "s-a", "i-2"),  # made again from a snapshot in another zone
              _create_volume(3, "s-b", "i-2", M.CREATED_EMPTY[M.ORIGIN]),
              _create_volume(4, "s-a", None)]  # the operator's, not a migration
    assert RS.migrations(ledger, "s-a") == 1 and RS.migrations(ledger, "s-b") == 0
    writes = [{"holder": "i-2"}, {"holder": None}, {"holder": "i-1"}, {"holder": "i-2"}]
    assert RS.holders_in_order(writes) == ["i-2", "i-1"]


def _report(**over):
    rows = [{"experiment": "lr0.1", "job": "s-lr0.1", "steps": 240, "volume": "vol-1",
             "instances": ["i-1", "i-2"], "zones": ["us-east-1a", "us-east-1b"], "notices": 1,
             "migrations": 1, "trainer_runs": 2, "steps_redone": 0, "runs_log_error": None,
             "completed": True, "held_s": 14, "lease_s": 15.6},
            {"experiment": "lr0.03", "job": "s-lr0.03", "steps": 200, "volume": "vol-2",
             "instances": ["i-2"], "zones": ["us-east-1b"], "notices": 0, "migrations": 0,
             "trainer_runs": 1, "steps_redone": 0, "runs_log_error": None, "completed": True,
             "held_s": 11, "lease_s": 11.9}]
    report = {"sweep": "s", "capacity": 2, "claim": "zone-first", "member_zones": "random:1",
              "experiments": rows, "missed": [], "violations": [], "dataset_violations": [],
              "interrupted": [{"job": "s-lr0.1", "experiment": "lr0.1", "instance": "i-1",
                               "at_step": 60}],
              "fleet_deleted_by": "i-2", "plot": "/x/curves.png", "curves": {"lr0.1": 9, "lr0.03": 8},
              "dataset": {"volume": "vol-d", "snapshot": "snap-1", "made_from_it": ["s-lr0.1", "s-lr0.03"],
                          "bytes_identical": ["s-lr0.1", "s-lr0.03"], "files": {"datasets/a": 3}}}
    report.update(over)
    return report


def test_the_verdict_passes_a_sweep_done_right_and_its_table_shows_each_experiment():
    report = _report()
    assert RS.verdict(report) == []
    text = RS.format_report(report)
    assert ("lr0.1       240    i-1 (1a), i-2 (1b)  1        1           0       14/15.6       "
            "yes, sum right") in text
    assert "notice: i-1 while it trained lr0.1 (step 60)" in text
    assert "learning curves: /x/curves.png (2 curves)" in text


@pytest.mark.parametrize("plant, words", [
    (lambda r: r["experiments"][0].update(instances=["i-1"]),
     "s-lr0.1 was not resumed by another instance after the notice to i-1"),
    (lambda r: r["experiments"][0].update(instances=["i-2", "i-1"]),  # i-1 last: nobody after it
     "was not resumed by another instance"),
    (lambda r: r["missed"].append("notice 2 of 2 never sent"), "notice 2 of 2 never sent"),
    (lambda r: r["violations"].append("sweep finished once: s-lr0.1 ended with sum 1"),
     "1 sweep violation(s): sweep finished once"),
    (lambda r: r["dataset_violations"].append("sweep data once: 0 CreateSnapshot calls"),
     "dataset check: 1 violation(s)"),
    (lambda r: r["experiments"][1].update(steps_redone=None, runs_log_error="unreadable"),
     "s-lr0.03: steps redone unknown (unreadable)"),
    (lambda r: r["curves"].pop("lr0.03"), "the figure has 1 curves, not 2"),
    (lambda r: r["experiments"][1].update(held_s=0), "s-lr0.03: no held time on its volume"),
    (lambda r: r["experiments"][1].update(held_s=30), "30 s held by its volume's tag, more than "
                                                       "the 11.9 s its lease was held"),
])
def test_the_verdict_names_each_planted_fault(plant, words):
    report = _report()
    plant(report)
    failures = RS.verdict(report)
    assert any(words in f for f in failures), failures


def _rehearse(*argv, cwd):
    return subprocess.run([sys.executable, "-m", "spotrun", "rehearse", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv, words", [
    (["--sweep", "--repository", "file:///x"], "--repository: not with --sweep"),
    (["--sweep", "--interrupt-at-step", "5"], "--interrupt-at-step: not with --sweep"),
    (["--sweep", "--capacity", "7", "--experiments", "6"], "--capacity: 1 to the number of experiments (6), not 7"),
    (["--experiments", "3"], "--experiments: only with --sweep"),
    (["--no-dataset"], "--no-dataset: only with --sweep"),
    (["--sweep", "--interrupts", "-1"], "argument --interrupts: '-1': want a whole number >= 0"),
    (["--sweep", "--capacity", "0"], "want a whole number >= 1"),
])
def test_bad_arguments_exit_2_naming_the_option_and_start_nothing(tmp_path, argv, words):
    done = _rehearse(*argv, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert words in done.stderr
    assert not (tmp_path / "out").exists()

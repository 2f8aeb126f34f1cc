"""Every local-cloud boot figure names the timing model it ran under, and the name is checked
against the model's durations (bench/agent_runs.py: timing_label, figures, check_timing_labels)."""
from __future__ import annotations

import pytest

from bench import agent_runs
from bench.api_calls import instance_calls
from spotrun.localcloud import TimingModel

FAST = TimingModel.fast()
AWS_QUARTER = TimingModel.aws_like().scaled(0.25)
I1 = "i-0aaaaaaaaaaaaaaaa"


def _run(timing, kinds=("first", "same-az", "cross-az")) -> dict:
    """boots()'s answer for a job whose instances booted as ``kinds``, each making two calls."""
    ledger, boots = [], []
    for n, kind in enumerate(kinds):
        iid = f"i-{n:017x}"
        ledger += [{"t": 10 * n + 1.5, "service": "ec2", "action": "DescribeVolumes", "instance": iid,
                    "resources": [], "method": "POST"},
                   {"t": 10 * n + 5.5, "service": "ec2", "action": "CreateSnapshot", "instance": iid,
                    "resources": [], "method": "POST"}]
        boots.append({"kind": kind, "az": "us-east-1a", "boot_to_training_s": 3.0 + n,
                      "agent_share_s": 3.0 + n - agent_runs.modelled_waits(timing, kind), "phases": {},
                      "api_calls": instance_calls(ledger, {
                          "instance_id": iid, "kind": kind, "boot_wall": 10 * n + 1.0,
                          "training_wall": 10 * n + 2.0, "notice_wall": 10 * n + 5.0,
                          "released_wall": 10 * n + 6.0})})
    return {"boots": boots, "completed": True, "timing_model": agent_runs.timing_config(timing), "notice_s": 8.0,
            "interruptions": [{"notice_to_durable_checkpoint_s": 0.4, "steps_redone": 0}]}


def test_modelled_waits_are_the_given_model_s():
    aws = TimingModel.aws_like()
    assert agent_runs.modelled_waits(aws, "same-az") == aws.detach_after_terminate_s + aws.attach_s == 65.0
    assert agent_runs.modelled_waits(aws, "cross-az") == aws.volume_create_s + aws.attach_s == 10.0
    assert agent_runs.modelled_waits(AWS_QUARTER, "same-az") == pytest.approx(65.0 * 0.25)
    assert agent_runs.modelled_waits(FAST, "first") == pytest.approx(FAST.volume_create_s + FAST.attach_s)
    assert agent_runs.modelled_waits(FAST, "same-az") != agent_runs.modelled_waits(aws, "same-az")
    assert agent_runs.modelled_waits(aws, "cross-az", pending_s=40.0) == 50.0
    assert agent_runs.modelled_waits(aws, "same-az", pending_s=0.0) == aws.attach_s


def test_what_was_still_pending_at_boot_comes_from_the_ledger_under_the_model_that_ran():
    def call(t, action, **kw):
        return {"t": t, "service": "ec2", "action": action, "instance": I1, **kw}

    ledger = [call(100.0, "CreateSnapshot"), call(110.0, "CreateSnapshot"),
              call(111.0, "CreateSnapshot", checker=True), call(112.0, "CreateSnapshot", error="Boom"),
              call(112.5, "DescribeSnapshots"), call(113.0, "DetachVolume"),
              call(130.0, "CreateSnapshot"), call(131.0, "DetachVolume")]  # after the boot
    aws = TimingModel.aws_like()
    assert agent_runs.pending_at_boot(ledger, aws, "cross-az", 120.0) == 50.0  # 110 + 60 - 120
    assert agent_runs.pending_at_boot(ledger, AWS_QUARTER, "cross-az", 120.0) == 5.0  # 110 + 15 - 120
    assert agent_runs.pending_at_boot(ledger, FAST, "cross-az", 120.0) == 0.0
    assert agent_runs.pending_at_boot(ledger, aws, "same-az", 120.0) == 3.0  # 113 + 10 - 120
    assert agent_runs.pending_at_boot(ledger, FAST, "same-az", 120.0) == 0.0
    assert agent_runs.pending_at_boot(ledger[4:5], aws, "cross-az", 120.0) == 0.0
    # A drain that never detached: the volume waits out in-use-after-terminate.
    assert agent_runs.pending_at_boot(ledger[:5], aws, "same-az", 120.0) is None
    assert agent_runs.modelled_waits(aws, "same-az", None) == 65.0
    assert agent_runs.pending_at_boot(ledger, aws, "first", 120.0) is None


def test_each_model_has_one_name_and_an_unnamed_model_is_refused():
    assert agent_runs.timing_label(FAST) == "fast timing model"
    assert agent_runs.timing_label(TimingModel.named("aws")) == "aws timing model"
    assert agent_runs.timing_label(AWS_QUARTER) == "aws timing model ×0.25"
    assert agent_runs.timing_label(TimingModel.instant()) == "instant timing model"
    with pytest.raises(ValueError, match="no name"):
        agent_runs.timing_label(TimingModel(snapshot_s=42.0))
    config = agent_runs.timing_config(AWS_QUARTER)
    assert config["durations_s"]["snapshot_s"] == 15.0 and config["measured_on"] == "local cloud"


@pytest.mark.parametrize("timing, name", [(FAST, "fast timing model"),
                                          (AWS_QUARTER, "aws timing model ×0.25")])
def test_every_boot_figure_names_the_model_in_its_scheme_and_config(timing, name):
    entries = agent_runs.figures([_run(timing)], timing)
    assert {e["name"] for e in entries} == {
        "boot_to_training", "agent_share_of_boot", "notice_to_durable_checkpoint_whole_agent",
        "steps_redone_whole_agent", "api_calls_per_boot", "api_calls_per_drain"}
    for entry in entries:
        assert entry["scheme"].endswith(f", {name})") or entry["scheme"] == f"spotrun ({name})", entry
        assert entry["config"]["timing_model"]["name"] == name
    schemes = {(e["name"], e["scheme"]) for e in entries}
    assert ("boot_to_training", f"spotrun (same-az, {name})") in schemes
    assert ("api_calls_per_boot", f"spotrun (cross-az / migration, {name})") in schemes
    assert ("notice_to_durable_checkpoint_whole_agent", f"spotrun (poll 1 s, {name})") in schemes
    assert agent_runs.check_timing_labels(entries) == []
    share = next(e for e in entries if e["name"] == "agent_share_of_boot" and "same-az" in e["scheme"])
    assert share["samples"] == [pytest.approx(4.0 - agent_runs.modelled_waits(timing, "same-az"), abs=1e-3)]


def test_a_run_under_one_model_is_not_reported_under_the_other():
    with pytest.raises(ValueError, match="fast timing model cannot be reported as the aws timing model ×0.25"):
        agent_runs.figures([_run(FAST)], AWS_QUARTER)
    with pytest.raises(ValueError, match="aws timing model ×0.25 cannot be reported as the fast"):
        agent_runs.figures([_run(FAST), _run(AWS_QUARTER)], FAST)


def test_a_planted_label_for_the_other_model_is_caught():
    entries = agent_runs.figures([_run(FAST)], FAST)
    relabelled = [dict(e) for e in entries]
    relabelled[0]["scheme"] = relabelled[0]["scheme"].replace("fast timing model", "aws timing model ×0.25")
    problems = agent_runs.check_timing_labels(relabelled)
    assert problems == [f"{relabelled[0]['name']} [{relabelled[0]['scheme']}]: the scheme does not end "
                        "with 'fast timing model)'"]
    # The config's name swapped, the durations left as they ran: the durations win.
    swapped = dict(entries[1], config={**entries[1]["config"], "timing_model": {
        **entries[1]["config"]["timing_model"], "name": "aws timing model ×0.25"}})
    assert "its durations are the fast timing model" in agent_runs.check_timing_labels([swapped])[0]
    unnamed = dict(entries[2], config={k: v for k, v in entries[2]["config"].items() if k != "timing_model"})
    assert "no config.timing_model" in agent_runs.check_timing_labels([unnamed])[0]


def test_a_skipped_aws_run_still_gives_every_figure_with_its_note():
    note = "n/a in --quick: skipped"
    entries = agent_runs.figures([], AWS_QUARTER, note=note)
    assert len(entries) == len(agent_runs.figures([_run(AWS_QUARTER)], AWS_QUARTER)) == 12
    for entry in entries:
        assert (entry["n"], entry["median"], entry.get("note")) == (0, None, note), entry
        assert "aws timing model ×0.25" in entry["scheme"]
    assert agent_runs.check_timing_labels(entries) == []

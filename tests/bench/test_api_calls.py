"""bench/api_calls.py: AWS calls per boot / drain window from a hand-written call ledger."""
from __future__ import annotations

from bench.agent_runs import timing_config
from bench.api_calls import (count_calls, figures, instance_calls, longest_repeat,
                             median_sample, repeated_unchanged)
from spotrun.localcloud import TimingModel

A, B = "i-0aaaaaaaaaaaaaaaa", "i-0bbbbbbbbbbbbbbbb"
FAST = timing_config(TimingModel.fast())
VOL, VOL2 = "vol-0123456789abcdef0", "vol-0fedcba9876543210"


def rec(t, action, instance=A, resources=(), service="ec2", checker=False, error=None):
    return {"seq": 0, "t": t, "service": service, "action": action, "instance": instance,
            "resources": list(resources), "status": 400 if error else 200, "error": error,
            "checker": checker, "injected": None, "method": "POST"}


LEDGER = [
    rec(0.5, "DescribeInstances", resources=[A]),                 # before A's boot
    rec(1.0, "DescribeInstances", resources=[A]),
    rec(1.1, "GetItem", service="dynamodb", resources=["leases"]),
    rec(1.2, "PutItem", service="dynamodb", resources=["leases"]),
    rec(1.3, "DescribeVolumes"),
    rec(1.35, "DescribeVolumes", instance=B),                      # another instance
    rec(1.4, "DescribeVolumes", resources=[VOL], checker=True, instance=None),
    rec(1.5, "AttachVolume", resources=[VOL, A]),
    rec(1.6, "DescribeVolumes", resources=[VOL]),
    rec(1.7, "DescribeVolumes", resources=[VOL], error="RequestLimitExceeded"),
    rec(1.8, "DescribeVolumes", resources=[VOL]),
    rec(2.0, "CreateTags", resources=[VOL]),
    rec(3.0, "DescribeVolumes", resources=[VOL]),                 # training: in no window
    # the drain: notice at 10, released at 20
    rec(10.5, "DescribeVolumes", resources=[VOL]),
    rec(11.0, "DescribeSnapshots", resources=[VOL]),
    rec(11.1, "DescribeVolumes", resources=[VOL]),
    rec(11.2, "GetItem", service="dynamodb", resources=["leases"]),
    rec(11.3, "UpdateItem", service="dynamodb", resources=["leases"]),  # another service
    rec(11.4, "DescribeSnapshots", resources=[VOL]),
    rec(11.5, "DescribeVolumes", resources=[VOL]),
    rec(11.6, "DescribeVolumes", resources=[VOL2]),               # other resources: own run
    rec(11.7, "DescribeSnapshots", resources=[VOL]),
    rec(11.8, "DescribeVolumes", resources=[VOL]),
    rec(12.0, "CreateSnapshot", resources=[VOL]),                 # ends the ec2 runs
    rec(12.1, "DescribeVolumes", resources=[VOL]),
    rec(20.0, "DetachVolume", resources=[VOL]),
    rec(20.5, "DescribeVolumes", resources=[VOL]),                # after released
]


def test_counts_only_the_instance_s_own_calls_inside_the_window_by_action():
    counted = count_calls(LEDGER, A, 1.0, 2.0)
    assert counted["total"] == 9
    assert counted["by_action"] == {"ec2:DescribeVolumes": 4, "dynamodb:GetItem": 1,
                                    "dynamodb:PutItem": 1, "ec2:AttachVolume": 1,
                                    "ec2:CreateTags": 1, "ec2:DescribeInstances": 1}
    assert counted["errors"] == 1
    assert counted["mutating"] == 3  # PutItem, AttachVolume, CreateTags
    assert count_calls(LEDGER, B, 1.0, 2.0)["by_action"] == {"ec2:DescribeVolumes": 1}
    assert count_calls(LEDGER, A, 2.5, 9.0)["total"] == 1
    assert count_calls(LEDGER, A, 100.0, 200.0) == {"total": 0, "errors": 0, "mutating": 0,
                                                     "by_action": {}}


def test_checker_calls_are_never_counted_even_with_an_instance():
    ledger = LEDGER + [rec(1.45, "DescribeSnapshots", resources=[VOL], checker=True)]
    assert "ec2:DescribeSnapshots" not in count_calls(ledger, A, 1.0, 2.0)["by_action"]
    assert count_calls(ledger, A, 1.0, 2.0)["total"] == 9


def test_boot_and_drain_windows_per_instance():
    calls = instance_calls(LEDGER, {"instance_id": A, "kind": "same-az", "boot_wall": 1.0,
                                    "training_wall": 2.0, "notice_wall": 10.0,
                                    "released_wall": 20.0})
    assert calls["kind"] == "same-az"
    assert (calls["boot"]["total"], calls["boot"]["seconds"]) == (9, 1.0)
    assert calls["drain"]["total"] == 13
    assert calls["drain"]["by_action"]["ec2:DescribeVolumes"] == 6
    assert calls["drain"]["by_action"]["ec2:DetachVolume"] == 1
    assert calls["drain"]["after_released"] == 1 and "after_released" not in calls["boot"]
    # Never trained, never noticed: no windows at all, not zero calls.
    none = instance_calls(LEDGER, {"instance_id": B, "kind": "first", "boot_wall": 1.0,
                                   "training_wall": None, "notice_wall": None})
    assert none["boot"] is None and none["drain"] is None


def test_a_read_repeated_with_nothing_changed_is_reported_and_a_change_ends_the_run():
    runs = repeated_unchanged(LEDGER, A, 10.0, 20.0, more_than=3)
    # DescribeVolumes(VOL) 4× and DescribeSnapshots(VOL) 3× before CreateSnapshot; the
    # interleaved DynamoDB write and the read of VOL2 do not end the EC2 runs.
    assert runs == [{"action": "ec2:DescribeVolumes", "resources": [VOL], "count": 4,
                     "after": None, "seconds": 1.3}]
    assert [(r["action"], r["count"]) for r in repeated_unchanged(LEDGER, A, 10.0, 20.0, 2)] == [
        ("ec2:DescribeVolumes", 4), ("ec2:DescribeSnapshots", 3)]
    # Polls after a mutating call name it, for the reader to judge (an attach in progress).
    after_attach = repeated_unchanged(LEDGER, A, 1.0, 2.0, more_than=2)
    assert [(r["action"], r["count"], r["after"]) for r in after_attach] == [
        ("ec2:DescribeVolumes", 3, "AttachVolume")]
    assert repeated_unchanged(LEDGER, A, 1.0, 2.0, more_than=3) == []


def test_a_mutating_call_to_another_service_does_not_end_a_run():
    ledger = [rec(1 + i / 10, "DescribeVolumes", resources=[VOL]) for i in range(3)]
    ledger += [rec(1.35, "PutItem", service="dynamodb", resources=["leases"])]
    ledger += [rec(1.4 + i / 10, "DescribeVolumes", resources=[VOL]) for i in range(2)]
    assert [r["count"] for r in repeated_unchanged(ledger, A, 0, 9, more_than=3)] == [5]
    ledger.insert(3, rec(1.3, "CreateTags", resources=[VOL]))
    assert repeated_unchanged(ledger, A, 0, 9, more_than=3) == []


def test_figures_give_goals_per_kind_and_the_median_sample_s_breakdown():
    ledger: list[dict] = []

    def boot(kind, total, drain=None, repeats=0):
        """An instance that makes ``total`` calls booting (``repeats`` of them the same read
        in a row) and ``drain`` calls draining, each call its own volume unless repeated."""
        iid = f"i-{kind}-{total}"
        for n in range(total):
            resource = VOL if n < repeats else f"vol-{n:017x}"
            ledger.append(rec(1 + n / 1000, "DescribeVolumes", instance=iid, resources=[resource]))
        for n in range(drain or 0):
            ledger.append(rec(10 + n / 1000, "DescribeSnapshots", instance=iid,
                              resources=[f"snap-{n:017x}"]))
        return {"kind": kind, "api_calls": instance_calls(ledger, {
            "instance_id": iid, "kind": kind, "boot_wall": 1.0, "training_wall": 2.0,
            "notice_wall": 10.0 if drain else None, "released_wall": 11.0})}

    boots = [boot("first", 30), boot("same-az", 20, drain=12), boot("same-az", 26, drain=15),
             boot("same-az", 22, repeats=7), boot("cross-az", 44, drain=18)]
    by_name = {(f["name"], f["scheme"]): f for f in figures(boots, FAST)}
    same = by_name["api_calls_per_boot", "spotrun (same-az, fast timing model)"]
    assert (same["samples"], same["unit"], same["goal"]) == ([20.0, 26.0, 22.0], "calls",
                                                             "<= 25 calls")
    assert same["goal_met"] is False  # one boot over 25 is a miss, though the median is 22
    assert same["config"]["median_sample"]["instance_id"] == "i-same-az-22"
    assert same["config"]["median_sample"]["by_action"] == {"ec2:DescribeVolumes": 22}
    assert same["config"]["longest_repeated_unchanged"]["count"] == 7
    assert same["config"]["timing_model"] == FAST
    cross = by_name["api_calls_per_boot", "spotrun (cross-az / migration, fast timing model)"]
    assert (cross["goal"], cross["goal_met"]) == ("<= 45 calls", True)
    first = by_name["api_calls_per_boot", "spotrun (first, fast timing model)"]
    assert "goal" not in first and first["samples"] == [30.0]
    drain = by_name["api_calls_per_drain", "spotrun (fast timing model)"]
    assert drain["samples"] == [12.0, 15.0, 18.0]
    assert drain["config"]["median_sample"]["total"] == 15
    assert drain["config"]["median_sample"]["instance_id"] == "i-same-az-26"
    assert median_sample([]) is None and longest_repeat([]) is None
    # An even count shows the lower middle one: a sample that happened, not an average.
    assert median_sample([{"total": 9}, {"total": 3}, {"total": 5}, {"total": 7}]) == {
        "total": 5}


def test_a_kind_without_samples_says_why_instead_of_a_number():
    by_name = {(f["name"], f["scheme"]): f for f in figures([], FAST)}
    empty = by_name["api_calls_per_boot", "spotrun (same-az, fast timing model)"]
    assert (empty["n"], empty["median"], empty["goal_met"]) == (0, None, None)
    assert empty["note"].startswith("n/a: no same-az boot")
    assert by_name["api_calls_per_drain", "spotrun (fast timing model)"]["note"].startswith("n/a")
    # A run left out on purpose says so instead.
    skipped = figures([], FAST, note="n/a in --quick")
    assert {f["note"] for f in skipped} == {"n/a in --quick"}

"""The lifecycle's endings: the record says what happened before the fleet goes.

The fleet cancel terminates the instance the agent runs on, so whatever the agent has not
written by then is never written: the final phase (done, failed), the failure reason and
the completion must already be on the volume's tags and in the state file when the cancel
is called. The volume manager here keeps the tags in a dict (its EC2 calls are the e2e
tests' business, tests/e2e/test_outside_stops_e2e.py); the cancel reads what a later
instance or the operator would read at that moment.
"""
from __future__ import annotations

import json
import time
import os
import signal
import sys
from types import SimpleNamespace

import pytest

from spotrun import config
from spotrun import heldtime
from spotrun import tags as T
from spotrun.lifecycle import COMPLETION_RECORD, Lifecycle, Phase
from spotrun.supervisor import Supervisor, SupervisorOutcome, SupervisorResult
from spotrun.trainerproc import TrainerProcess
from spotrun.notify import Notifier
from spotrun_trainer import protocol


class _Quiet(Notifier):
    """The real notifier outside systemd (no socket): every message is a no-op."""

    def __init__(self):
        super().__init__("")


class TagsInADict:
    """The job volume's tags, as VolumeManager.record / release leave them."""

    def __init__(self):
        self.tags: dict[str, str] = {}
        self.released = 0
        self.finished: list[bool] = []  # each release: was the job over for good?
        self.written_after_release: list[dict] = []  # tags nobody's lease covered

    def record(self, **values: str) -> None:
        if self.released:
            self.written_after_release.append(values)
        self.tags.update({(k if ":" in k else T.PREFIX + k): str(v) for k, v in values.items()})

    def release(self, *, snapshot=None, final_tags=None, finished=False) -> None:
        # The real release writes final_tags before it lets go of the lease.
        self.record(**(final_tags or {}))
        self.released += 1
        self.finished.append(finished)

    def unmount_in_place(self) -> None:
        pass

    def job_volumes(self) -> list[dict]:
        return [{"VolumeId": "vol-1", "Tags": T.as_list(self.tags)}]


def _training_lifecycle(tmp_path, **trainer):
    cfg = config.from_mapping({"agent": {"state_dir": str(tmp_path / "state")},
                               "volume": {"mount_point": str(tmp_path / "mnt")},
                               "trainer": trainer})
    seen_at_cancel: list[dict] = []
    lc = Lifecycle(cfg, metadata=None, notifier=_Quiet(), identify=None, volume_manager=None,
                   checkout=None, monitor=None,
                   cancel_fleet=lambda launched_by: seen_at_cancel.append({
                       "tags": dict(volumes.tags), "state": lc.state.read(),
                       "record": (cfg.mount_point / COMPLETION_RECORD).exists()}) or "cancelled")
    volumes = TagsInADict()
    lc.identity = SimpleNamespace(instance_id="i-0123", availability_zone="az-1", launched_by="sfr-1")
    lc.volumes, lc.volume_id, lc.commit = volumes, "vol-1", "abc123"
    cfg.checkpoints_path.mkdir(parents=True)
    for phase in (Phase.IDENTIFYING, Phase.ACQUIRING, Phase.CHECKING_OUT, Phase.TRAINING):
        lc.transition(phase)
    return lc, volumes, seen_at_cancel


def test_a_crash_loop_is_recorded_as_failed_before_the_cancel(tmp_path):
    lc, volumes, seen = _training_lifecycle(tmp_path)
    reason = "trainer crashed 3 times in a row; last: exit code 3"
    assert lc.fail(SupervisorResult(SupervisorOutcome.GAVE_UP, 2, 3, reason=reason)) == 0
    [at_cancel] = seen
    assert at_cancel["tags"][T.PHASE] == "failed" and at_cancel["tags"][T.FAILURE] == reason
    assert at_cancel["state"]["phase"] == "failed"
    assert at_cancel["state"]["failure"] == reason and at_cancel["state"]["failure_policy"] == "cancel"
    assert volumes.released == 1 and lc.phase is Phase.FAILED
    assert volumes.finished == [True]  # a sweep never claims a failed experiment again


def test_keep_running_records_the_failure_and_cancels_nothing(tmp_path):
    lc, volumes, seen = _training_lifecycle(tmp_path, failure_policy="keep-running")
    lc.fail(SupervisorResult(SupervisorOutcome.GAVE_UP, 3, 1, reason="exit code 1"))
    assert seen == []
    assert volumes.tags[T.PHASE] == "failed" and volumes.tags[T.FAILURE] == "exit code 1"
    assert lc.state.read()["phase"] == "failed"


def test_a_completion_is_recorded_as_done_before_the_cancel(tmp_path):
    lc, volumes, seen = _training_lifecycle(tmp_path)
    (lc.config.checkpoints_path / "final_metrics.json").write_text(json.dumps({"loss": 0.25}))
    assert lc.finish() == 0
    [at_cancel] = seen
    assert at_cancel["record"] is True
    assert at_cancel["tags"][T.PHASE] == "done" and at_cancel["tags"][T.COMPLETED]
    assert json.loads(at_cancel["tags"][T.RESULT]) == {"loss": 0.25}
    assert at_cancel["state"]["phase"] == "done" and at_cancel["state"]["completed"]
    assert lc.phase is Phase.DONE


def test_the_volume_is_not_tagged_after_its_lease_is_released(tmp_path):
    # Once released, the volume and its tags belong to whoever acquires the lease next: the
    # final phase (done, released) must be written before the release, not after it.
    lc, volumes, _ = _training_lifecycle(tmp_path)
    lc.finish()
    assert volumes.released == 1 and volumes.tags[T.PHASE] == "done"
    assert volumes.written_after_release == []
    assert volumes.finished == [True]

    lc, volumes, _ = _training_lifecycle(tmp_path / "drain")
    lc.supervisor = SimpleNamespace(request_stop=lambda: None, current=None, drain=lambda *a, **k:
                                    SimpleNamespace(outcome=SimpleNamespace(value="preempted"),
                                                    killed=False))
    lc.drain("terminate", time.time() + 60)
    assert lc.phase is Phase.RELEASED and volumes.tags[T.PHASE] == "released"
    assert volumes.written_after_release == []
    assert volumes.finished == [False]  # drained: the next instance takes the job on


def test_the_trainers_completion_record_goes_into_the_agents(tmp_path):
    lc, volumes, seen = _training_lifecycle(tmp_path)
    trainer_record = {"protocol": 1, "pid": 4242, "time": 1.0e9, "metrics": {"accuracy": 0.9},
                      "global_step": 160}
    lc.finish(completion=trainer_record)
    record = json.loads((lc.config.mount_point / COMPLETION_RECORD).read_text())
    assert record["trainer"] == trainer_record
    assert record["metrics"] == {"accuracy": 0.9}  # no final_metrics.json: the trainer's own
    assert record["commit"] == "abc123" and record["instance_id"] == "i-0123"
    assert json.loads(volumes.tags[T.RESULT]) == {"accuracy": 0.9}


def test_the_trainer_is_given_the_protocol_files_and_the_configured_protocol(tmp_path):
    lc, _, _ = _training_lifecycle(tmp_path, protocol="spotrun", command=[sys.executable, "-c", "pass"])
    env = lc._trainer_env()
    checkpoints = lc.config.checkpoints_path
    assert env[protocol.HELLO_ENV] == str(checkpoints / protocol.HELLO_FILE)
    assert env[protocol.COMPLETION_ENV] == str(checkpoints / protocol.COMPLETION_FILE)
    trainer = lc._new_trainer()
    assert trainer.protocol == "spotrun"
    assert trainer.hello_file == checkpoints / protocol.HELLO_FILE
    assert trainer.completion_file == checkpoints / protocol.COMPLETION_FILE


def test_the_agents_own_sigterm_is_noted_by_the_supervisor_at_once(tmp_path):
    """Before the lifecycle's loop sees the stop, a trainer exit must not count as finished."""
    lc, _, _ = _training_lifecycle(tmp_path)
    lc.supervisor = Supervisor(lambda: TrainerProcess(["true"], user="root", cwd=tmp_path, env={}))
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        lc._install_signal_handlers()
        os.kill(os.getpid(), signal.SIGTERM)
        assert type(lc.events.get(timeout=5)).__name__ == "StopRequested"
        assert lc.supervisor.agent_stopping  # noted before the event was queued
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("value", ["maybe", "SPOTRUN", ""])
def test_a_bad_trainer_protocol_is_named(value):
    with pytest.raises(config.ConfigError) as err:
        config.from_mapping({"trainer": {"protocol": value}}, "user-data")
    assert err.value.key == "trainer.protocol" and "auto, spotrun, none" in str(err.value)
    assert config.from_mapping({}).trainer.protocol == "auto"


class _Publisher:
    def __init__(self, fail: bool = False):
        self.fail, self.records = fail, []

    def publish(self, progress):
        if self.fail:
            raise OSError("CloudWatch unreachable")
        self.records.append(progress)
        return 2


def test_learning_curves_are_published_on_their_interval_and_never_stop_training(tmp_path):
    lc, _, _ = _training_lifecycle(tmp_path)
    made = []
    lc._metrics_factory = lambda: made.append(_Publisher()) or made[-1]
    now = [100.0]
    lc.clock = lambda: now[0]
    record = {"global_step": 5, "time": 1.0, "metrics": {"loss": 0.5}}
    lc._publish_metrics(record)
    lc._publish_metrics({**record, "global_step": 6})  # inside the interval: not sent
    now[0] += lc.config.agent.metrics_interval_s
    lc._publish_metrics({**record, "global_step": 7})
    lc._publish_metrics({**record, "global_step": 8}, force=True)  # a drain's, a finish's
    assert [r["global_step"] for r in made[0].records] == [5, 7, 8] and len(made) == 1

    failing, _, _ = _training_lifecycle(tmp_path / "failing")
    failing._metrics_factory = lambda: _Publisher(fail=True)
    failing._publish_metrics(record, force=True)  # logged, not raised
    assert failing.phase is Phase.TRAINING


def test_metrics_interval_zero_publishes_nothing(tmp_path):
    lc, _, _ = _training_lifecycle(tmp_path)
    lc.config = config.from_mapping({"agent": {"state_dir": str(tmp_path / "state"),
                                               "metrics_interval_s": 0}})
    lc._metrics_factory = lambda: pytest.fail("no publisher is made when metrics are off")
    lc._publish_metrics({"global_step": 1, "time": 1.0, "metrics": {"loss": 1.0}}, force=True)


def test_a_trainer_reporting_no_metrics_never_gets_a_cloudwatch_client(tmp_path):
    lc, _, _ = _training_lifecycle(tmp_path)
    made = []
    lc._metrics_factory = lambda: made.append(_Publisher()) or made[-1]
    for record in ({"global_step": 1, "time": 1.0}, {"global_step": 2, "time": 2.0, "metrics": {}},
                   {"global_step": 3, "time": 3.0, "metrics": {"loss": float("nan"), "ok": True}}):
        lc._publish_metrics(record, force=True)
    assert made == []
    lc._publish_metrics({"global_step": 4, "time": 4.0, "metrics": {"loss": 0.3}})
    assert len(made) == 1 and [r["global_step"] for r in made[0].records] == [4]


def test_an_experiments_holder_adds_its_time_to_the_earlier_holders_on_every_tag_write(tmp_path):
    lc, volumes, _ = _training_lifecycle(tmp_path)
    lc._record_held = True
    lc.identity = SimpleNamespace(instance_id="i-2", availability_zone="us-east-1b",
                                  instance_type="g5.xlarge", launched_by="fleet-1")
    volumes.tags[T.HELD] = "p3.2xlarge@us-east-1a=300 g5.xlarge@us-east-1b=40"
    now = [1000.0]
    lc.clock = lambda: now[0]
    lc._held_from = 1000.0
    now[0] += 61.0
    lc._record_tags({T.PROGRESS: "{}"}, force=True)
    assert heldtime.parse(volumes.tags[T.HELD]) == {"p3.2xlarge@us-east-1a": 300,
                                                     "g5.xlarge@us-east-1b": 101}
    # The earlier holders' share is read once: the next write adds to it, not to itself.
    now[0] += 30.0
    lc.transition(Phase.DRAINING)
    assert heldtime.parse(volumes.tags[T.HELD])["g5.xlarge@us-east-1b"] == 131


def test_a_single_job_keeps_no_held_time(tmp_path):
    lc, volumes, _ = _training_lifecycle(tmp_path)
    lc._record_tags({T.PROGRESS: "{}"}, force=True)
    assert T.HELD not in volumes.tags

import getpass
import json
import sys
import time
from types import SimpleNamespace

import pytest

from spotrun import config
from spotrun.lifecycle import ALLOWED, Lifecycle, Phase, TransitionError
from spotrun.progress import PROGRESS_FILE
from spotrun.trainerproc import TrainerProcess
from spotrun.notify import Notifier


class _Quiet(Notifier):
    """The real notifier outside systemd (no socket): every message is a no-op."""

    def __init__(self):
        super().__init__("")


def _lifecycle(tmp_path):
    cfg = config.from_mapping({"agent": {"state_dir": str(tmp_path)},
                               "volume": {"mount_point": str(tmp_path / "mnt")}})
    return Lifecycle(cfg, metadata=None, notifier=_Quiet(), identify=None, volume_manager=None,
                     checkout=None, monitor=None, cancel_fleet=None)


def test_every_phase_is_reachable_and_ends_somewhere():
    reachable, frontier = set(), [None]
    while frontier:
        for nxt in ALLOWED[frontier.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == set(Phase)
    assert {p for p in Phase if not ALLOWED[p]} == {Phase.DONE, Phase.FAILED}
    # After a drain only a called-off maintenance leads on: back to the volume, never to training.
    assert ALLOWED[Phase.RELEASED] == ALLOWED[Phase.STOPPED] == {Phase.ACQUIRING}


def test_an_illegal_transition_is_refused_and_the_state_file_follows_legal_ones(tmp_path):
    lc = _lifecycle(tmp_path)
    lc.transition(Phase.IDENTIFYING)
    assert lc.state.read()["phase"] == "identifying"
    with pytest.raises(TransitionError):
        lc.transition(Phase.TRAINING)  # never train on a volume that was not acquired
    assert lc.phase is Phase.IDENTIFYING and lc.state.read()["phase"] == "identifying"


def test_the_trainer_gets_the_protocol_and_the_library_path(tmp_path):
    library = tmp_path / "trainer-lib"
    library.mkdir()
    cfg = config.from_mapping({"agent": {"state_dir": str(tmp_path)},
                               "volume": {"mount_point": str(tmp_path / "mnt")},
                               "job": {"id": "j1"},
                               "trainer": {"library_path": str(library), "env": {"PYTHONPATH": "/mine"}}})
    lc = Lifecycle(cfg, metadata=None, notifier=_Quiet(), identify=None, volume_manager=None,
                   checkout=None, monitor=None, cancel_fleet=None)
    lc.commit = "abc123"
    env = lc._trainer_env()
    assert env["PYTHONPATH"] == f"{library}:/mine"
    assert env["SPOTRUN_JOB_ID"] == "j1" and env["SPOTRUN_CODE_COMMIT"] == "abc123"
    assert env["SPOTRUN_DATA_DIR"] == str(tmp_path / "mnt" / "datasets")
    assert env["SPOTRUN_CHECKPOINT_DIR"] == str(tmp_path / "mnt" / "checkpoints")
    assert env["SPOTRUN_PROGRESS_FILE"].startswith(env["SPOTRUN_CHECKPOINT_DIR"])


def test_progress_an_earlier_trainer_left_is_not_reported_as_the_current_ones(tmp_path):
    """Found by the soak (long profile, seed 1, job 1): a notice 15 ms after the trainer started
    drained it with reached_step 43 -- the step the previous instance's trainer had written
    to the progress file before it was killed. This trainer had resumed from checkpoint 40
    and run no step; the soak counted 3 steps redone by a drained notice."""
    lc = _lifecycle(tmp_path)
    progress_file = lc.config.checkpoints_path / PROGRESS_FILE
    progress_file.parent.mkdir(parents=True)
    progress_file.write_text(json.dumps({"global_step": 43, "time": time.time()}))
    trainer = TrainerProcess([sys.executable, "-c", "pass"], user=getpass.getuser(), cwd=tmp_path,
                             env={}, log_path=tmp_path / "trainer.log")
    trainer.start()
    assert trainer.wait(10) == 0
    lc.supervisor = SimpleNamespace(current=trainer)
    assert lc.progress() == {}
    progress_file.write_text(json.dumps({"global_step": 40, "time": time.time()}))
    assert lc.progress()["global_step"] == 40

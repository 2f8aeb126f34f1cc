"""What a training process says to the outside, and how it hears the outside: the signals it
handles, the hello, the completion record or the "stopped, not done" exit, the progress file
and the final metrics (protocol.py has the agent's side of the rules).

A mixin of SpotCheckpoint: it reads the callback's position (``epoch``, ``global_step``) and
the name of its newest checkpoint, and owns nothing about checkpoints themselves.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from . import protocol
from .jsonfile import write_json_atomic, write_progress
from .logs import log_event

_PROGRESS_EVERY_S = 1.0
FINAL_METRICS_FILE = "final_metrics.json"


def _log(level: str, event: str, **fields) -> None:
    log_event(level, event, component="callback", **fields)


class TrainerLifecycle:
    directory: Path
    epoch: int
    global_step: int
    step_in_epoch: int
    last_checkpoint_time: float | None
    _last_checkpoint: str | None

    def _init_lifecycle(self, *, exit_on_stop: bool, handle_signals: bool,
                        progress_file: str | os.PathLike | None) -> None:
        self.exit_on_stop, self.handle_signals = exit_on_stop, handle_signals
        progress = progress_file or os.environ.get("SPOTRUN_PROGRESS_FILE")
        self.progress_file = Path(progress) if progress else None
        self.stopped_by_signal = False
        self.completion: dict | None = None  # the completion record this process wrote
        self._stop = threading.Event()
        self._save_now = threading.Event()
        self._previous_handlers: dict[int, Any] = {}
        self._training = False
        self._last_progress = 0.0
        # The latest values Keras logged (a batch's running loss, an epoch's val_*): published
        # by the agent as the job's learning curves.
        self.latest_metrics: dict = {}
        self._epochs: int | None = None
        self._final_metrics: dict | None = None

    # ------------------------------------------------------------ start and end
    def _begin_training(self) -> None:
        """Signals, the hello, and no completion record while this process trains."""
        handles = self._install_signals()
        self._training = True
        hello = protocol.hello_path()
        if hello is not None:
            try:
                protocol.write_hello(hello, handles=handles, library="spotrun_trainer",
                                     checkpoint_dir=str(self.directory))
            except OSError as exc:  # the agent then treats this trainer as protocol-unaware
                _log("warning", "protocol_hello_failed", path=str(hello), reason=str(exc))
        self._withdraw_completion()

    def _finish(self) -> None:
        """After training and its final checkpoint: complete, or stop (exit 75)."""
        if self._stop.is_set():  # a SIGTERM after the last step is a stop all the same
            self.stopped_by_signal = True
        if not self.stopped_by_signal:
            self._complete()
            return
        self._withdraw_completion()
        _log("info", "training_stopped_for_interruption", global_step=self.global_step,
             checkpoint=self._last_checkpoint,
             exit_status=protocol.STOPPED_EXIT_CODE if self.exit_on_stop else None)
        if self.exit_on_stop:
            raise SystemExit(protocol.STOPPED_EXIT_CODE)

    def _complete(self) -> None:
        fields = {"global_step": self.global_step, "epoch": self.epoch,
                  "checkpoint": self._last_checkpoint, "checkpoint_dir": str(self.directory)}
        if self._final_metrics is not None:
            fields["final_metrics"] = self._final_metrics
        path = protocol.completion_path(self.directory)
        protocol.write_completion(path, **fields)
        if self.completion is None:
            _log("info", "training_completed", completion_record=str(path), **fields)
        self.completion = fields

    def _withdraw_completion(self) -> None:
        protocol.withdraw_completion(protocol.completion_path(self.directory))
        self.completion = None

    # ------------------------------------------------------------ signals
    def _install_signals(self) -> tuple[str, ...]:
        if not self.handle_signals:
            return ()
        if threading.current_thread() is not threading.main_thread():
            return ()  # signal handlers can only be installed from the main thread
        for signum, event in ((signal.SIGTERM, self._stop), (signal.SIGUSR1, self._save_now)):
            if signum not in self._previous_handlers:
                self._previous_handlers[signum] = signal.signal(
                    signum, lambda _s, _f, event=event: event.set())
        return protocol.HANDLED_SIGNALS

    def _restore_signals(self) -> None:
        for signum, handler in self._previous_handlers.items():
            if signum == signal.SIGUSR1 and handler in (signal.SIG_DFL, None):
                # The hello told the agent this process handles SIGUSR1; the default action
                # would kill it during the evaluation after fit. Ours only sets a flag.
                continue
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def request_stop(self) -> None:
        """What SIGTERM does: checkpoint at the next step boundary, then stop training."""
        self._stop.set()

    def request_checkpoint(self) -> None:
        """What SIGUSR1 does: checkpoint at the next step boundary and go on."""
        self._save_now.set()

    # ------------------------------------------------------------ progress / results
    def _steps_per_epoch(self) -> int | None:
        raise NotImplementedError

    def _write_progress(self, force: bool = False) -> None:
        if self.progress_file is None:
            return
        now = time.monotonic()
        if not force and now - self._last_progress < _PROGRESS_EVERY_S:
            return
        self._last_progress = now
        params = getattr(self, "params", None) or {}
        try:
            write_progress(self.progress_file, epoch=self.epoch,
                           epochs=self._epochs or params.get("epochs"),
                           step=self.step_in_epoch, steps_per_epoch=self._steps_per_epoch(),
                           global_step=self.global_step,
                           last_checkpoint_time=self.last_checkpoint_time,
                           metrics=self.latest_metrics)
        except OSError as exc:  # progress is a report: never stop training for it
            _log("warning", "progress_write_failed", path=str(self.progress_file), reason=str(exc))

    def write_final_metrics(self, metrics: dict) -> Path:
        """Write ``final_metrics.json`` next to the checkpoints, and into the completion record
        if this process's training completed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / FINAL_METRICS_FILE
        self._final_metrics = {k: _plain(v) for k, v in metrics.items()}
        write_json_atomic(path, self._final_metrics)
        if self.completion is not None:
            self._complete()
        return path


def _plain(value):
    try:
        return float(value) if not isinstance(value, (str, int, bool, type(None))) else value
    except (TypeError, ValueError):
        return str(value)

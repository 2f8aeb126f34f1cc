"""The trainer process: who it runs as, what it sees, where its output goes, how it is signalled.

The trainer runs in its own session and process group, so every signal the agent sends
(SIGUSR1 checkpoint-now, SIGTERM drain, SIGKILL at the deadline) reaches its data-loader
workers and shell wrappers too. Exit is awaited with ``waitid(WNOWAIT)`` in a thread: the
leader stays a zombie until any stragglers left in its group are killed, so the group id
cannot be reused under our feet, and nobody polls.

How an exit is judged (invariant 5: only success cancels, and success is a positive act):
a trainer that speaks the protocol (its hello, written since it started, or
``trainer.protocol = "spotrun"``) has finished only if it exits 0 *and* left a completion
record written since it started; exit 75 or 0 without a record is "stopped, not done".
For a trainer that does not, exit 0 is finished. Death by any signal is a crash, whoever
sent it; any exit after our own stop request is a preemption. SIGUSR1 goes only to a
trainer that asked for it (Python's default action for SIGUSR1 kills a script).

Restarting a crashed one is :mod:`spotrun.supervisor`'s job.
"""
from __future__ import annotations

import enum
import grp
import os
import pwd
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Callable, Mapping, Sequence

from spotrun.errors import SpotrunError
from spotrun.log import get_logger
from spotrun_trainer.protocol import STOPPED_EXIT_CODE, read_completion, read_hello

log = get_logger("trainer")

JOURNAL_STREAM_SOCKET = "/run/systemd/journal/stdout"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Variables passed through from the agent's own environment when set (locale, time zone,
# CUDA/driver knobs an AMI sets globally); everything else starts clean.
_PASS_THROUGH = ("LANG", "LC_ALL", "LC_CTYPE", "TZ", "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH")


class TrainerError(SpotrunError):
    """The trainer cannot be started as configured (unknown user, missing directory)."""


class TrainerStateError(RuntimeError):
    """A transition the state machine does not allow (a bug in the caller)."""


class TrainerState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    EXITED = "exited"


class Outcome(enum.Enum):
    FINISHED = "finished"    # done, as the module docstring says; never after our SIGTERM
    PREEMPTED = "preempted"  # any exit after our SIGTERM (a kill at the deadline included)
    STOPPED = "stopped"      # a protocol-aware trainer stopped, not done: exit 75, or 0 without a record
    CRASHED = "crashed"      # anything else, death by a signal included


PROTOCOLS = ("auto", "spotrun", "none")


_ALLOWED = {
    TrainerState.CREATED: {TrainerState.STARTING},
    TrainerState.STARTING: {TrainerState.RUNNING, TrainerState.EXITED},
    TrainerState.RUNNING: {TrainerState.DRAINING, TrainerState.EXITED},
    TrainerState.DRAINING: {TrainerState.EXITED},
    TrainerState.EXITED: set(),
}


def journal_stream(identifier: str, socket_path: str = JOURNAL_STREAM_SOCKET,
                   priority: int = 6) -> socket.socket | None:
    """A journal stream connection (what ``systemd-cat -t`` makes); None without journald."""
    if not os.path.exists(socket_path):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
        sock.shutdown(socket.SHUT_RD)
        # identifier, unit id, priority, level prefix (<N> honoured), syslog, kmsg, console
        sock.sendall(f"{identifier}\n\n{priority}\n1\n0\n0\n0\n".encode())
    except OSError:
        sock.close()
        return None
    return sock


class TrainerProcess:
    """One run of the trainer command; see the module docstring."""

    def __init__(self, command: Sequence[str], *, user: str, cwd: Path, env: Mapping[str, str],
                 path_prepend: Sequence[str] = (), log_identifier: str = "spotrun-trainer",
                 log_path: Path | None = None, journal_socket: str = JOURNAL_STREAM_SOCKET,
                 on_exit: Callable[["TrainerProcess"], None] | None = None,
                 protocol: str = "auto", hello_file: Path | None = None,
                 completion_file: Path | None = None):
        if not command:
            raise TrainerError("trainer.command must not be empty")
        if protocol not in PROTOCOLS:
            raise TrainerError(f"trainer.protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        self.command = list(command)
        self.user = user
        self.cwd = Path(cwd)
        self.extra_env = dict(env)
        self.path_prepend = list(path_prepend)
        self.log_identifier = log_identifier
        self.log_path = Path(log_path) if log_path else None
        self.journal_socket = journal_socket
        self._on_exit = on_exit
        self.protocol = protocol
        self.hello_file = Path(hello_file) if hello_file else None
        self.completion_file = Path(completion_file) if completion_file else None
        self.completion: dict | None = None  # the trainer's completion record, when it finished
        self._outcome: Outcome | None = None
        self._lock = threading.RLock()
        self._state = TrainerState.CREATED
        self._exited = threading.Event()
        self._popen: subprocess.Popen | None = None
        self._returncode: int | None = None
        self._stop_requested = False
        self._killed = False
        self.start_error: str | None = None
        self.started_at: float | None = None
        self.started_wall: float | None = None  # to compare with the trainer's own timestamps
        self.exited_at: float | None = None

    # -- properties -------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def state(self) -> TrainerState:
        return self._state

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    @property
    def killed(self) -> bool:
        return self._killed

    # -- the protocol -------------------------------------------------------------------

    def hello(self) -> dict | None:
        """This trainer's hello: written since it started (an earlier one's does not count)."""
        if self.protocol == "none" or self.hello_file is None or self.started_wall is None:
            return None
        return read_hello(self.hello_file, since=self.started_wall)

    def speaks_protocol(self) -> bool:
        return self.protocol == "spotrun" or self.hello() is not None

    def takes_sigusr1(self) -> bool:
        if self.protocol != "auto":
            return self.protocol == "spotrun"
        handles = (self.hello() or {}).get("handles")
        return isinstance(handles, list) and "SIGUSR1" in handles

    def _judge(self) -> Outcome:
        """See the module docstring; called once, at exit, while the record is what it wrote."""
        code = self._returncode
        if self._stop_requested:
            return Outcome.PREEMPTED
        if code is None or code < 0:
            return Outcome.CRASHED
        if not self.speaks_protocol():
            return Outcome.FINISHED if code == 0 else Outcome.CRASHED
        if code == 0 and self.completion_file is not None:
            self.completion = read_completion(self.completion_file, since=self.started_wall)
            if self.completion is not None:
                return Outcome.FINISHED
        return Outcome.STOPPED if code in (0, STOPPED_EXIT_CODE) else Outcome.CRASHED

    def _transition(self, new: TrainerState) -> None:
        if new not in _ALLOWED[self._state]:
            raise TrainerStateError(f"trainer cannot go from {self._state.value} to {new.value}")
        self._state = new

    # -- start ------------------------------------------------------------------------

    def environment(self, account: pwd.struct_passwd) -> dict[str, str]:
        """The minimal base (PATH, HOME, USER, ...) plus the configured variables."""
        path = ":".join([*self.path_prepend, DEFAULT_PATH])
        env = {"PATH": path, "HOME": account.pw_dir, "USER": account.pw_name,
               "LOGNAME": account.pw_name, "SHELL": account.pw_shell or "/bin/sh",
               "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
        env.update({k: os.environ[k] for k in _PASS_THROUGH if k in os.environ})
        env.update(self.extra_env)
        if "PATH" in self.extra_env and self.path_prepend:
            env["PATH"] = ":".join([*self.path_prepend, self.extra_env["PATH"]])
        return env

    def _account(self) -> pwd.struct_passwd:
        try:
            account = pwd.getpwnam(self.user)
        except KeyError:
            raise TrainerError(f"trainer.user {self.user!r} does not exist on this machine") from None
        if os.geteuid() != 0 and account.pw_uid != os.geteuid():
            raise TrainerError(f"trainer.user {self.user!r}: the agent runs as uid {os.geteuid()}, "
                               "not root, and cannot start a process as another user")
        return account

    def _output(self) -> tuple[IO | socket.socket | None, IO | None]:
        stream = journal_stream(self.log_identifier, self.journal_socket)
        if stream is not None:
            return stream, None
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.log_path, "ab", buffering=0)
            return handle, handle
        return None, None

    def start(self) -> None:
        with self._lock:
            self._transition(TrainerState.STARTING)
            try:
                account = self._account()
                if not self.cwd.is_dir():
                    raise TrainerError(f"trainer working directory {self.cwd} does not exist")
            except TrainerError as exc:
                self.start_error = str(exc)
                self._outcome = Outcome.CRASHED
                self._transition(TrainerState.EXITED)
                self._exited.set()
                raise
            env = self.environment(account)
            output, to_close = self._output()
            as_other_user = os.geteuid() == 0 and account.pw_uid != 0
            groups = [g.gr_gid for g in grp.getgrall() if account.pw_name in g.gr_mem]
            # Taken before the trainer can run a line: its hello and completion record must
            # be newer than this to be its own.
            self.started_wall = time.time()
            try:
                self._popen = subprocess.Popen(
                    self.command, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                    stdout=output, stderr=subprocess.STDOUT if output is not None else None,
                    start_new_session=True, close_fds=True, umask=0o022,
                    user=account.pw_uid if as_other_user else None,
                    group=account.pw_gid if as_other_user else None,
                    extra_groups=groups if as_other_user else None)
            except OSError as exc:
                # Not found / not executable: an exit like a shell's, so the supervisor's
                # restart limit and failure policy apply as to any crash.
                self.start_error = f"cannot execute {self.command[0]!r}: {exc.strerror}"
                self._returncode = 127 if isinstance(exc, FileNotFoundError) else 126
                self._outcome = Outcome.CRASHED
                self.exited_at = time.monotonic()
                self._transition(TrainerState.EXITED)
                log.error("trainer_start_failed", command=self.command, user=self.user, error=self.start_error)
                self._exited.set()
                if self._on_exit:
                    self._on_exit(self)
                return
            finally:
                if output is not None:
                    output.close()  # the child holds its own copy
            self.started_at = time.monotonic()
            self._transition(TrainerState.RUNNING)
            log.info("trainer_started", pid=self._popen.pid, command=self.command, user=self.user,
                     cwd=str(self.cwd), output="journal" if isinstance(output, socket.socket)
                     else str(self.log_path) if to_close else "inherited")
        threading.Thread(target=self._await_exit, name=f"trainer-{self._popen.pid}", daemon=True).start()

    def _await_exit(self) -> None:
        pid = self._popen.pid
        while True:
            try:
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries, belt and braces
                continue
            except ChildProcessError:  # reaped elsewhere (should not happen)
                break
        with self._lock:
            # The leader is a zombie, so its group id is still ours: clear out stragglers
            # (data-loader workers, a shell's children) that would keep the volume busy.
            try:
                os.killpg(pid, signal.SIGKILL)
                log.info("trainer_group_stragglers_killed", pid=pid)
            except ProcessLookupError:
                pass
            except PermissionError:  # pragma: no cover
                pass
            self._returncode = self._popen.wait()
            self.exited_at = time.monotonic()
            self._outcome = self._judge()
            self._transition(TrainerState.EXITED)
            outcome = self._outcome
        log.info("trainer_exited", pid=pid, returncode=self._returncode, outcome=outcome.value,
                 stop_requested=self._stop_requested, killed=self._killed,
                 protocol=self.speaks_protocol(), completion_record=self.completion is not None,
                 ran_s=round(self.exited_at - (self.started_at or self.exited_at), 3))
        self._exited.set()
        if self._on_exit:
            try:
                self._on_exit(self)
            except Exception:  # a broken callback must not lose the exit
                log.exception("trainer_on_exit_failed", pid=pid)

    # -- signals ----------------------------------------------------------------------

    def _signal_group(self, sig: signal.Signals) -> bool:
        try:
            os.killpg(self._popen.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def checkpoint_now(self) -> bool:
        """SIGUSR1 to the group: checkpoint and keep training. False when not running, or when
        the trainer never asked for it (a script without a handler would die of it)."""
        with self._lock:
            if self._state is not TrainerState.RUNNING:
                if self._state in (TrainerState.CREATED, TrainerState.STARTING):
                    raise TrainerStateError(f"cannot ask a {self._state.value} trainer to checkpoint")
                return False
            if not self.takes_sigusr1():
                log.info("trainer_checkpoint_not_requested", pid=self.pid, protocol=self.protocol,
                         reason="trainer.protocol is \"none\"" if self.protocol == "none"
                         else "no hello listing SIGUSR1 from this trainer")
                return False
            sent = self._signal_group(signal.SIGUSR1)
        log.info("trainer_checkpoint_requested", pid=self.pid, sent=sent)
        return sent

    def request_stop(self) -> bool:
        """SIGTERM to the group (checkpoint and exit); state → DRAINING. False if it already exited."""
        with self._lock:
            if self._state in (TrainerState.CREATED, TrainerState.STARTING):
                raise TrainerStateError(f"cannot drain a {self._state.value} trainer")
            if self._state is TrainerState.EXITED:
                return False
            if self._state is TrainerState.DRAINING:
                return True  # asked already: one SIGTERM is the request, a second is noise
            self._stop_requested = True
            self._transition(TrainerState.DRAINING)
            sent = self._signal_group(signal.SIGTERM)
        log.info("trainer_stop_requested", pid=self.pid, sent=sent)
        return sent

    def kill(self) -> bool:
        """SIGKILL to the group. False if it already exited."""
        with self._lock:
            if self._state in (TrainerState.CREATED, TrainerState.STARTING):
                raise TrainerStateError(f"cannot kill a {self._state.value} trainer")
            if self._state is TrainerState.EXITED:
                return False
            self._killed = True
            sent = self._signal_group(signal.SIGKILL)
        log.warning("trainer_killed", pid=self.pid, state=self._state.value)
        return sent

    # -- exit -------------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> int | None:
        """The return code once exited (negative: killed by that signal); None on timeout."""
        if self._state is TrainerState.CREATED:
            raise TrainerStateError("cannot wait for a trainer that was never started")
        self._exited.wait(timeout)
        return self._returncode if self._exited.is_set() else None

    def stop(self, deadline: float, clock: Callable[[], float] = time.monotonic) -> Outcome:
        """Drain: SIGTERM, wait until ``deadline`` (a ``clock`` time), then SIGKILL."""
        self.request_stop()
        if self.wait(max(0.0, deadline - clock())) is None:
            log.warning("trainer_drain_deadline_passed", pid=self.pid)
            self.kill()
            self.wait(None)
        return self.outcome()

    def outcome(self) -> Outcome:
        if self._state is not TrainerState.EXITED:
            raise TrainerStateError(f"a {self._state.value} trainer has no outcome yet")
        return self._outcome

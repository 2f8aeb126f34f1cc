"""The agent with faults injected from outside: the test launcher (never shipped).

    python -m spotrun.localcloud.faultagent agent run --config PATH   # argv as `python -m spotrun`

installs the fault hooks its environment asks for, then runs ``spotrun`` (spotrun.cli.main)
with the same arguments. The agent itself only passes named points (spotrun.crashpoints) and
makes its AWS clients in one place (spotrun.awsclients); what happens there is decided here:

  * ``SPOTRUN_CRASH_AT=<crash point>``: SIGKILL this process at that point of the migration;
  * ``SPOTRUN_PAUSE_AT=<pause point>``: SIGSTOP it there, for whoever set it to land a fault
    and SIGCONT it;
  * ``SPOTRUN_RECORD_AWS_CALLS=<path>``: append every AWS operation the process calls to that
    file, one JSON line ``{"action": "ec2:CreateVolume"}``, so a test can check the IAM policy
    covers exactly what the agent did.

The local cloud boots its instances' agents this way (spotrun.localcloud.agents.agent_argv),
as do the soak and the tests; the .deb leaves spotrun.localcloud out, so an installed agent
has no such hooks, and `spotrun agent run` passes every point as if it were not there.
Processes other than ``spotrun`` (the tests' c2_agent) call :func:`install_from_env`.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from spotrun import awsclients, crashpoints

CRASH_ENV = "SPOTRUN_CRASH_AT"
PAUSE_ENV = "SPOTRUN_PAUSE_AT"
RECORD_CALLS_ENV = "SPOTRUN_RECORD_AWS_CALLS"


class SignalFaults(crashpoints.NoFaults):
    """SIGKILL at crash point ``crash_at``, SIGSTOP at pause point ``pause_at`` (None: never)."""

    def __init__(self, crash_at: str | None = None, pause_at: str | None = None):
        if crash_at and crash_at not in crashpoints.CRASHPOINTS:
            raise ValueError(f"{CRASH_ENV}={crash_at!r}: not one of {crashpoints.CRASHPOINTS}")
        if pause_at and pause_at not in crashpoints.PAUSEPOINTS:
            raise ValueError(f"{PAUSE_ENV}={pause_at!r}: not one of {crashpoints.PAUSEPOINTS}")
        self.crash_at, self.pause_at = crash_at or None, pause_at or None

    def crash(self, name: str) -> None:
        if name == self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def pause(self, name: str) -> None:
        if name == self.pause_at:
            os.kill(os.getpid(), signal.SIGSTOP)


class CallRecorder:
    """A botocore ``before-call`` handler appending each operation to ``path``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __call__(self, params: Any = None, model: Any = None, **_: Any) -> None:
        if model is None:
            return
        service = model.service_model.signing_name or model.service_model.endpoint_prefix
        with open(self.path, "a") as out:
            out.write(json.dumps({"action": f"{service}:{model.name}"}) + "\n")


@contextmanager
def recording_aws_calls(path: str | os.PathLike) -> Iterator[CallRecorder]:
    """Record every AWS call this process makes meanwhile (in-process tests)."""
    recorder = CallRecorder(path)
    awsclients.register("before-call", recorder)
    try:
        yield recorder
    finally:
        awsclients.unregister("before-call", recorder)


def install_from_env(environ: Mapping[str, str] | None = None) -> None:
    """Install the hooks that ``environ`` (default: this process's) asks for."""
    environ = os.environ if environ is None else environ
    crash_at, pause_at = environ.get(CRASH_ENV), environ.get(PAUSE_ENV)
    if crash_at or pause_at:
        crashpoints.install(SignalFaults(crash_at, pause_at))
    if environ.get(RECORD_CALLS_ENV):
        awsclients.register("before-call", CallRecorder(environ[RECORD_CALLS_ENV]))


def main(argv: list[str] | None = None) -> int:
    install_from_env()
    from spotrun.cli import main as spotrun_main
    return spotrun_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())

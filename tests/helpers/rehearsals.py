"""Rehearsals whose agents get extra environment, boot by boot (a pause point, a test-only
break): the local cloud starts each agent process, so the extra goes in through it."""
from __future__ import annotations

from spotrun.harness.rehearsal import Rehearsal


class CloudWithEnv:
    """The cloud, with extra environment for the agent process it starts."""

    def __init__(self, cloud, extra: dict):
        self._cloud, self._extra = cloud, extra

    def __getattr__(self, name):
        return getattr(self._cloud, name)

    def start_process(self, inst, argv, env=None, **popen):
        return self._cloud.start_process(inst, argv, env={**(env or inst.env()), **self._extra},
                                         **popen)


class PerBootEnvRehearsal(Rehearsal):
    """Boot number ``n`` (0 = the first) starts its agent with ``env_for(n, cloud, inst)``
    added (None: nothing added)."""

    def env_for(self, index: int, cloud, inst) -> dict | None:
        return None

    def boot(self, cloud, inst):
        extra = self.env_for(len(self.boots), cloud, inst)
        return super().boot(CloudWithEnv(cloud, extra) if extra else cloud, inst)

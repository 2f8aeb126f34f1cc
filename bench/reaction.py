"""Figure 1: notice reaction — notice in metadata → SIGTERM in the trainer → checkpoint durable.

The path measured is the real agent's: spotrun.monitor.InterruptionMonitor polling a real
IMDSv2 metadata server over HTTP (the local spot cloud's MetadataServer), the notice handed
to spotrun.lifecycle.Lifecycle's training loop, Lifecycle.drain → Supervisor.drain →
TrainerProcess.request_stop → SIGTERM to the trainer's process group, and the trainer
(bench/bench_trainer.py) checkpointing through spotrun_trainer.store. What is left out is what
a notice does not go through: identity, volume acquisition and checkout run once per boot,
before training (figure 3 times them), so each sample starts a fresh Lifecycle at its
training phase with stand-in edges for the volume (nothing to release) — which is what lets
one process take 30 notices per poll interval in a few minutes instead of 30 instance boots.

Each sample: a fresh trainer starts; once it has trained a step, the notice is published
after a random delay uniform in [0, poll interval) (so every phase of the poll cycle is
hit), its wall time taken just before. The trainer logs the wall time SIGTERM reached it
and the time its checkpoint was durable. The poll intervals run side by side (threads),
since each sample mostly waits for the next poll.
"""
from __future__ import annotations

import os
import pwd
import random
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY_STATE_BYTES = 100_000  # order of the tiny Keras model's checkpoint (weights + RMSprop slots)


class _NoVolume:
    """The volume edge during a notice: the figure stops at the durable checkpoint, before
    unmount/snapshot/detach (those are the modelled AWS waits of figure 3)."""

    def release(self, *, snapshot: bool | None = None, final_tags: dict | None = None,
                finished: bool = False) -> None:
        pass  # the same signature as VolumeManager.release: the drain calls it as it is

    def record(self, **values) -> None:
        pass

    def job_volumes(self) -> list:
        return []


def _metadata_server():
    from spotrun.localcloud.imds import InstanceMetadata, MetadataServer

    md = InstanceMetadata(instance_id="i-0bench000000000001", instance_type="p3.2xlarge",
                          availability_zone="us-east-1a", availability_zone_id="use1-az6",
                          region="us-east-1", account_id="123456789012", ami_id="ami-0bench",
                          private_ip="10.0.0.10", tags={}, user_data=None)
    return MetadataServer(md).start()


def _config(workdir: Path, endpoint: str, poll_s: float, events: Path):
    from spotrun import config as configmod

    (workdir / "ws").mkdir(parents=True, exist_ok=True)
    (workdir / "vol" / "checkpoints").mkdir(parents=True, exist_ok=True)
    user = pwd.getpwuid(os.geteuid()).pw_name
    return configmod.from_mapping({
        "job": {"id": "bench-reaction"},
        "volume": {"mount_point": str(workdir / "vol")},
        "code": {"workspace": str(workdir / "ws")},
        "trainer": {"command": [sys.executable, str(HERE / "bench_trainer.py")], "user": user,
                    "env": {"STEP_S": "0.05", "STATE_BYTES": str(TINY_STATE_BYTES),
                            "BENCH_EVENTS": str(events)},
                    "max_restarts": 0, "drain_reserve_s": 5.0},
        "metadata": {"endpoint": endpoint, "notice_poll_interval_s": poll_s},
        "agent": {"state_dir": str(workdir / "state")},
    }, "bench")


def _lifecycle(config, client, detected: dict):
    """The agent's lifecycle with the real monitor; ``detected["wall"]`` is when the monitor
    handed the notice on (splits the figure into polling and the agent's own handling)."""
    from spotrun.lifecycle import Lifecycle
    from spotrun.monitor import InterruptionMonitor, SpotNotice

    def monitor(on_event):
        def handed_on(event):
            if isinstance(event, SpotNotice):
                detected.setdefault("wall", time.time())
            on_event(event)
        return InterruptionMonitor.from_config(client, config.metadata, on_event=handed_on)

    return Lifecycle(config, metadata=client, identify=lambda: None, volume_manager=lambda ident: _NoVolume(),
                     checkout=lambda ident: "bench", monitor=monitor, cancel_fleet=lambda launched_by: "nothing")


def _read_events(path: Path) -> list[dict]:
    from spotrun.jsonlines import read_jsonl

    try:  # all or nothing: a line still being written makes this read count as none
        return read_jsonl(path, skip_torn_last=False)
    except (OSError, ValueError):
        return []


def _await(condition, timeout: float, what: str):
    from spotrun.waiting import wait_until

    # Another process's file: nothing to wait on but the file.
    return wait_until(condition, timeout, interval_s=0.01, what=what,
                      error=lambda: TimeoutError(f"bench reaction: timed out waiting for {what}"))


def measure(poll_s: float, notices: int, workdir: Path, seed: int = 0) -> list[dict]:
    """``notices`` samples at one poll interval: dicts with notice→SIGTERM and →durable (s)."""
    from spotrun.imds import MetadataClient
    from spotrun.lifecycle import Phase

    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    server = _metadata_server()
    samples = []
    try:
        client = MetadataClient(server.endpoint, read_timeout_s=2.0, deadline_s=10.0)
        for index in range(notices):
            events = workdir / f"events-{index}.jsonl"
            config = _config(workdir, server.endpoint, poll_s, events)
            server.clear_notices()
            detected: dict = {}
            lifecycle = _lifecycle(config, client, detected)
            # Where run() stands after acquiring the volume and checking out the code.
            lifecycle.volumes = _NoVolume()
            lifecycle.phase = Phase.CHECKING_OUT
            outcome: dict = {}

            def train() -> None:
                try:
                    outcome["rc"] = lifecycle.train()
                except BaseException as exc:  # re-raised in the measuring thread
                    outcome["error"] = exc

            thread = threading.Thread(target=train, name=f"bench-lifecycle-{poll_s}", daemon=True)
            thread.start()

            def started() -> bool:
                if "error" in outcome:
                    raise outcome["error"]
                return any(e["event"] == "trainer_start" for e in _read_events(events))

            _await(started, 60, "the trainer to start")
            time.sleep(0.1 + rng.uniform(0.0, poll_s))  # the random moment the notice appears
            notice_wall = time.time()
            server.notice("terminate", datetime.now(timezone.utc) + timedelta(seconds=120))
            thread.join(60)
            if thread.is_alive():
                raise TimeoutError(f"bench reaction: the lifecycle did not drain (poll {poll_s} s)")
            if "error" in outcome:
                raise outcome["error"]
            got = {e["event"]: e for e in _read_events(events)}
            term, durable = got.get("sigterm_received"), got.get("checkpoint_durable")
            samples.append({
                "notice_to_detected_s": detected["wall"] - notice_wall if "wall" in detected else None,
                "detected_to_sigterm_s": term["wall"] - detected["wall"] if term and "wall" in detected else None,
                "notice_to_sigterm_s": term["wall"] - notice_wall if term else None,
                "notice_to_durable_s": durable["wall"] - notice_wall if durable else None,
                "phase": lifecycle.phase.value if lifecycle.phase else None})
    finally:
        server.stop()
    return samples


def run(polls: list[float], notices: int, workdir: Path, seed: int = 0) -> dict[float, list[dict]]:
    """The poll intervals side by side; returns {poll interval: samples}."""
    results: dict[float, list[dict]] = {}
    errors: list[BaseException] = []

    def one(poll_s: float) -> None:
        try:
            results[poll_s] = measure(poll_s, notices, workdir / f"poll-{poll_s:g}", seed)
        except BaseException as exc:  # reported by the caller, after the other threads end
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(p,), name=f"bench-poll-{p:g}") for p in polls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def idle_request_rate(seconds: float) -> dict:
    """Metadata requests per second of the agent's monitor at idle (no notice), with the
    default ``[metadata]`` intervals, counted by the metadata server itself."""
    from spotrun.config import MetadataConfig
    from spotrun.imds import MetadataClient
    from spotrun.monitor import InterruptionMonitor

    server = _metadata_server()
    try:
        cfg = MetadataConfig()
        monitor = InterruptionMonitor.from_config(
            MetadataClient(server.endpoint, read_timeout_s=2.0, deadline_s=10.0), cfg)
        monitor.start()
        try:
            time.sleep(1.0)  # past the first round of every path and the token request
            before, began = server.requests, time.monotonic()
            time.sleep(seconds)
            requests, elapsed = server.requests - before, time.monotonic() - began
        finally:
            monitor.stop()
    finally:
        server.stop()
    return {"requests": requests, "seconds": round(elapsed, 2),
            "per_second": round(requests / elapsed, 2),
            "intervals_s": {"notice": cfg.notice_poll_interval_s, "rebalance": cfg.poll_interval_s,
                            "maintenance": cfg.maintenance_poll_interval_s}}

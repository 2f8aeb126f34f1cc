"""A sweep instance's loop (spotrun.sweeprun) over moto's real DynamoDB and EC2: the queue
hand-over, the end of the sweep (one cancel, or one fewer instance), an interrupted instance,
an agent restarted while it holds an experiment, and a cancel-taker that dies. The experiments'
lifecycles are stand-ins that do what the real one does to the lease (spotrun.lifecycle: hold
it while training, release it finished or not); everything is judged from the lease table's
items and from which calls reached the fleet edges, never from the runner's own report.

Between two experiments (the agent's own edges, spotrun.agentcmd.build_sweep, on moto and the
local cloud's metadata emulator): a notice or a stop already due ends the loop before a claim;
a stop in an experiment's identify or acquire gives its claim back (once) for the next instance;
each experiment's events carry its own job."""
from __future__ import annotations

import getpass
import io
import json
import os
import queue
import signal
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from c2_world import REGION, aws, clients, launch  # noqa: E402,F401

from spotrun import agentcmd, crashpoints  # noqa: E402
from spotrun import config as configmod  # noqa: E402
from spotrun import lease as L  # noqa: E402
from spotrun import log as logmod  # noqa: E402
from spotrun import sweepclaim  # noqa: E402
from spotrun.claimpolicy import RESUME  # noqa: E402
from spotrun.identity import LaunchedBy  # noqa: E402
from spotrun.imds import MetadataClient  # noqa: E402
from spotrun.lifecycle import Lifecycle  # noqa: E402
from spotrun.localcloud.imds import InstanceMetadata, MetadataServer  # noqa: E402
from spotrun.monitor import SpotNotice  # noqa: E402
from spotrun.phases import Phase  # noqa: E402
from spotrun.sweeprun import Ran, SweepRunner  # noqa: E402

TABLE = "spotrun-leases"
FLEET = LaunchedBy("ec2-fleet", "fleet-0123456789abcdef0")


@pytest.fixture
def world(aws):
    ec2, db = clients(aws)
    db.create_table(**L.table_definition(TABLE))
    return ec2, db


def sweep_config(jobs, args_of=lambda job: ()) -> configmod.Config:
    return configmod.from_mapping({
        "job": {"id": "sweep"}, "aws": {"lease_table": TABLE},
        "trainer": {"command": ["python", "train.py"], "env": {"BASE": "1"}},
        "sweep": {"id": "sweep", "experiments": [
            {"job": job, "args": list(args_of(job)), "env": {"EXP": job}} for job in jobs]}})


def items(world, jobs) -> dict[str, dict]:
    _, db = world
    out = {}
    for job in jobs:
        item = db.get_item(TableName=TABLE, Key={"job": {"S": job}}, ConsistentRead=True).get("Item")
        out[job] = {k: next(iter(v.values())) for k, v in (item or {}).items()}
    return out


class Cloud:
    """The fleet edges and a record of who ran what; ``ends`` decides how an experiment's
    lifecycle ends on an instance (default: done)."""

    def __init__(self, world):
        self.world = world
        self.ran: list[tuple[str, str]] = []  # (instance, job)
        self.held_while_running: list[bool] = []
        self.configs: dict[str, configmod.Config] = {}
        self.cancels: list[str] = []
        self.leaves: list[tuple[LaunchedBy, str]] = []
        self.ends: dict[tuple[str, str], Phase] = {}
        self.lock = threading.Lock()

    def runner(self, config, inst) -> SweepRunner:
        ec2, db = self.world
        ident = SimpleNamespace(instance_id=inst.instance_id, availability_zone=inst.availability_zone,
                                launched_by=FLEET)

        def leases(_ident):
            return [L.Lease(db, TABLE, e.job, inst.instance_id, inst.availability_zone, ec2,
                            poll_s=0.05) for e in config.sweep.experiments]

        def run_experiment(experiment_config, lease, _ident) -> Ran:
            job = experiment_config.job.id
            with self.lock:
                self.ran.append((inst.instance_id, job))
                self.configs[job] = experiment_config
                # The claim is the table's: the item names this instance while it trains.
                self.held_while_running.append(items(self.world, [job])[job].get("holder")
                                               == inst.instance_id)
            # The log context the lifecycle binds (spotrun.volumes, spotrun.boot, transition).
            logmod.bind(job=job, volume_id=f"vol-{job}", phase=Phase.TRAINING.value)
            logmod.get_logger("test").info("stand_in_training", job_id=job)
            phase = self.ends.get((inst.instance_id, job), Phase.DONE)
            if phase is None:  # the agent died mid-experiment: nothing released
                raise RuntimeError("agent killed")
            lease.release(finished=phase in (Phase.DONE, Phase.FAILED))
            return Ran(job, phase, 0)

        def cancel(launched_by):
            with self.lock:
                self.cancels.append(inst.instance_id)
            return "cancelled"

        def leave(launched_by, instance_id):
            with self.lock:
                self.leaves.append((launched_by, instance_id))
            return "left"

        return SweepRunner(
            config, identify=lambda: ident, leases=leases, run_experiment=run_experiment,
            take_fleet_cancel=lambda i: sweepclaim.take_fleet_cancel(db, TABLE, "sweep",
                                                                     i.instance_id, ec2=ec2),
            cancel_fleet=cancel, leave_fleet=leave)


def test_one_instance_runs_the_whole_queue_then_cancels_the_fleet_once(world):
    jobs = ["sweep-a", "sweep-b", "sweep-c"]
    cloud = Cloud(world)
    inst = launch(world[0], "us-east-1a")
    end = cloud.runner(sweep_config(jobs), inst).run()
    assert cloud.ran == [(inst.instance_id, job) for job in jobs]
    assert all(cloud.held_while_running)
    assert all(item.get("finished") and "holder" not in item for item in items(world, jobs).values())
    assert cloud.cancels == [inst.instance_id] and cloud.leaves == []
    assert end.outcome == "cancelled-fleet"


def test_each_experiment_runs_with_its_own_job_id_command_and_env(world):
    jobs = ["sweep-lr0.1", "sweep-lr0.01"]
    cloud = Cloud(world)
    cloud.runner(sweep_config(jobs, args_of=lambda job: ("--lr", job.split("lr")[1])),
                 launch(world[0], "us-east-1a")).run()
    first = cloud.configs["sweep-lr0.1"]
    assert first.job.id == "sweep-lr0.1"
    assert first.trainer.command == ("python", "train.py", "--lr", "0.1")
    assert first.trainer.env == {"BASE": "1", "EXP": "sweep-lr0.1"}
    assert cloud.configs["sweep-lr0.01"].trainer.command[-1] == "0.01"


def test_two_instances_share_the_queue_no_experiment_runs_twice_one_cancel(world):
    jobs = [f"sweep-{n}" for n in range(6)]
    cloud = Cloud(world)
    config = sweep_config(jobs)
    insts = [launch(world[0], zone) for zone in ("us-east-1a", "us-east-1b", "us-east-1a")]
    ends = [None] * len(insts)

    def run(n):
        ends[n] = cloud.runner(config, insts[n]).run()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(insts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(job for _, job in cloud.ran) == jobs  # each once
    assert all(cloud.held_while_running)
    assert all(item.get("finished") for item in items(world, jobs).values())
    assert len(cloud.cancels) == 1  # exactly one instance cancelled the fleet
    # Every other instance either left the fleet (work still held elsewhere) or saw the
    # sweep finished and left the cancel to its taker.
    assert sorted(e.outcome for e in ends).count("cancelled-fleet") == 1
    assert all(e.outcome in ("cancelled-fleet", "left-fleet", "other-instance-cancels") for e in ends)
    assert [i for _, i in cloud.leaves] == [insts[n].instance_id for n, e in enumerate(ends)
                                             if e.outcome == "left-fleet"]


def test_with_work_held_elsewhere_an_idle_instance_lowers_capacity_and_leaves(world):
    jobs = ["sweep-a", "sweep-b"]
    ec2, db = world
    busy, idle = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1a")
    for job in jobs:  # both held by a live instance that is still training them
        assert L.Lease(db, TABLE, job, busy.instance_id, "us-east-1a", ec2).try_acquire()
    cloud = Cloud(world)
    end = cloud.runner(sweep_config(jobs), idle).run()
    assert end.outcome == "left-fleet" and cloud.ran == []
    assert cloud.leaves == [(FLEET, idle.instance_id)] and cloud.cancels == []
    assert {job: item["holder"] for job, item in items(world, jobs).items()} == {
        job: busy.instance_id for job in jobs}  # nothing of theirs touched


def test_an_interrupted_instance_stops_claiming_and_the_next_one_resumes_its_experiment(world):
    jobs = ["sweep-a", "sweep-b"]
    ec2, _ = world
    first, replacement = launch(ec2, "us-east-1a"), launch(ec2, "us-east-1a")
    cloud = Cloud(world)
    cloud.ends[(first.instance_id, "sweep-a")] = Phase.RELEASED  # drained on a notice
    end = cloud.runner(sweep_config(jobs), first).run()
    assert end.outcome == "interrupted" and cloud.ran == [(first.instance_id, "sweep-a")]
    assert cloud.cancels == [] and cloud.leaves == []
    assert not items(world, jobs)["sweep-a"].get("finished")
    ec2.terminate_instances(InstanceIds=[first.instance_id])
    cloud.runner(sweep_config(jobs), replacement).run()
    assert cloud.ran[1:] == [(replacement.instance_id, "sweep-a"), (replacement.instance_id, "sweep-b")]
    assert cloud.cancels == [replacement.instance_id]


def test_a_restarted_agent_takes_back_the_experiment_its_instance_still_holds(world):
    jobs = ["sweep-a", "sweep-b", "sweep-c"]
    ec2, db = world
    inst = launch(ec2, "us-east-1a")
    cloud = Cloud(world)
    cloud.ends[(inst.instance_id, "sweep-a")] = None  # killed while training sweep-a
    with pytest.raises(RuntimeError):
        cloud.runner(sweep_config(jobs), inst).run()
    assert items(world, jobs)["sweep-a"]["holder"] == inst.instance_id  # still held by it
    del cloud.ends[(inst.instance_id, "sweep-a")]
    handles = [L.Lease(db, TABLE, job, inst.instance_id, "us-east-1a", ec2) for job in jobs]
    state = {s.job_id: s for s in sweepclaim.states(handles)}
    assert state["sweep-a"].mine and state["sweep-a"].held
    cloud.runner(sweep_config(jobs), inst).run()
    assert [job for _, job in cloud.ran] == ["sweep-a", "sweep-a", "sweep-b", "sweep-c"]
    assert all(cloud.held_while_running)
    assert cloud.cancels == [inst.instance_id]


def test_a_resume_choice_is_named_as_such(world):
    ec2, db = world
    inst = launch(ec2, "us-east-1a")
    handles = [L.Lease(db, TABLE, job, inst.instance_id, "us-east-1a", ec2)
               for job in ("sweep-a", "sweep-b")]
    assert handles[1].try_acquire()  # held from before a restart: the second in order
    fresh = [L.Lease(db, TABLE, h.job_id, inst.instance_id, "us-east-1a", ec2) for h in handles]
    lease, choice = sweepclaim.claim(fresh, "us-east-1a")
    assert (choice.job_id, choice.reason) == ("sweep-b", RESUME)
    assert items(world, ["sweep-b"])["sweep-b"]["holder"] == inst.instance_id


def test_a_cancel_taker_that_died_before_cancelling_is_taken_over(world):
    ec2, db = world
    taker, survivor, other = (launch(ec2, "us-east-1a") for _ in range(3))
    assert sweepclaim.take_fleet_cancel(db, TABLE, "sweep", taker.instance_id, ec2=ec2)
    # Alive: nobody else may take it.
    assert not sweepclaim.take_fleet_cancel(db, TABLE, "sweep", survivor.instance_id, ec2=ec2)
    ec2.terminate_instances(InstanceIds=[taker.instance_id])  # died before its cancel
    assert sweepclaim.take_fleet_cancel(db, TABLE, "sweep", survivor.instance_id, ec2=ec2)
    assert not sweepclaim.take_fleet_cancel(db, TABLE, "sweep", other.instance_id, ec2=ec2)
    item = db.get_item(TableName=TABLE, Key={"job": {"S": "sweep#sweep"}}, ConsistentRead=True)["Item"]
    assert item["fleet_cancel_by"]["S"] == survivor.instance_id


# -- between two experiments: the agent's own edges (spotrun.agentcmd.build_sweep) -----------

@pytest.fixture
def handlers():
    """A lifecycle installs SIGTERM/SIGINT handlers, a test its fault hooks: both put back."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    crashpoints.install(None)
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture
def booted(world):
    """``boot(zone)``: a moto instance with its own metadata emulator and a client of it."""
    servers = []

    def boot(az="us-east-1a"):
        inst = launch(world[0], az)
        server = MetadataServer(InstanceMetadata(
            inst.instance_id, "p3.2xlarge", az, "use1-az1", REGION, "123456789012",
            "ami-12345678", "10.0.0.5", {}, None)).start()
        servers.append(server)
        return SimpleNamespace(instance_id=inst.instance_id, imds=server,
                               metadata=MetadataClient(server.endpoint, read_timeout_s=2.0,
                                                       deadline_s=5.0))

    yield boot
    for server in servers:
        server.stop()


def agent_config(endpoint, tmp_path, jobs) -> configmod.Config:
    """The agent's config of a sweep on moto (what `spotrun agent run` loads)."""
    return configmod.from_mapping({
        "job": {"id": "sweep"},
        "aws": {"endpoint_url": endpoint, "region": REGION, "lease_table": TABLE,
                "retry_mode": "standard", "max_attempts": 3},
        "agent": {"state_dir": str(tmp_path / "state")},
        "volume": {"mount_point": str(tmp_path / "mnt")},
        "code": {"workspace": str(tmp_path / "workspace")},
        "trainer": {"command": [sys.executable, "-c", "pass"], "user": getpass.getuser()},
        "sweep": {"id": "sweep", "experiments": [{"job": job} for job in jobs]}})


class Finishes:
    """An experiment's lifecycle that finishes at once: what the real one does to its lease
    (released finished), its signal handlers and its queue of the monitor's events; then
    ``then(lifecycle)``."""

    _install_signal_handlers = Lifecycle._install_signal_handlers
    unread_reason_to_go = Lifecycle.unread_reason_to_go

    def __init__(self, lease, then):
        from spotrun.notify import Notifier
        self.lease, self.then = lease, then
        self.events: queue.Queue = queue.Queue()
        self._stop_event = threading.Event()
        self.supervisor, self.notifier, self.phase = None, Notifier(""), None

    def run(self) -> int:
        self._install_signal_handlers()
        self.lease.release(finished=True)
        self.phase = Phase.DONE
        self.then(self)
        return 0


def stand_in_lifecycles(monkeypatch, finishing: dict) -> None:
    """agentcmd.build_lifecycle: :class:`Finishes` for the jobs in ``finishing``, else the real one."""
    real = agentcmd.build_lifecycle

    def build(config, metadata, *, lease=None, identify=None, cancel_fleet=None):
        if config.job.id in finishing:
            return Finishes(lease, finishing[config.job.id])
        return real(config, metadata, lease=lease, identify=identify, cancel_fleet=cancel_fleet)

    monkeypatch.setattr(agentcmd, "build_lifecycle", build)


def post_notice(server, action="terminate") -> None:
    server.notice(action, datetime.now(timezone.utc) + timedelta(seconds=120))


class At(crashpoints.NoFaults):
    """Fault hooks: ``then()`` at pause point ``name``, once."""

    def __init__(self, name, then):
        self.name, self.then = name, then

    def pause(self, name):
        if name == self.name:
            self.name = None
            self.then()


def log_events(out: io.StringIO) -> list[dict]:
    return [json.loads(line[line.index("{"):]) for line in out.getvalue().splitlines() if "{" in line]


def never(lc):
    raise AssertionError("the instance told to go claimed and ran a second experiment")


@pytest.mark.parametrize("how", ["notice-posted-after-release", "notice-at-the-pause-point",
                                 "notice-seen-by-the-monitor", "sigterm"])
def test_an_instance_told_to_go_between_two_experiments_claims_nothing(
        aws, world, booted, tmp_path, monkeypatch, handlers, how):
    """Issue: the loop claimed the next experiment with a notice already posted, and only saw
    it once that experiment's lifecycle started. Now nothing is claimed: no lease item for the
    second experiment, and the next instance takes it without waiting for a takeover."""
    jobs = ["sweep-a", "sweep-b"]
    first = booted()

    def after_sweep_a(lc):
        if how == "notice-posted-after-release":
            post_notice(first.imds)
        elif how == "notice-seen-by-the-monitor":  # queued while it finished, never read
            lc.events.put(SpotNotice("terminate", datetime.now(timezone.utc)))
        elif how == "sigterm":  # through the lifecycle's own handler
            os.kill(os.getpid(), signal.SIGTERM)

    if how == "notice-at-the-pause-point":  # frozen between the release and the next claim
        crashpoints.install(At("sweep.claiming", lambda: post_notice(first.imds)))
    stand_in_lifecycles(monkeypatch, {"sweep-a": after_sweep_a, "sweep-b": never})
    runner, _ = agentcmd.build_sweep(agent_config(aws, tmp_path, jobs), first.metadata)
    end = runner.run()
    table = items(world, jobs)
    assert table["sweep-a"].get("finished") and "holder" not in table["sweep-a"]
    assert table["sweep-b"] == {}  # never claimed: no lease item at all
    assert end.outcome == "interrupted" and [r.job_id for r in end.ran] == ["sweep-a"]
    # The replacement claims it at once (the first instance is still running in EC2).
    cloud = Cloud(world)
    replacement = launch(world[0], "us-east-1a")
    cloud.runner(sweep_config(jobs), replacement).run()
    assert cloud.ran == [(replacement.instance_id, "sweep-b")]
    assert cloud.cancels == [replacement.instance_id]


@pytest.mark.parametrize("where, stop", [("identify.started", "sigterm"),
                                         ("identify.started", "stop-notice"),
                                         ("acquire.started", "sigterm")])
def test_a_stop_in_a_claimed_experiments_first_phase_gives_the_claim_back_once(
        aws, world, booted, tmp_path, handlers, where, stop):
    """The real lifecycle (spotrun.boot) of a claimed experiment stopped before anything of it
    is touched: its lease is released, not finished, exactly once, and another instance
    claims it at once while the first is still running."""
    jobs = ["sweep-a", "sweep-b"]
    first = booted()
    out = io.StringIO()
    logmod.configure(stream=out, job="sweep")
    runner, state = agentcmd.build_sweep(agent_config(aws, tmp_path, jobs), first.metadata)

    def land_stop():
        if stop == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            return
        post_notice(first.imds, "stop")  # keeps the volumes: here, none is attached
        lc, deadline = state["lifecycle"], time.monotonic() + 20
        while lc.events.empty():  # in the lifecycle's queue before its first safe point
            assert time.monotonic() < deadline, "the monitor did not see the notice"
            time.sleep(0.02)

    crashpoints.install(At(where, land_stop))
    end = runner.run()
    ended = Phase.STOPPED if stop == "stop-notice" else Phase.RELEASED
    assert end.outcome == "interrupted" and end.ran == (Ran("sweep-a", ended, 0),)
    item = items(world, jobs)["sweep-a"]
    assert "holder" not in item and item.get("released") and not item.get("finished")
    assert [e for e in log_events(out) if e["event"] == "lease_not_ours_at_release"] == []
    cloud = Cloud(world)
    other = launch(world[0], "us-east-1a")
    cloud.runner(sweep_config(jobs), other).run()
    assert sorted(job for _, job in cloud.ran) == jobs
    assert all(item.get("finished") for item in items(world, jobs).values())


def test_each_experiments_events_carry_its_own_job_and_nothing_of_the_last(world):
    out = io.StringIO()
    logmod.configure(stream=out, job="sweep")
    Cloud(world).runner(sweep_config(["sweep-a", "sweep-b"]), launch(world[0], "us-east-1a")).run()
    events = log_events(out)
    ended_a = next(n for n, e in enumerate(events)
                   if e["event"] == "sweep_experiment_ended" and e["job_id"] == "sweep-a")
    after = events[ended_a + 1:]
    assert all(e.get("job") != "sweep-a" and e.get("volume_id") != "vol-sweep-a" for e in after)
    # The next experiment's first event (the lease taken for it) is its own, with no phase yet.
    assert after[0]["job"] == "sweep-b" and "phase" not in after[0] and "volume_id" not in after[0]
    claimed = next(e for e in after if e["event"] == "sweep_claimed")
    assert claimed["job"] == claimed["job_id"] == "sweep-b"
    training = next(e for e in after if e["event"] == "stand_in_training")
    assert (training["job"], training["volume_id"]) == ("sweep-b", "vol-sweep-b")
    # Once sweep-b is over too, the sweep's own events carry the sweep's own job.
    assert next(e for e in after if e["event"] == "sweep_nothing_to_claim")["job"] == "sweep"

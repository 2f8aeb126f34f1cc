"""A protocol-aware trainer without a framework, for fast end-to-end tests of the agent.

Each "step" adds the step number to a running sum; checkpoints go through spotrun_trainer.store
(every CKPT_EVERY steps, on SIGUSR1, and on SIGTERM before exiting 75, "stopped, not done",
whoever sent it), and a restart resumes from the newest valid one. It speaks the protocol
(spotrun_trainer.protocol): a hello when it starts, and a completion record after the last
step, the only way the agent takes it as finished. The final sum is only right if every
step of the persisted lineage ran exactly once. Environment: STEPS (total), STEP_S (seconds
a step takes), CKPT_EVERY, MODE ("obey" | "crash-at:<step>" | "crash-once-at:<step>" |
"ignore-term").
Each start appends {resumed_from, reached_before} to trainer-runs.jsonl beside the checkpoints.
The soak can freeze it at a chosen point inside a save (``hold_at``).
"""
import json
import os
import signal
import sys
import time

from spotrun_trainer import protocol
from spotrun_trainer.store import CheckpointStore, write_progress

RUNS_LOG = "trainer-runs.jsonl"  # in the checkpoints directory

total = int(os.environ.get("STEPS", "200"))
step_s = float(os.environ.get("STEP_S", "0.02"))
every = int(os.environ.get("CKPT_EVERY", "50"))
mode = os.environ.get("MODE", "obey")
checkpoints = os.environ["SPOTRUN_CHECKPOINT_DIR"]
progress_file = os.environ.get("SPOTRUN_PROGRESS_FILE")
# The soak's "freeze inside a save" request: a file naming one point of CheckpointStore.save;
# at that point this trainer consumes it, says where it is, and stops itself (SIGSTOP), so a
# fault can land exactly while a checkpoint is half written.
hold_dir = os.path.dirname(progress_file) if progress_file else None


def hold_at(point):
    if not hold_dir:
        return
    request = os.path.join(hold_dir, ".soak-hold")
    try:
        with open(request) as fh:
            wanted = fh.read().strip()
    except OSError:
        return
    if wanted != point:
        return
    os.unlink(request)
    held = os.path.join(hold_dir, f".soak-held-{os.getpid()}")
    with open(held + ".tmp", "w") as fh:
        json.dump({"point": point, "step": step, "pid": os.getpid()}, fh)
    os.replace(held + ".tmp", held)
    os.kill(os.getpid(), signal.SIGSTOP)


store = CheckpointStore(checkpoints, fault_hook=hold_at)
latest = store.latest_valid()
step = latest.step if latest else 0
state = json.loads(latest.read_bytes("state.json")) if latest else {"sum": 0, "runs": 0}
state["runs"] += 1
flags = {"stop": False, "save": False}
last_checkpoint = latest.manifest["time"] if latest else None


def on_term(signum, frame):
    flags["stop"] = True


def on_usr1(signum, frame):
    flags["save"] = True


signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignore-term" else on_term)
signal.signal(signal.SIGUSR1, on_usr1)
hello = protocol.hello_path()
if hello is not None:
    protocol.write_hello(hello, handles=("SIGUSR1",) if mode == "ignore-term" else protocol.HANDLED_SIGNALS,
                         trainer="soak_trainer")
completion = protocol.completion_path(checkpoints)
print(json.dumps({"event": "trainer_start", "resume_step": step, "runs": state["runs"]}), flush=True)


def reached_before():
    """The step the previous run last reported (its progress record, written every step): the
    steps between it and the checkpoint resumed from were trained and are now trained again."""
    try:
        with open(progress_file) as fh:
            reached = json.load(fh).get("global_step")
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return reached if isinstance(reached, int) else None


# One line per start, appended on the volume and made durable before training: the rehearsal
# reads each experiment's steps redone from it (spotrun.harness.rehearsal_sweep).
with open(os.path.join(checkpoints, RUNS_LOG), "a") as fh:
    fh.write(json.dumps({"resumed_from": step, "reached_before": reached_before()}) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def save():
    global last_checkpoint
    store.save({"state.json": json.dumps(state).encode()}, step=step, epoch=0, step_in_epoch=step,
               commit=os.environ.get("SPOTRUN_CODE_COMMIT"))
    last_checkpoint = time.time()


def synthetic_loss(at_step: int) -> float:
    return 1.0 / (1.0 + at_step)


def progress():
    if progress_file:
        # A made-up loss that falls with the step, so a learning curve can be checked point
        # by point against the steps it was published at.
        write_progress(progress_file, epochs=1, global_step=step, steps_per_epoch=total,
                       last_checkpoint_time=last_checkpoint,
                       metrics={"loss": synthetic_loss(step)} if step else None)


while step < total:
    time.sleep(step_s)  # the "work" of one step
    step += 1
    state["sum"] += step
    if mode.startswith("crash-at:") and step == int(mode.split(":")[1]):
        sys.exit(3)
    crashed_once = os.path.join(checkpoints, "crashed-once")
    if mode.startswith("crash-once-at:") and step == int(mode.split(":")[1]) \
            and not os.path.exists(crashed_once):
        open(crashed_once, "w").close()
        sys.exit(3)
    # The stop flag is read once per step: a SIGTERM landing between two reads (after the
    # save decision, before the exit) would exit without its checkpoint (seen in the soak:
    # 11 steps redone). One arriving after this read is saved and acted on at the next step.
    stopping = flags["stop"]
    if stopping or flags["save"] or step % every == 0:
        save()
        flags["save"] = False
    progress()
    if stopping:
        protocol.withdraw_completion(completion)
        print(json.dumps({"event": "trainer_preempted", "step": step}), flush=True)
        sys.exit(protocol.STOPPED_EXIT_CODE)
metrics = {"sum": state["sum"], "steps": step, "runs": state["runs"]}
with open(os.path.join(checkpoints, "final_metrics.json.tmp"), "w") as fh:
    json.dump(metrics, fh)
os.replace(os.path.join(checkpoints, "final_metrics.json.tmp"), os.path.join(checkpoints, "final_metrics.json"))
protocol.write_completion(completion, metrics=metrics)  # last: the positive act of finishing
print(json.dumps({"event": "trainer_finished", "sum": state["sum"]}), flush=True)

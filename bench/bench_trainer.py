"""A framework-free, protocol-aware trainer that records when signals reach it.

Like the end-to-end tests' counting trainer, but for measuring: every event it sees is one
JSON line with the wall time in $BENCH_EVENTS (a file, so it works whether the agent sends
trainer output to the journal or to a log file). A "step" sleeps STEP_S seconds; the
checkpoint holds STATE_BYTES bytes (the tiny Keras model's state by default) and goes
through spotrun_trainer.store, the store SpotCheckpoint writes through, so "durable" is the
same atomic-rename-and-fsync point. SIGTERM → finish the step, checkpoint, exit 0.

Environment: STEPS, STEP_S, CKPT_EVERY (steps), STATE_BYTES, BENCH_EVENTS, and the agent's
SPOTRUN_CHECKPOINT_DIR / SPOTRUN_PROGRESS_FILE.
"""
import json
import os
import signal
import sys
import time

from spotrun_trainer.store import CheckpointStore, write_progress

total = int(os.environ.get("STEPS", "1000000"))
step_s = float(os.environ.get("STEP_S", "0.05"))
every = int(os.environ.get("CKPT_EVERY", "0"))
state_bytes = int(os.environ.get("STATE_BYTES", "100000"))
events_path = os.environ.get("BENCH_EVENTS")
progress_file = os.environ.get("SPOTRUN_PROGRESS_FILE")
store = CheckpointStore(os.environ["SPOTRUN_CHECKPOINT_DIR"])
latest = store.latest_valid()
step = latest.step if latest else 0
last_checkpoint = latest.manifest["time"] if latest else None
stop = {"at": None}


def record(event, **fields):
    line = json.dumps({"event": event, "wall": time.time(), "pid": os.getpid(), **fields})
    if events_path:
        with open(events_path, "a") as fh:
            fh.write(line + "\n")
    print(line, flush=True)


def on_term(signum, frame):
    if stop["at"] is None:
        stop["at"] = time.time()
        record("sigterm_received", step=step)


def save():
    global last_checkpoint
    payload = os.urandom(state_bytes)
    store.save({"state.bin": payload}, step=step, epoch=0, step_in_epoch=step)
    last_checkpoint = time.time()


def progress():
    if progress_file:
        write_progress(progress_file, epochs=1, global_step=step, steps_per_epoch=total,
                       last_checkpoint_time=last_checkpoint)


signal.signal(signal.SIGTERM, on_term)
record("trainer_start", resume_step=step)
while step < total:
    time.sleep(step_s)  # the "work" of one step; a signal handler runs at once (PEP 475)
    step += 1
    # Read the flag once per step: a SIGTERM landing between a save check and an exit check
    # would otherwise exit without its checkpoint.
    stopping = stop["at"] is not None
    if stopping or (every and step % every == 0):
        save()
        if stopping:
            record("checkpoint_durable", step=step)
    progress()
    if stopping:
        sys.exit(0)
with open(os.path.join(store.directory, "final_metrics.json"), "w") as fh:
    json.dump({"steps": step}, fh)
record("trainer_finished", step=step)

"""The rehearsal's report for a script that knows nothing of spotrun: its own checkpoint
files on the volume images (rehearsal_volume.list_script_files) grouped and numbered as a user
names them; per interruption, the newest whole one when the trainer stopped, the training lost
since, and where the replacement resumed; and, with --compare-with-callback, the same schedule's
cost with spotrun's reference trainer beside it."""
from __future__ import annotations

import re
import textwrap


# What a saved file's name ends with that is not the checkpoint's own name: TensorFlow's
# `<name>.index` and `<name>.data-00000-of-00001` are one checkpoint, as are `.keras`, `.h5`…
_SAVE_SUFFIX = re.compile(r"(\.data-\d+-of-\d+|\.index|\.keras|\.weights\.h5|\.h5|\.hdf5|\.ckpt|"
                          r"\.pt|\.pth|\.pkl|\.npz|\.tar|\.zip)$")


def script_checkpoints(files: list[dict] | None) -> list[dict]:
    """A script's own files (rehearsal_volume.list_script_files) as checkpoints, oldest first:
    ``{"name", "number", "mtime"}``, the number being the last one in the name
    (``cifar10_model.003.keras`` → 3; Keras numbers epochs from 1). Where some are numbered,
    the others (TensorFlow's `checkpoint` index file, logs) are left out."""
    groups: dict[str, dict] = {}
    for f in files or []:
        parent, _, stem = f["path"].rpartition("/")
        while (suffix := _SAVE_SUFFIX.search(stem)) and suffix.start() > 0:
            stem = stem[:suffix.start()]
        group = groups.setdefault(f"{parent}/{stem}", {"name": f"{parent}/{stem}", "mtime": f["mtime"],
                                                       "torn": False})
        group["mtime"] = max(group["mtime"], f["mtime"])
        group["torn"] = group["torn"] or f.get("intact") is False
    for group in groups.values():
        digits = re.findall(r"\d+", group["name"].rpartition("/")[2])
        group["number"] = int(digits[-1]) if digits else None
    found = sorted(groups.values(), key=lambda g: (g["mtime"], g["name"]))
    numbered = [g for g in found if g["number"] is not None]
    return numbered or found


def script_figures(rehearsal, boots: list[dict]) -> list[dict]:
    """Per interruption, for a script that knows nothing of spotrun: from its own checkpoint
    files on the volume images, the newest one when its trainer stopped, the training time
    lost since, and where the replacement resumed (its first new file's number, less one)."""
    listings = [r.script_files_after_drain for r in rehearsal.interruptions]
    listings.append(rehearsal.final_script_files)
    rows = []
    for i, record in enumerate(rehearsal.interruptions):
        index = next((k for k, b in enumerate(boots) if b["instance_id"] == record.instance_id), None)
        boot = boots[index] if index is not None else {}
        replacement = boots[index + 1] if index is not None and index + 1 < len(boots) else None
        exit_ = boot.get("trainer_exit") or {}
        stopped = exit_.get("wall") or record.notice_wall
        started = boot.get("training_wall")
        written = [c for c in script_checkpoints(listings[i]) if c["mtime"] <= stopped]
        # A file torn by the stop (written in place when SIGTERM came) is no resume point.
        at_stop = [c for c in written if not c["torn"]]
        newest = at_stop[-1] if at_stop else None
        since = max(newest["mtime"] if newest else started or stopped, started or 0.0)
        first = None
        if replacement is not None and replacement.get("training_wall") is not None:
            later = [c for c in script_checkpoints(listings[i + 1])
                     if c["mtime"] > replacement["training_wall"]]
            first = later[0] if later else None
        resumed = first["number"] - 1 if first and first["number"] is not None else None
        newest_number = newest["number"] if newest else 0
        rows.append({
            "instance_id": record.instance_id, "az": record.az, "cause": record.cause,
            "trainer_ran_s": delta(started, stopped),
            "notice_to_volume_released_s": delta(record.notice_wall, boot.get("released_wall")),
            "trainer_returncode": exit_.get("returncode"), "trainer_outcome": exit_.get("outcome"),
            "torn_at_stop": [c["name"] for c in written if c["torn"]],
            "newest_checkpoint_at_stop": newest["name"] if newest else None,
            "newest_checkpoint_number": newest["number"] if newest else None,
            "checkpoint_age_at_stop_s": delta(newest["mtime"], stopped) if newest else None,
            "training_lost_s": delta(since, stopped),
            "replacement": replacement["instance_id"] if replacement else None,
            "replacement_first_checkpoint": first["name"] if first else None,
            "resumed_after_number": resumed,
            "resumed_from_newest": (resumed == newest_number
                                    if resumed is not None and newest_number is not None else None),
            "numbers_redone": (max(0, newest_number - resumed)
                               if resumed is not None and newest_number is not None else None),
        })
    return rows


def delta(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 3)


def cause_of(r: dict) -> str:
    cause = r.get("cause") or "spot notice"
    return "scheduled instance-retirement event" if cause == "instance-retirement" else cause


def _how_it_stopped(r: dict) -> str:
    code = r["trainer_returncode"]
    if code == -15:
        return "it has no SIGTERM handler: the signal killed it at once"
    if code == -9:
        return "it did not exit by the drain's deadline and was killed (SIGKILL)"
    return f"it exited {code} after SIGTERM" if code is not None else "its exit was not seen"


def script_summary_lines(report: dict) -> list[str]:
    """The same story for a script that knows nothing of spotrun, told from its own files."""
    lines = []
    for r in report.get("script_interruptions") or []:
        newest = (f"its newest checkpoint was {r['newest_checkpoint_at_stop']}, written "
                  f"{r['checkpoint_age_at_stop_s']} s before" if r["newest_checkpoint_at_stop"]
                  else "it had written no checkpoint yet")
        if r["resumed_after_number"] is None:
            resumed = (f"the replacement {r['replacement']} wrote no numbered checkpoint, so where "
                       "it resumed cannot be told from the volume")
        elif r["resumed_from_newest"]:
            resumed = (f"the replacement {r['replacement']} resumed from it: its first new file is "
                       f"{r['replacement_first_checkpoint']}")
        else:
            resumed = (f"the replacement {r['replacement']} did NOT resume from it: its first new "
                       f"file is {r['replacement_first_checkpoint']} ({r['numbers_redone']} redone)")
        lines.append(textwrap.fill(
            f"The {cause_of(r)} reached {r['instance_id']} ({r['az']}) after its trainer had run "
            f"{r['trainer_ran_s']} s; {_how_it_stopped(r)}. When it stopped, {newest}: "
            f"{r['training_lost_s']} s of training lost"
            + (f" (and it left {', '.join(r['torn_at_stop'])} torn: written in place when the "
               "signal came)" if r["torn_at_stop"] else "")
            + f". Then {resumed}.", width=100))
    return lines


ADVICE = ("advice: spotrun's callback saves when the notice comes (SIGTERM), so a replacement "
          "loses no trained weights: add `from spotrun_trainer import SpotCheckpoint` and "
          "`callbacks=[SpotCheckpoint()]` to model.fit (with plain arrays the interrupted "
          "epoch's first steps are replayed; its data helpers resume at the exact step: "
          "docs/trainer.md).")


def callback_comparison(script: dict, callback: dict, step_s: float) -> dict:
    """Interruption by interruption, what the user's script lost beside what spotrun's callback
    (the reference trainer, the same schedule) lost: its steps redone, at ``step_s`` each."""
    rows = []
    mine = script.get("script_interruptions") or script["interruptions"]
    theirs = callback["interruptions"]
    for index, row in enumerate(mine):
        other = theirs[index] if index < len(theirs) else {}
        redone = other.get("steps_redone")
        rows.append({"cause": row.get("cause"),
                     "script_training_lost_s": row.get("training_lost_s"),
                     "callback_steps_redone": redone,
                     "callback_training_lost_s": round(redone * step_s, 3) if isinstance(redone, int) else None,
                     "callback_checkpoint_durable_after_notice_s": other.get("notice_to_durable_checkpoint_s")})
    return {"step_s": step_s, "interruptions": rows, "callback_failures": callback["failures"],
            "callback_notes": callback.get("notes", [])}


def comparison_lines(comparison: dict, where: str) -> list[str]:
    lines = [f"with spotrun's callback (the reference trainer paced at {comparison['step_s']:g} s a "
             f"step, the same schedule; {where}):",
             "  (another workload, not your script with the callback: compare what each "
             "interruption cost, not the runs)"]
    for i, r in enumerate(comparison["interruptions"], 1):
        lines.append(f"  interruption {i}: your script lost {r['script_training_lost_s']} s of "
                     f"training; the callback redid {r['callback_steps_redone']} steps "
                     f"({r['callback_training_lost_s']} s), its checkpoint durable "
                     f"{r['callback_checkpoint_durable_after_notice_s']} s after the notice")
    lines += [f"  the callback's run: {f}" for f in comparison["callback_failures"]]
    return lines

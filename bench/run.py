"""`make bench`: spotrun against the seed's scheme and Keras BackupAndRestore, in one run.

    .venv/bin/python -m bench.run --out bench/results.json        # the full suite (≤ 15 min, 2 cores)
    .venv/bin/python -m bench.run --quick --out /tmp/r.json       # few samples: is it all wired up?
    .venv/bin/python -m bench.run --only reaction,footprint ...   # some figures

Writes the JSON (one entry per figure: name, scheme, unit, samples, n, median, p99 where it
applies, configuration, goal and whether it was met) and a Markdown table next to it
(results.md). Goals are reported, never asserted. What each figure measures and how:
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.figures import figure

HERE = Path(__file__).resolve().parent
GROUPS = ("reaction", "schemes", "boots", "overhead", "footprint", "sweep")


def _profile(quick: bool) -> dict:
    if quick:
        return {"polls": [0.25, 1.0], "notices": 2, "idle_s": 3.0,
                "job": {"epochs": 2, "samples": 256, "batch_size": 32, "save_steps": 3, "interruptions": 1},
                "boots": {"interrupt_at": [20], "steps": 60,
                          "aws": {"run": False, "scale": 0.25, "interrupt_at": [20], "steps": 60}},
                "overhead": ["--seconds", "3", "--interval", "1", "--warmup-steps", "5", "--samples", "512"],
                "footprint_s": 5.0,
                "sweep": {"experiments": 4, "capacity": 2, "steps": 100, "interrupt_after_s": [5.0]}}
    return {"polls": [0.25, 1.0], "notices": 100, "idle_s": 30.0,
            "job": {"epochs": 6, "samples": 1024, "batch_size": 32, "save_steps": 8, "interruptions": 3},
            # aws: one boot of each kind and one drain per policy, the waits ×0.25 (docs/benchmarks.md)
            "boots": {"interrupt_at": [30, 80], "steps": 150,
                      "aws": {"run": True, "scale": 0.25, "interrupt_at": [20], "steps": 60}},
            "overhead": ["--seconds", "65", "--interval", "30"],
            "footprint_s": 60.0,
            # issue 19: N = 6 on capacity 3, two interruptions, replacements in random zones
            "sweep": {"experiments": 6, "capacity": 3, "steps": 200, "interrupt_after_s": [6.0, 14.0]}}


# -- figure 1 ------------------------------------------------------------------------------

def reaction_figures(profile: dict, workdir: Path) -> list[dict]:
    from bench import reaction

    results = reaction.run(profile["polls"], profile["notices"], workdir / "reaction")
    out = []
    for poll, samples in sorted(results.items()):
        config = {"notice_poll_interval_s": poll, "notices": len(samples), "path": "monitor → lifecycle → "
                  "supervisor → SIGTERM (real agent code in-process, IMDSv2 over HTTP)",
                  "trainer": "bench/bench_trainer.py, 50 ms steps, 100 kB state via spotrun_trainer.store",
                  "notice_time": "uniform in [0, poll interval) after the trainer's first step"}
        default = poll == 0.25  # metadata.notice_poll_interval_s's default
        out.append(figure("notice_to_sigterm", scheme=f"spotrun (poll {poll:g} s)", unit="s",
                          samples=[s["notice_to_sigterm_s"] for s in samples if s["notice_to_sigterm_s"] is not None],
                          config=config,
                          goal="p99 <= 0.3 s" if default else None,
                          meets=(lambda e: e["p99"] <= 0.3) if default else None))
        out.append(figure("agent_handling_detected_to_sigterm", scheme=f"spotrun (poll {poll:g} s)", unit="s",
                          samples=[s["detected_to_sigterm_s"] for s in samples
                                   if s.get("detected_to_sigterm_s") is not None],
                          config={**config, "what": "the monitor hands the notice on → SIGTERM in the "
                                  "trainer (the agent's own share of notice_to_sigterm; the rest is polling)"}))
        out.append(figure("notice_to_durable_checkpoint", scheme=f"spotrun (poll {poll:g} s)", unit="s",
                          samples=[s["notice_to_durable_s"] for s in samples if s["notice_to_durable_s"] is not None],
                          config=config, goal="<= 5 s (tiny model)" if default else None,
                          meets=(lambda e: e["p99"] <= 5.0) if default else None))
    idle = reaction.idle_request_rate(profile["idle_s"])
    out.append(figure("metadata_requests_per_second_idle", scheme="spotrun (default intervals)",
                      unit="requests/s", value=idle["per_second"], with_p99=False,
                      config={**idle, "counted_by": "the local metadata server (requests answered)"},
                      goal="<= 5 requests/s", meets=lambda e: e["median"] <= 5.0))
    seed_note = ("the seed's per-batch callback polls metadata and then sleeps; it never checkpoints on a "
                 "notice and installs no SIGTERM handler, so nothing becomes durable: the work since the "
                 "last epoch-end file is lost instead (work_lost_per_interruption, scheme seed)")
    out.append(figure("notice_to_sigterm", scheme="seed", unit="s", config={"source": "examples/seed_style/train.py"},
                      note="n/a: no agent; the trainer only notices the notice at its next batch and sleeps"))
    out.append(figure("notice_to_durable_checkpoint", scheme="seed", unit="s",
                      config={"source": "examples/seed_style/train.py"}, note="never: " + seed_note))
    return out


# -- figures 2 and 3 -----------------------------------------------------------------------

SCHEME_NAMES = {"spotrun": "spotrun", "seed": "seed (per-epoch ModelCheckpoint)",
                "bnr-epoch": "Keras BackupAndRestore(epoch)", "bnr-step": "Keras BackupAndRestore(step {n})",
                "bnr-term": "Keras BackupAndRestore(step {n}) + SIGTERM handler that saves"}


def scheme_figures(profile: dict, workdir: Path) -> list[dict]:
    from bench import schemes

    job = schemes.Job(**profile["job"])
    results = schemes.run(job, workdir / "schemes")
    config = {"model": "spotrun_trainer.resnet_cifar tiny", "backend": "jax", "epochs": job.epochs,
              "steps_per_epoch": job.steps_per_epoch, "total_steps": job.total_steps,
              "batch_size": job.batch_size, "interruption_positions": job.schedule(),
              "interruption": "SIGTERM from the runner (outside the trainer) once the trainer reports the "
                              "position reached; it trains on while the signal is on its way",
              "counted_by": "the trainer's witness callback (bench/scheme_trainer.py Interrupter), not the "
                            "scheme: batches run per process, and each run's data start; steps redone at an "
                            "interruption = the data-stream step the run reached − the one the next run "
                            "started at (their sum = steps run − job steps)",
              "schemes_ran": "side by side, one process per scheme at a time"}
    out = []
    goodput = {}
    for key, run in results.items():
        name = SCHEME_NAMES[key].format(n=job.save_steps)
        spot = key == "spotrun"
        out.append(figure("work_lost_per_interruption", scheme=name, unit="steps redone", samples=run.redone,
                          config={**config, "steps_redone_total": run.redone_total},
                          goal="<= 1 step" if spot else None,
                          meets=(lambda e: e["p99"] <= 1) if spot else None))
        out.append(figure("work_lost_per_interruption_by_optimizer", scheme=name, unit="optimizer steps lost",
                          samples=run.redone_by_iterations,
                          config={**config, "what": "optimizer iterations the interrupted run reached − those "
                                  "the next run restored: the state kept, whatever data is replayed (differs "
                                  "from work_lost_per_interruption where the data restarts at the epoch's first "
                                  "batch on weights of a later step: BackupAndRestore(step))"}))
        goodput[key] = job.total_steps / run.executed
        out.append(figure("goodput", scheme=name, unit="useful steps / steps run", value=goodput[key],
                          with_p99=False, config={**config, "steps_run": run.executed,
                                                  "runs": run.runs},
                          goal=">= 0.97" if spot else None,
                          meets=(lambda e: e["median"] >= 0.97) if spot else None))
        out.append(figure("job_wall_time", scheme=name, unit="s", value=run.wall_s, with_p99=False,
                          config={**config, "what": "trainer processes' wall time summed (start-up and "
                                  "compilation included; replacement instances not included: see boot_to_training)"}))
        if spot:
            out.append(figure("sigterm_to_exit_tiny_keras", scheme="spotrun", unit="s",
                              samples=[r["sigterm_to_exit_s"] for r in run.runs if r["sigterm_to_exit_s"] is not None],
                              config={**config, "what": "the runner's SIGTERM → SpotCheckpoint's checkpoint "
                                      "durable at the next step boundary → process exit (an upper bound on → "
                                      "durable), real tiny Keras model"}))
    if "spotrun" in goodput and "seed" in goodput:
        out.append(figure("goodput_ratio_to_seed", scheme="spotrun ÷ seed", unit="ratio",
                          value=goodput["spotrun"] / goodput["seed"], with_p99=False, config=config))
    return out


# -- figure 3b: boots ----------------------------------------------------------------------

def boot_figures(profile: dict, workdir: Path) -> list[dict]:
    """Figure 3b under the fast timing model (every sample) and the aws one (scaled, one
    sample of each boot kind and a drain); every entry names its model (agent_runs.timing_label)."""
    from bench import agent_runs
    from spotrun.localcloud import TimingModel

    spec = profile["boots"]
    fast = TimingModel.fast()
    runs = [agent_runs.boots(workdir / "boots", policy, spec["interrupt_at"], spec["steps"], timing=fast)
            for policy in ("fixed:us-east-1a", "round-robin")]
    out = agent_runs.figures(runs, fast)
    aws = spec["aws"]
    model = TimingModel.aws_like().scaled(aws["scale"]) if aws["scale"] != 1 else TimingModel.aws_like()
    # EC2's two-minute notice on the same scale: the drain's snapshot must fit inside it.
    aws_runs = [agent_runs.boots(workdir / "boots-aws", policy, aws["interrupt_at"], aws["steps"],
                                 timeout_s=600, timing=model, notice_s=120.0 * aws["scale"])
                for policy in ("fixed:us-east-1a", "round-robin")] if aws["run"] else []
    out += agent_runs.figures(aws_runs, model, note=None if aws["run"] else
                              "n/a in --quick: the aws timing model's boots take minutes (run without --quick)")
    problems = agent_runs.check_timing_labels(out)
    if problems:
        raise ValueError("boot figures name the wrong timing model: " + "; ".join(problems))
    return out


# -- figure 4 ------------------------------------------------------------------------------

def overhead_figures(profile: dict, workdir: Path) -> list[dict]:
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(HERE / "trainer_overhead.py"), *profile["overhead"], "--dir", str(workdir)]
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench/trainer_overhead.py failed (exit {proc.returncode}): {proc.stderr[-800:]}")
    report = json.loads(lines[-1])
    config = {k: report[k] for k in ("model", "batch_size", "interval_s", "seconds_per_mode", "backend",
                                     "keras", "device")}
    config["command"] = " ".join(["python", "bench/trainer_overhead.py", *profile["overhead"]])
    out = []
    for result in report["results"]:
        if result["mode"] == "none":
            continue
        asynchronous = result["mode"] == "async"
        out.append(figure("checkpoint_overhead", scheme=f"spotrun ({result['mode']}, every {report['interval_s']:g} s)",
                          unit="% throughput", value=result["overhead_pct"], with_p99=False,
                          config={**config, **{k: result[k] for k in ("steps_per_s", "checkpoints",
                                                                      "blocked_ms_per_checkpoint")}},
                          goal="<= 3 % (CPU, tiny)" if asynchronous else None,
                          meets=(lambda e: e["median"] <= 3.0) if asynchronous else None))
        out.append(figure("checkpoint_blocked_time", scheme=f"spotrun ({result['mode']})", unit="ms per checkpoint",
                          value=result["blocked_ms_per_checkpoint"], with_p99=False, config=config))
        # Throughput ratios on a shared 2-core machine move by several percent between runs
        # (a "negative overhead" is noise); the training thread's blocked time per checkpoint
        # over the interval is the same cost, measured where the noise does not reach.
        blocked_pct = 100.0 * result["blocked_ms_per_checkpoint"] / (1000.0 * report["interval_s"])
        out.append(figure("checkpoint_overhead_from_blocked_time", scheme=f"spotrun ({result['mode']}, every "
                          f"{report['interval_s']:g} s)", unit="% of training time", value=blocked_pct,
                          with_p99=False, config={**config, "what": "blocked ms per checkpoint ÷ interval"},
                          goal="<= 3 % (CPU, tiny)" if asynchronous else None,
                          meets=(lambda e: e["median"] <= 3.0) if asynchronous else None))
    return out


# -- figure 5 ------------------------------------------------------------------------------

def footprint_figures(profile: dict, workdir: Path) -> list[dict]:
    from bench import agent_runs

    result = agent_runs.idle_footprint(workdir / "footprint", profile["footprint_s"])
    config = {k: v for k, v in result.items() if k not in ("rss_mib",)}
    return [
        figure("idle_agent_rss", scheme="spotrun agent", unit="MiB", samples=result["rss_mib"], config=config,
               goal="<= 60 MB", meets=lambda e: e["p99"] * 2**20 <= 60e6),
        figure("idle_agent_cpu", scheme="spotrun agent", unit="% of one core",
               value=result["cpu_percent_of_one_core"], with_p99=False, config=config,
               goal="<= 1 %", meets=lambda e: e["median"] <= 1.0),
    ]


def sweep_figures(profile: dict, workdir: Path) -> list[dict]:
    """A sweep under one interruption schedule, claimed zone-first vs in order (issue 19)."""
    from bench import sweep_runs

    spec = profile["sweep"]
    out = []
    for policy in ("zone-first", "in-order"):
        result = sweep_runs.run(workdir / policy, policy, experiments=spec["experiments"],
                                capacity=spec["capacity"], steps=spec["steps"],
                                interrupt_after_s=tuple(spec["interrupt_after_s"]))
        config = {**result, "schedule_s": spec["interrupt_after_s"],
                  "zones": "replacements in random zones (localcloud --member-zones random:7)",
                  "from": "the local cloud's ledger: CreateVolume beyond one per experiment, "
                          "CreateFleet → DeleteFleets, Σ steps × step time / instance-seconds"}
        scheme = f"spotrun sweep ({policy})"
        out += [figure("sweep_cross_az_migrations", scheme=scheme, unit="migrations",
                       value=float(result["migrations"]), with_p99=False, config=config),
                figure("sweep_makespan", scheme=scheme, unit="s", value=result["makespan_s"],
                       with_p99=False, config=config),
                figure("sweep_goodput", scheme=scheme, unit="ratio", value=result["goodput"],
                       with_p99=False, config=config)]
    return out


RUNNERS = {"reaction": reaction_figures, "schemes": scheme_figures, "boots": boot_figures,
           "overhead": overhead_figures, "footprint": footprint_figures, "sweep": sweep_figures}


# -- output --------------------------------------------------------------------------------

def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def table(results: dict) -> str:
    lines = [f"spotrun benchmarks — {results['mode']} run, {results['generated']}, "
             f"{results['host']['cpus']} CPUs, {results['duration_s']:.0f} s", "",
             "| figure | scheme | unit | n | median | p99 | goal | met |",
             "|---|---|---|---:|---:|---:|---|---|"]
    for f in results["figures"]:
        met = {True: "yes", False: "**no**", None: ""}[f.get("goal_met")]
        median = _fmt(f["median"]) if f["median"] is not None else (f.get("note", "—").split(":")[0])
        lines.append(f"| {f['name']} | {f['scheme']} | {f['unit']} | {f['n'] or ''} | {median} | "
                     f"{_fmt(f['p99']) if f['p99'] is not None else ''} | {f.get('goal', '')} | {met} |")
    if results.get("errors"):
        lines += ["", "Errors:"] + [f"- {group}: {error}" for group, error in results["errors"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results.json", help="the JSON results (the table goes next to it, .md)")
    parser.add_argument("--quick", action="store_true", help="few samples: checks the wiring, not the numbers")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated: {', '.join(GROUPS)}")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a new one under /tmp, removed)")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"--only: unknown figure group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    out = Path(args.out)
    if not out.parent.is_dir():
        parser.error(f"--out: directory {out.parent} does not exist")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="spotrun-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # the rehearsals' trainer runs as an unprivileged user

    from spotrun import log as logmod
    log_path = workdir / "bench.log"
    logmod.configure(stream=open(log_path, "a"))
    profile = _profile(args.quick)
    started = time.monotonic()
    figures, errors, timings = [], {}, {}
    try:
        for group in groups:
            began = time.monotonic()
            print(f"bench: {group} ...", file=sys.stderr, flush=True)
            try:
                figures += RUNNERS[group](profile, workdir / group)
            except Exception as exc:  # one broken figure must not cost the others
                errors[group] = f"{type(exc).__name__}: {exc}"
                print(f"bench: {group} failed: {errors[group]}", file=sys.stderr, flush=True)
            timings[group] = round(time.monotonic() - began, 1)
    finally:
        if not args.workdir and not errors:
            shutil.rmtree(workdir, ignore_errors=True)
    results = {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "mode": "quick" if args.quick else "full",
        "command": " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])]),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                 "load_average_at_end": list(os.getloadavg())},
        "duration_s": round(time.monotonic() - started, 1), "group_seconds": timings,
        "figures": figures, "errors": errors,
        "scratch": str(workdir) if errors or args.workdir else None,
    }
    out.write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

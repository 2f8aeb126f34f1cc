"""A minimal agent for the volume acceptance tests: identify (from the instance's metadata
service) + acquire the job's volume, optionally write a file on it, optionally hold it
until a go-file appears, optionally release it. Run as a separate process, on a local cloud
instance, so that SIGKILL at a crash point is a real kill: like the test launcher
(spotrun.localcloud.faultagent), it installs the fault hooks its environment names
(SPOTRUN_CRASH_AT, SPOTRUN_RECORD_AWS_CALLS) before it starts.

    python c2_agent.py CONFIG.json [--write REL=TEXT] [--checkpoint STEP] [--hold-until PATH]
                               [--release [--snapshot yes|no]]

Prints one JSON line ``{"result": {...}}`` on success; exits like ``spotrun`` on errors
(the message on stderr, exit 1 or 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from spotrun import config as configmod
from spotrun.errors import SpotrunError
from spotrun.identity import identify
from spotrun.imds import MetadataClient
from spotrun.log import configure
from spotrun.volumes import VolumeManager


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", help="JSON mapping of config sections")
    parser.add_argument("--write", action="append", default=[], help="REL=TEXT under the mount point")
    parser.add_argument("--checkpoint", type=int, default=0, help="save a checkpoint at this step")
    parser.add_argument("--hold-until", default="", help="wait for this file before going on")
    parser.add_argument("--release", action="store_true")
    parser.add_argument("--snapshot", choices=["default", "yes", "no"], default="default")
    parser.add_argument("--holder-wait", type=float, default=60.0)
    args = parser.parse_args()
    configure("info", stream=sys.stderr)
    try:
        config = configmod.from_mapping(json.loads(Path(args.config).read_text()), args.config)
        identity = identify(MetadataClient.from_config(config.metadata))
        manager = VolumeManager(config, identity, holder_wait_s=args.holder_wait, lease_poll_s=0.2)
        acquired = manager.acquire()
        for item in args.write:
            rel, _, text = item.partition("=")
            target = config.mount_point / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        if args.checkpoint:
            from spotrun_trainer.store import CheckpointStore
            CheckpointStore(config.checkpoints_path).save(
                {"weights.bin": bytes(range(256)) * 64}, step=args.checkpoint, epoch=1,
                step_in_epoch=args.checkpoint)
        if args.hold_until:
            print(json.dumps({"holding": acquired.volume_id}), flush=True)
            deadline = time.monotonic() + 120
            while not Path(args.hold_until).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        if args.release:
            manager.release(snapshot={"default": None, "yes": True, "no": False}[args.snapshot])
        result = {k: str(v) if isinstance(v, Path) else v
                  for k, v in dataclasses.asdict(acquired).items()}
        print(json.dumps({"result": result}), flush=True)
        return 0
    except configmod.ConfigError as exc:
        print(f"spotrun: configuration error: {exc}", file=sys.stderr)
        return 2
    except SpotrunError as exc:
        print(f"spotrun: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    from spotrun.localcloud import faultagent

    faultagent.install_from_env()
    raise SystemExit(main())

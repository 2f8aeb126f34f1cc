"""Helpers for the local cloud's tests (a unique module name: tests/ has no packages)."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable

from spotrun import waiting


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05,
               what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    return waiting.wait_until(predicate, timeout, interval_s=interval, what=what,
                              error=lambda: AssertionError(f"timed out after {timeout}s waiting for {what}"))


def loop_devices_backed_by(root: Path) -> list[str]:
    """Loop devices whose backing file lives under ``root`` (what a cloud must release)."""
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines()
            if len(line.split()) > 1 and line.split()[1].startswith(str(root))]


def mounts_under(root: Path) -> list[str]:
    from spotrun import blockdev

    return [m["mount_point"] for m in blockdev.mounts() if m["mount_point"].startswith(str(root))]

"""CI proves what it claims: under CI (or SPOTRUN_REQUIRE_REAL=1, as `make test` sets) a missing
loop device, root or tool fails the run with a message naming it, and an environment skip is a
failure; elsewhere nothing changes. Each case is a real pytest run in a subprocess, with
tests/conftest.py loaded and a plugin standing in for the machine's probes (realguard)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

PRETEND_NO_LOOP = '''
import realguard
realguard.is_root = lambda: True
realguard.which = lambda tool: "/usr/bin/" + tool
realguard.probe_loop = lambda: (False, "no /dev/loop-control (pretended by the test)")
'''
PRETEND_ALL_PRESENT = '''
import realguard
realguard.is_root = lambda: True
realguard.which = lambda tool: "/usr/bin/" + tool
realguard.probe_loop = lambda: (True, "")
'''
PRETEND_NO_ROOT_NO_NSPAWN = '''
import realguard
realguard.is_root = lambda: False
realguard.which = lambda tool: None if tool == "systemd-nspawn" else "/usr/bin/" + tool
realguard.probe_loop = lambda: (True, "")
'''
SAMPLE = '''
import pytest

def test_runs():
    assert 1 + 1 == 2

def test_wants_loop_devices():
    pytest.skip("loop devices unavailable: no /dev/loop-control")
'''


def run_pytest(tmp_path: Path, plugin: str, **env) -> subprocess.CompletedProcess:
    (tmp_path / "pretend.py").write_text(plugin)
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    base = {k: v for k, v in os.environ.items()
            if k not in ("CI", "SPOTRUN_REQUIRE_REAL", "SPOTRUN_LOCALCLOUD_VOLUMES",
                         "PYTEST_ADDOPTS")}
    base["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(TESTS), str(TESTS / "helpers")])
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "pretend",
         "-p", "conftest", "test_sample.py"],
        cwd=tmp_path, env={**base, **env}, capture_output=True, text=True, timeout=120)


def test_under_ci_a_missing_loop_device_fails_the_run_naming_it(tmp_path):
    proc = run_pytest(tmp_path, PRETEND_NO_LOOP, CI="true")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "loop devices (no /dev/loop-control (pretended by the test))" in out
    assert "modprobe loop" in out and "CI is set" in out
    assert "passed" not in out  # stopped before any test ran


def test_make_tests_variable_requires_the_same(tmp_path):
    proc = run_pytest(tmp_path, PRETEND_NO_ROOT_NO_NSPAWN, SPOTRUN_REQUIRE_REAL="1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "root:" in out and "systemd-nspawn" in out and "systemd-container" in out
    assert "SPOTRUN_REQUIRE_REAL=1" in out


def test_asking_for_directory_volumes_under_ci_fails(tmp_path):
    proc = run_pytest(tmp_path, PRETEND_ALL_PRESENT, CI="true",
                      SPOTRUN_LOCALCLOUD_VOLUMES="directory")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "SPOTRUN_LOCALCLOUD_VOLUMES=directory" in out and "unset it" in out


def test_with_everything_present_the_run_goes_on_but_an_environment_skip_fails(tmp_path):
    proc = run_pytest(tmp_path, PRETEND_ALL_PRESENT, CI="true")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "1 failed, 1 passed" in out
    assert "a skip for a missing part of the machine is a failure" in out


def test_outside_ci_the_same_skip_stays_a_skip(tmp_path):
    proc = run_pytest(tmp_path, PRETEND_NO_LOOP)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 passed, 1 skipped" in out


@pytest.mark.parametrize("value, expected", [("", "loop"), ("loop", "loop"),
                                             ("Directory", "directory")])
def test_the_volume_kind_is_asked_for_by_name(monkeypatch, value, expected):
    from spotrun.localcloud import ebs

    monkeypatch.setenv(ebs.VOLUMES_ENV, value)
    assert ebs.volumes_asked_for() == expected


def test_an_unknown_volume_kind_is_an_error_naming_the_variable(monkeypatch):
    from spotrun.localcloud import ebs

    monkeypatch.setenv(ebs.VOLUMES_ENV, "tmpfs")
    with pytest.raises(ebs.DataPlaneError, match="SPOTRUN_LOCALCLOUD_VOLUMES='tmpfs'"):
        ebs.volumes_asked_for()


def test_without_loop_devices_the_data_plane_fails_unless_directories_are_asked_for(
        monkeypatch, tmp_path):
    from spotrun.localcloud import ebs

    monkeypatch.delenv(ebs.VOLUMES_ENV, raising=False)
    monkeypatch.setattr(ebs, "probe_loop_devices", lambda scratch: (False, "no /dev/loop-control"))
    with pytest.raises(ebs.DataPlaneError, match="SPOTRUN_LOCALCLOUD_VOLUMES=directory"):
        ebs.EbsDataPlane(tmp_path / "a")
    monkeypatch.setenv(ebs.VOLUMES_ENV, "directory")
    plane = ebs.EbsDataPlane(tmp_path / "b")
    assert plane.uses_loop_devices is False and "asked for" in plane.no_loop_reason

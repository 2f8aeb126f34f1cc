"""``spotrun localcloud ...`` against a real local cloud and its control API, in process."""
from __future__ import annotations

import json
import os
import re
import threading

import botocore.exceptions
import pytest
import requests

from spotrun.cli import main
from spotrun.localcloud import control
from spotrun.localcloud.imds import TOKEN_HEADER, TTL_HEADER


@pytest.fixture
def root(cloud, tmp_path):
    """The cloud's control API served as ``up`` serves it, found through localcloud.json."""
    down = threading.Event()
    server = control.ControlServer(cloud, on_down=down.set).start()
    state_root = tmp_path / "control"
    state_root.mkdir()
    control.write_state(state_root, {"pid": os.getpid(), "control": server.endpoint,
                                     "control_key": server.key})
    try:
        yield state_root
    finally:
        server.stop()


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(["localcloud", *argv])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    # The cloud runs in this process: its journald-style log lines ("<6>{...}") share stdout.
    out = "".join(line for line in out.splitlines(keepends=True)
                  if not re.match(r"<\d>\{", line))
    return code, out, err


def imds_get(instance, path: str) -> requests.Response:
    with requests.Session() as http:
        http.trust_env = False
        tok = http.put(instance.imds_endpoint + "/latest/api/token",
                       headers={TTL_HEADER: "60"}, timeout=5).text
        return http.get(instance.imds_endpoint + path, headers={TOKEN_HEADER: tok}, timeout=5)


def test_launch_fleet_and_status(cloud, root, capsys):
    code, out, _ = run(capsys, "launch", "--root", str(root), "--az", cloud.azs[1],
                       "--tag", "Name=demo")
    assert code == 0, out
    instance_id = out.split()[0]
    assert cloud.instances[instance_id].az == cloud.azs[1]
    code, out, _ = run(capsys, "fleet", "--root", str(root), "--capacity", "1",
                       "--az-policy", f"fixed:{cloud.azs[2]}")
    assert code == 0
    fleet_id = out.split(":")[0]
    assert fleet_id in cloud.fleets

    code, out, _ = run(capsys, "status", "--root", str(root))
    assert code == 0
    assert instance_id in out and fleet_id in out and "instances:" in out and "volumes:" in out
    code, out, _ = run(capsys, "status", "--root", str(root), "--json")
    status = json.loads(out)
    by_id = {i["instance_id"]: i for i in status["instances"]}
    assert by_id[instance_id]["name"] == "demo" and by_id[instance_id]["state"] == "running"
    fleet_instance = cloud.fleets[fleet_id].instance_ids()[0]
    assert by_id[fleet_instance]["fleet_request_id"] == fleet_id
    assert [z["name"] for z in status["azs"]] == cloud.azs


def test_interrupt_rebalance_maintenance_reach_the_metadata(cloud, root, capsys):
    inst = cloud.launch_instance(az=cloud.azs[0])
    assert imds_get(inst, "/latest/meta-data/spot/instance-action").status_code == 404
    code, out, _ = run(capsys, "interrupt", "--root", str(root), inst.instance_id,
                       "--action", "stop", "--in", "600")
    assert code == 0 and "stop" in out
    action = json.loads(imds_get(inst, "/latest/meta-data/spot/instance-action").text)
    assert action["action"] == "stop"
    assert run(capsys, "rebalance", "--root", str(root), inst.instance_id)[0] == 0
    assert "noticeTime" in imds_get(inst, "/latest/meta-data/events/recommendations/rebalance").text
    code, out, _ = run(capsys, "maintenance", "--root", str(root), inst.instance_id,
                       "--code", "instance-reboot", "--in", "60", "--duration", "600")
    assert code == 0
    events = json.loads(imds_get(inst, "/latest/meta-data/events/maintenance/scheduled").text)
    assert [e["Code"] for e in events] == ["instance-reboot"]
    assert events[0]["EventId"] in out


def test_terminate_then_injection_is_refused(cloud, root, capsys):
    inst = cloud.launch_instance()
    assert run(capsys, "terminate", "--root", str(root), inst.instance_id)[0] == 0
    assert cloud.instances[inst.instance_id].state == "terminated"
    code, _, err = run(capsys, "rebalance", "--root", str(root), inst.instance_id)
    assert code == 1 and "terminated" in err


def test_imds_and_ec2_faults(cloud, root, capsys):
    inst = cloud.launch_instance()
    code, _, _ = run(capsys, "fault", "imds", "--root", str(root), inst.instance_id, "401",
                     "--for", "30")
    assert code == 0
    assert imds_get(inst, "/latest/meta-data/instance-id").status_code == 401
    assert inst.metadata.active_faults() == ["401"]

    ec2 = cloud.client("ec2", max_attempts=1)
    assert run(capsys, "fault", "ec2", "--root", str(root), "--throttle", "1", "--seed", "3")[0] == 0
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        ec2.describe_volumes()
    assert raised.value.response["Error"]["Code"] == "RequestLimitExceeded"
    code, out, _ = run(capsys, "fault", "ec2", "--root", str(root))
    assert code == 0 and "cleared" in out
    ec2.describe_volumes()
    names = [e["event"] for e in cloud.events]
    assert "imds_fault_injected" in names and names.count("ec2_faults_configured") == 2


def test_events_are_listed_as_json_lines(cloud, root, capsys):
    cloud.launch_instance()
    code, out, _ = run(capsys, "events", "--root", str(root))
    assert code == 0
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert "instance_launched" in [e["event"] for e in events]


@pytest.mark.parametrize("argv, message", [
    (["interrupt", "i-nothere"], "not an instance id"),
    (["interrupt", "i-0123456789abcdef0", "--action", "explode"], "invalid choice"),
    (["interrupt", "i-0123456789abcdef0", "--in", "-5"], "seconds must be >= 0"),
    (["fault", "imds", "i-0123456789abcdef0", "meltdown"], "invalid choice"),
    (["fault", "imds", "i-0123456789abcdef0", "5xx", "--for", "0"], "seconds must be > 0"),
    (["fault", "ec2", "--throttle", "1.5"], "between 0 and 1"),
    (["fault", "ec2", "--performed-then-5xx", "attach"], "ACTION=RATE"),
    (["fleet", "--az-policy", "cheapest"], "random, round-robin or fixed"),
    (["launch", "--tag", "novalue"], "KEY=VALUE"),
    ([], "required"),
])
def test_bad_arguments_exit_2_with_a_message(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, *argv, *(["--root", str(tmp_path)] if argv[:1] != ["fault"]
                                        and argv else []))
    assert code == 2
    assert message in err


def test_unknown_instance_exits_2(cloud, root, capsys):
    code, _, err = run(capsys, "interrupt", "--root", str(root), "i-0123456789abcdef0")
    assert code == 2 and "no instance i-0123456789abcdef0" in err


def test_no_cloud_running_is_a_clear_error(capsys, tmp_path):
    code, _, err = run(capsys, "status", "--root", str(tmp_path))
    assert code == 1
    assert "no local cloud is running" in err and str(tmp_path) in err


def test_control_api_needs_the_key(root):
    info = control.read_state(root)
    answer = requests.get(info["control"] + "/status", timeout=5,
                          headers={control.KEY_HEADER: "guess"})
    assert answer.status_code == 403
    answer = requests.post(info["control"] + "/instances", data="{not json", timeout=5,
                           headers={control.KEY_HEADER: info["control_key"]})
    assert answer.status_code == 400 and "not JSON" in answer.json()["error"]


@pytest.mark.parametrize("command", [
    [], ["up"], ["down"], ["status"], ["events"], ["launch"], ["fleet"], ["interrupt"],
    ["rebalance"], ["maintenance"], ["terminate"], ["fault"], ["fault", "imds"],
    ["fault", "ec2"]])
def test_help_on_every_command(capsys, command):
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0 and "usage: spotrun localcloud" in out


def test_up_detached_then_down(tmp_path, capsys):
    """The real thing: ``up --detach`` in its own process, driven, then ``down``."""
    import signal
    import subprocess
    import sys

    root = tmp_path / "lc"
    spotrun = [sys.executable, "-m", "spotrun", "localcloud"]
    started = subprocess.run(spotrun + ["up", "--root", str(root), "--detach"],
                             capture_output=True, text=True, timeout=180)
    pid = None
    try:
        assert started.returncode == 0, started.stderr
        info = control.read_state(root)
        pid = int(info["pid"])
        assert (root / control.STATE_FILE).stat().st_mode & 0o777 == 0o600
        assert info["ec2_endpoint"].startswith("http://127.0.0.1:")
        code, out, _ = run(capsys, "launch", "--root", str(root), "--run", "sleep 300")
        assert code == 0 and "process" in out
        instance_pid = int(out.rsplit("process", 1)[1])
        # The process finds its instance's metadata where the AWS SDKs look for it.
        endpoint = out.split("metadata ", 1)[1].split(",", 1)[0]
        environ = dict(item.split("=", 1) for item in
                       open(f"/proc/{instance_pid}/environ").read().split("\0") if "=" in item)
        assert environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"] == endpoint
        token = requests.put(f"{endpoint}/latest/api/token", timeout=5,
                             headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        assert token.status_code == 200 and token.text
        code, out, _ = run(capsys, "status", "--root", str(root), "--json")
        assert [i["state"] for i in json.loads(out)["instances"]] == ["running"]
        again = subprocess.run(spotrun + ["up", "--root", str(root), "--detach"],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already running" in again.stderr
        code, out, _ = run(capsys, "down", "--root", str(root))
        assert code == 0 and "stopped" in out
        assert not control.pid_alive(pid)
        assert not control.pid_alive(instance_pid)  # the instance's process went with it
        assert not (root / control.STATE_FILE).exists()
        assert "local cloud down" in (root / "localcloud.log").read_text()
    finally:
        if pid and control.pid_alive(pid):
            os.kill(pid, signal.SIGTERM)


def test_up_in_the_foreground_stops_cleanly_on_sigterm(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "lc"
    proc = subprocess.Popen([sys.executable, "-m", "spotrun", "localcloud", "up", "--root",
                             str(root), "--timing", "instant"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (root / control.STATE_FILE).exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the cloud did not come up"
            time.sleep(0.05)  # polling for the state file, with a deadline
        assert control.read_state(root)["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "local cloud down" in err
        assert not (root / control.STATE_FILE).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

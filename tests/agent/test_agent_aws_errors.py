"""An AWS error that ends ``spotrun agent run`` reaches the operator as one line at error
priority naming the call, EC2's error code and the resource; the traceback only at debug
(issue 15, item 6). The agent runs as a real process; its lifecycle is replaced by one whose
run makes a real failing EC2 call (moto's server answers InvalidVolume.NotFound)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from c2_world import JOB, REGION, aws  # noqa: E402,F401

SCRIPT = """
import sys, types
from spotrun import agentcmd, cli, config as configmod, ec2

endpoint, level = sys.argv[1], sys.argv[2]
config = configmod.from_mapping({"job": {"id": %(job)r}, "agent": {"log_level": level},
                                 "aws": {"endpoint_url": endpoint, "region": %(region)r,
                                         "max_attempts": 1}}, "test")

def run():
    client = ec2.client("ec2", config.aws, %(region)r)
    client.describe_volumes(VolumeIds=["vol-0123456789abcdef0"])

agentcmd.load_config = lambda path, use_user_data=True: (config, None)
agentcmd.build_lifecycle = lambda config, metadata: types.SimpleNamespace(run=run, phase=None)
raise SystemExit(cli.main(["agent", "run", "--config", "/nonexistent", "--exit-when-done"]))
""" % {"job": JOB, "region": REGION}


def run_agent(endpoint: str, level: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, endpoint, level], capture_output=True,
                          text=True, timeout=60)


def test_an_aws_error_ending_the_agent_is_one_error_line_naming_call_code_resource(aws):
    done = run_agent(aws, "info")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output
    errors = [json.loads(line[3:]) for line in output.splitlines() if line.startswith("<3>")]
    assert len(errors) == 1, output
    error = errors[0]
    assert error["event"] == "agent_failed"
    assert (error["aws_call"], error["aws_code"]) == ("DescribeVolumes", "InvalidVolume.NotFound")
    assert error["error"].startswith("AWS DescribeVolumes failed: InvalidVolume.NotFound "
                                     "(vol-0123456789abcdef0)"), error["error"]


def test_the_traceback_is_kept_at_debug_priority(aws):
    done = run_agent(aws, "debug")
    assert done.returncode == 1
    debug = [json.loads(line[3:]) for line in (done.stdout + done.stderr).splitlines()
             if line.startswith("<7>")]
    traces = [e["traceback"] for e in debug if e["event"] == "agent_failed_traceback"]
    assert traces and "Traceback" in traces[0] and "InvalidVolume.NotFound" in traces[0]

"""The Packer recipe for the custom AMI, validated with Debian 12's packer (1.6.6).

That packer predates the `packer { required_plugins }` block, `metadata_options` and
`imds_support` (Packer >= 1.8 with the Amazon plugin >= 1.1, which users run). So: those
parts are checked for their values here, and everything else in the template (the
amazon-ebs source, the provisioners, the post-processor) is validated against packer's
own schema with those parts taken out.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "packaging/ami/spotrun.pkr.hcl"


def _block(text: str, header: str, indent: str = "") -> str:
    match = re.search(rf"\n{indent}{re.escape(header)} \{{\n(.*?)\n{indent}\}}\n", text, re.S)
    assert match, f"no {header!r} block in {TEMPLATE.name}"
    return match.group(1)


def _without_newer_packer_parts(text: str) -> str:
    text = text.replace("\npacker {\n" + _block(text, "packer") + "\n}\n", "\n")
    text = text.replace("\n  metadata_options {\n" + _block(text, "metadata_options", "  ")
                        + "\n  }\n", "\n")
    return re.sub(r"\n  imds_support\s*=.*\n", "\n", text)


def test_ami_requires_imdsv2_with_hop_limit_one():
    text = TEMPLATE.read_text()
    options = _block(text, "metadata_options", "  ")
    assert re.search(r'http_tokens\s*=\s*"required"', options)
    assert re.search(r"http_put_response_hop_limit\s*=\s*1\b", options)
    assert re.search(r'\n  imds_support\s*=\s*"v2.0"', text)


def test_ami_installs_the_deb_and_sets_the_nvme_timeout():
    text = TEMPLATE.read_text()
    assert "apt-get install -y /tmp/spotrun.deb" in text
    assert "nvme_core.io_timeout=4294967295" in text and "update-grub" in text
    assert "cloud-init clean" in text  # the next boot fetches its own user data
    # The agent starts on the AMI's own Python, not only "enabled" (issue 14).
    assert '"spotrun --help >/dev/null"' in text
    assert '"sudo spotrun agent check-config --no-user-data --config /tmp/spotrun-check.toml"' in text
    assert re.search(r'owners\s*=\s*\["amazon"\]', text)


@pytest.mark.skipif(shutil.which("packer") is None, reason="packer not installed: make apt")
def test_packer_validates_the_template(tmp_path):
    template = tmp_path / "spotrun.pkr.hcl"
    template.write_text(_without_newer_packer_parts(TEMPLATE.read_text()))
    deb = tmp_path / "spotrun_0.1.0_all.deb"
    deb.write_bytes(b"")  # the file provisioner's source must exist
    result = subprocess.run(["packer", "validate", "-var", f"deb={deb}", str(template)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "CHECKPOINT_DISABLE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("packer") is None, reason="packer not installed: make apt")
def test_packer_validation_catches_a_bad_template(tmp_path):
    template = tmp_path / "spotrun.pkr.hcl"
    text = _without_newer_packer_parts(TEMPLATE.read_text())
    template.write_text(text.replace("ssh_username", "ssh_user_name"))
    result = subprocess.run(["packer", "validate", str(template)], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "CHECKPOINT_DISABLE": "1"})
    assert result.returncode != 0 and "ssh_user_name" in result.stdout + result.stderr

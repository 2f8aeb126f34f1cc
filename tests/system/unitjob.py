"""One job on its own Spot Fleet, its agent run by systemd in the booted container: what the
system tests of the unit and of the package drive (the fixtures are in conftest.py)."""
from __future__ import annotations

import json

UNIT = "spotrun-agent"


class Job:
    """One job on its own Spot Fleet, its agent run by systemd in the container."""

    def __init__(self, world, job_id: str, steps: int, ckpt_every: int = 100000):
        from spotrun import userdata
        from spotrun.localcloud.fleet import LaunchSpec

        self.world, self.job_id = world, job_id
        self.container, self.cloud = world.container, world.cloud
        # One agent per job (the container's): the operator's promise of a single instance
        # lets the agent run without a lease table.
        job = {"job": {"id": job_id}, "aws": {"single_instance": True},
               "code": {"repository": world.repository, "ref": "main"},
               "trainer": {"command": ["/usr/bin/python3", "train.py"],
                           "env": {"STEPS": str(steps), "STEP_S": "0.05",
                                   "CKPT_EVERY": str(ckpt_every)}}}
        # (The system python3 imports spotrun_trainer through trainer.library_path, the
        # .deb's /usr/lib/spotrun/trainer-lib, as a DLAMI's conda env would.)
        self.user_data = userdata.render(job)
        booted: list = []
        self.fleet_id = self.cloud.request_spot_fleet(
            1, launch=LaunchSpec(user_data=self.user_data), az_policy=f"fixed:{self.cloud.azs[0]}",
            boot=lambda cloud, inst: booted.append(inst))  # the "boot" is systemd's, below
        self.fleet = self.cloud.fleets[self.fleet_id]
        self.inst = self.container.wait_for(lambda: booted and booted[0], "the fleet's instance")

    def start(self) -> None:
        machine = self.inst.agent_overrides()
        machine["metadata"]["poll_interval_s"] = 0.5
        machine["volume"].update(size_gib=1, create_timeout_s=120.0)
        machine["trainer"] = {"user": "ubuntu", "drain_reserve_s": 5.0, "restart_backoff_s": 1.0}
        self.container.path("/etc/spotrun/agent.toml").write_text(self.world.tomli_w.dumps(machine))
        cloud_init = self.container.path("/var/lib/cloud/instance")
        cloud_init.mkdir(parents=True, exist_ok=True)
        (cloud_init / "user-data.txt").write_bytes(self.user_data)
        # On EC2 the credentials come from the instance profile; the local cloud's are
        # dummy ones in the environment (Instance.env()), given to the unit by a drop-in.
        env = {k: v for k, v in self.inst.env(base={}).items()
               if k.startswith(("AWS_", "SPOTRUN_")) or k.lower() == "no_proxy"}
        dropin = self.container.path(f"/etc/systemd/system/{UNIT}.service.d")
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "50-localcloud.conf").write_text(
            "[Service]\n" + "".join(f'Environment="{k}={v}"\n' for k, v in sorted(env.items())))
        self.container.run(["systemctl", "daemon-reload"])
        # Type=notify: `start` would wait for READY=1 (sent once the config is valid).
        self.container.run(["systemctl", "start", "--no-block", UNIT])

    def events(self, **match) -> list[dict]:
        out = self.container.run(["journalctl", "--no-pager", "-u", UNIT, "-o", "json"],
                                 check=False).stdout
        found = []
        for line in out.splitlines():
            entry = json.loads(line)
            try:
                body = json.loads(entry.get("MESSAGE") or "")
            except (TypeError, ValueError):
                continue
            if isinstance(body, dict) and body.get("job") == self.job_id and all(
                    body.get(k) == v for k, v in match.items()):
                found.append({**body, "_PRIORITY": entry.get("PRIORITY")})
        return found

    def await_event(self, timeout: float = 90.0, **match) -> dict:
        try:
            return self.container.wait_for(lambda: (self.events(**match) or [None])[-1],
                                           f"{self.job_id}: event {match}", timeout=timeout)
        except Exception as exc:
            raise AssertionError(f"{exc}\n--- the unit's journal ---\n{self.journal()}") from None

    def journal(self, lines: int = 60) -> str:
        # (-u and -t together would mean both at once: one call each.)
        return "".join(self.container.run(["journalctl", "--no-pager", "-n", str(lines), "-o", "cat",
                                           *match], check=False).stdout
                       for match in (["-u", UNIT], ["-t", "spotrun-trainer"]))

    def progress_step(self) -> int:
        try:
            state = json.loads((self.inst.state_dir / "state.json").read_text())
        except (OSError, ValueError):
            return 0
        return int((state.get("progress") or {}).get("global_step") or 0)

    def await_step(self, step: int, timeout: float = 90.0) -> None:
        self.container.wait_for(lambda: self.progress_step() >= step, f"training step {step}",
                                timeout=timeout)

    def unit(self, *props: str) -> dict[str, str]:
        out = self.container.run(["systemctl", "show", UNIT,
                                  *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def mounted(self) -> str:
        return self.container.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE",
                                   str(self.inst.mount_point)], check=False).stdout.strip()

    def volume(self) -> dict:
        from spotrun import tags as T

        volumes = self.cloud.moto_client("ec2").describe_volumes(
            Filters=T.job_filters(self.job_id))["Volumes"]
        assert len(volumes) == 1, volumes
        return volumes[0]

    def close(self) -> None:
        self.container.run(["systemctl", "stop", UNIT], check=False, timeout=150)
        self.container.run(["systemctl", "reset-failed", UNIT], check=False)
        if not self.fleet.state.startswith("cancelled"):
            self.fleet.cancel()

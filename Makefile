# spotrun — every target installs what it needs on a fresh Debian 12 machine (as root).
SHELL := /bin/bash
# Debian's own interpreter: the trainer runs as an unprivileged user, who must be able to run it.
PYTHON ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian tools the tests and the demo drive for real: loop devices and ext4 (util-linux,
# e2fsprogs), git for checkout, systemd-nspawn + debootstrap for the system test, debhelper,
# lintian for the package (dependencies vendored: docs/packaging.md), packer to
# validate the AMI recipe.
APT_PACKAGES := python3 python3-venv python3-dev git e2fsprogs util-linux mount kmod \
	systemd-container debootstrap debhelper dpkg-dev lintian fakeroot packer \
	ca-certificates rsync procps

.PHONY: all deps apt venv test test-fast demo demo-sweep bench soak soak-long deb system-test lock clean

all: test

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): requirements/dev.lock setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/dev.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

deps: apt venv

# The whole suite: unit, integration on the local spot cloud (real loop devices, moto's
# server, real processes), the short soak, and the systemd-in-a-container system test.
# Two workers: the tests that drive the machine (loop devices, mounts, systemd, agents) run
# one at a time in one of them, the trainer's and other unit tests beside them
# (tests/conftest.py: xdist_group_of). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: deps
	SPOTRUN_REQUIRE_REAL=1 $(VENV)/bin/pytest tests -m "not bench" --durations=25 \
		$(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)

# Quick loop while developing: skips the slow and system tests.
test-fast: deps
	$(VENV)/bin/pytest tests -m "not slow and not system and not bench"

# The full rehearsal on the local spot cloud (train → notice → drain → migrate → resume → done).
# Fails (exit 1, naming why) unless demo-out/report.txt shows a mid-training interruption that
# the replacement resumed; a rerun removes the previous run's state in demo-out first.
# The demo asks for its notice itself: rehearse sends none that is not asked for.
demo: deps
	$(VENV)/bin/spotrun rehearse --out demo-out --interrupt-at-step 40

# A sweep on the local spot cloud (spotrun rehearse --sweep): 4 experiments on 2 instances, one
# interrupted, one row per experiment (instances, migrations, steps redone, completion), learning
# curves in demo-sweep-out/curves.png. Fails (exit 1, naming the check) unless every experiment
# finished with its own right sum, the interrupted one resumed elsewhere, the fleet deleted
# exactly once, and every experiment's data came from the one dataset snapshot init made.
demo-sweep: deps
	$(VENV)/bin/spotrun rehearse --sweep --out demo-sweep-out

# First the quick run of every figure (is it all wired up? ~2 min), then the real one.
bench: deps
	$(VENV)/bin/pytest -q tests/bench -m bench
	$(VENV)/bin/python -m bench.run --out bench/results.json

soak: deps
	$(VENV)/bin/spotrun soak --profile short

soak-long: deps
	$(VENV)/bin/spotrun soak --profile long

# dist/spotrun_<version>_all.deb; vendors requirements/agent.lock with the venv's pip.
deb: deps
	packaging/build-deb.sh

system-test: deps deb
	$(VENV)/bin/pytest tests/system

lock:
	rm -rf /tmp/spotrun-lock-venv && $(PYTHON) -m venv /tmp/spotrun-lock-venv
	/tmp/spotrun-lock-venv/bin/pip install -q -r requirements/dev.in
	/tmp/spotrun-lock-venv/bin/pip freeze > requirements/dev.lock

clean:
	rm -rf $(VENV) build dist *.egg-info demo-out demo-sweep-out

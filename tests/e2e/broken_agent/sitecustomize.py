"""Test-only: break the spotrun agent from the outside, for the negative e2e tests
(tests/e2e/test_checks_catch_a_broken_agent_e2e.py).

Python imports this at start-up only in a process whose PYTHONPATH names this directory, which
only those tests give, and only to one boot's agent. It acts only with SPOTRUN_TEST_BREAK set
and only in `python -m spotrun agent run` (at this point sys.argv is ['-m', 'agent', 'run',
...]): the trainer the agent starts gets a minimal environment of its own, and any other Python
the agent runs is left alone. Nothing here ships: the package is built from agent/ and trainer/.
"""
import os
import sys

if os.environ.get("SPOTRUN_TEST_BREAK") and sys.argv[:3] == ["-m", "agent", "run"]:
    try:
        import spotrun_breaks

        spotrun_breaks.install(os.environ.pop("SPOTRUN_TEST_BREAK"))
    except BaseException:  # site would only print it and run the agent unbroken
        import traceback

        traceback.print_exc()
        os._exit(70)

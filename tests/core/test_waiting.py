"""spotrun.waiting.wait_until on a fake clock: nothing here really sleeps."""
import pytest

from spotrun.waiting import wait_until


class FakeClock:
    def __init__(self):
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _answers(*values):
    """A predicate returning ``values`` in turn, counting its calls."""
    calls = []

    def predicate():
        calls.append(1)
        return values[len(calls) - 1]
    return predicate, calls


def test_returns_the_predicates_truthy_value_and_sleeps_between_misses():
    clock = FakeClock()
    predicate, calls = _answers(None, 0, {"state": "done"})
    value = wait_until(predicate, 10, interval_s=0.5, what="x", clock=clock, sleep=clock.sleep)
    assert value == {"state": "done"}
    assert len(calls) == 3
    assert clock.sleeps == [0.5, 0.5]


def test_a_first_truthy_answer_does_not_sleep():
    clock = FakeClock()
    assert wait_until(lambda: "yes", 0, interval_s=1, what="x", clock=clock, sleep=clock.sleep) == "yes"
    assert clock.sleeps == []


def test_times_out_with_what_and_timeout_and_checks_once_more_at_the_deadline():
    clock = FakeClock()
    seen = []

    def never():
        seen.append(clock.now)
        return False
    with pytest.raises(TimeoutError, match=r"^the volume to attach: not after 2 s$"):
        wait_until(never, 2, interval_s=0.75, what="the volume to attach", clock=clock,
                   sleep=clock.sleep)
    # The last sleep is cut short at the deadline, and the condition is checked there.
    assert clock.sleeps == [0.75, 0.75, 0.5]
    assert seen == [100.0, 100.75, 101.5, 102.0]


def test_error_factory_replaces_the_timeout_error():
    clock = FakeClock()

    class Gone(Exception):
        pass
    with pytest.raises(Gone, match="still held"):
        wait_until(lambda: None, 1, interval_s=1, what="x", clock=clock, sleep=clock.sleep,
                   error=lambda: Gone("still held"))


def test_predicate_exceptions_pass_through_at_once():
    clock = FakeClock()

    def broken():
        raise ValueError("volume in state error")
    with pytest.raises(ValueError, match="state error"):
        wait_until(broken, 60, interval_s=1, what="x", clock=clock, sleep=clock.sleep)
    assert clock.sleeps == []


def test_on_poll_runs_between_polls_with_the_elapsed_time_and_may_end_the_wait():
    clock = FakeClock()
    polled = []
    predicate, _ = _answers(False, False, True)
    wait_until(predicate, 10, interval_s=1, what="x", clock=clock, sleep=clock.sleep,
               on_poll=polled.append)
    assert polled == [0.0, 1.0]  # after each miss, not after the hit

    class Notice(Exception):
        pass

    def safe_point(_elapsed):
        raise Notice()
    with pytest.raises(Notice):
        wait_until(lambda: False, 10, interval_s=1, what="x", clock=clock, sleep=clock.sleep,
                   on_poll=safe_point)


def test_on_poll_is_not_called_when_the_wait_gives_up():
    clock = FakeClock()
    polled = []
    with pytest.raises(TimeoutError):
        wait_until(lambda: False, 1, interval_s=1, what="x", clock=clock, sleep=clock.sleep,
                   on_poll=polled.append)
    assert polled == [0.0]


def test_backoff_grows_the_interval_up_to_its_cap():
    clock = FakeClock()
    with pytest.raises(TimeoutError):
        wait_until(lambda: False, 100, interval_s=0.2, what="x", clock=clock, sleep=clock.sleep,
                   backoff=2.0, max_interval_s=1.0)
    assert clock.sleeps[:5] == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])
    assert sum(clock.sleeps) == pytest.approx(100)

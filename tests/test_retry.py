"""Tests for the backoff policy and the retry helper, on a fake clock."""

import pytest

from fleetkit.core.errors import StorageError, StorageUnavailable
from fleetkit.core.retry import Attempts, Backoff, retry


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay


def test_backoff_grows_until_cap():
    backoff = Backoff(initial=0.1, cap=1.0, multiplier=2.0, jitter=0.0)

    delays = [backoff.delay(failures, rand=0.0) for failures in range(1, 8)]

    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_backoff_jitter_shortens_delay():
    backoff = Backoff(initial=1.0, cap=1.0, jitter=0.5)

    assert backoff.delay(1, rand=0.0) == pytest.approx(1.0)
    assert backoff.delay(1, rand=0.999) == pytest.approx(0.5, abs=0.001)


def test_backoff_survives_huge_failure_count():
    assert Backoff(initial=0.1, cap=3.0, jitter=0.0).delay(10_000, rand=0.0) == 3.0


@pytest.mark.parametrize("kwargs", [{"initial": 0}, {"initial": 2, "cap": 1}, {"multiplier": 0.5}, {"jitter": 1.5}])
def test_backoff_rejects_invalid_settings(kwargs):
    with pytest.raises(ValueError):
        Backoff(**kwargs)


async def test_retry_returns_after_transient_failures():
    fake = FakeTime()
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise StorageUnavailable("down")
        return "ok"

    result = await retry(flaky, backoff=Backoff(initial=1, cap=10, jitter=0), clock=fake.clock, sleep=fake.sleep)

    assert result == "ok"
    assert calls == 4
    assert fake.sleeps == [1, 2, 4]


async def test_retry_gives_up_at_deadline():
    fake = FakeTime()
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise StorageUnavailable(f"down {calls}")

    with pytest.raises(StorageUnavailable, match="down"):
        await retry(down, backoff=Backoff(initial=1, cap=4, jitter=0), deadline=6,
                    clock=fake.clock, sleep=fake.sleep)

    assert fake.now == pytest.approx(6)
    assert fake.sleeps == [1, 2, 3]  # the last wait is cut short to end at the deadline
    assert calls == 4


async def test_retry_raises_other_errors_at_once():
    fake = FakeTime()

    async def broken() -> None:
        raise StorageError("bad request")

    with pytest.raises(StorageError, match="bad request"):
        await retry(broken, clock=fake.clock, sleep=fake.sleep)

    assert fake.sleeps == []


async def test_attempts_reset_restarts_delays():
    fake = FakeTime()
    attempts = Attempts(Backoff(initial=1, cap=8, jitter=0), clock=fake.clock, sleep=fake.sleep)

    for _ in range(3):
        assert await attempts.sleep()
    attempts.reset()
    await attempts.sleep()

    assert fake.sleeps == [1, 2, 4, 1]


async def test_attempts_sleep_refuses_after_deadline():
    fake = FakeTime()
    attempts = Attempts(Backoff(initial=5, cap=5, jitter=0), deadline=5, clock=fake.clock, sleep=fake.sleep)

    assert await attempts.sleep()
    assert not await attempts.sleep()
    assert fake.sleeps == [5]

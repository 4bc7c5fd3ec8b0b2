"""Retrying with exponential backoff.

`Backoff` is the policy that computes the wait between attempts. `Attempts`
counts consecutive failures and sleeps accordingly. `retry()` runs an
operation until it succeeds, fails with an error that is not retryable, or
the overall deadline has passed. The clock, the sleep function and the random source are
injectable so that tests run without real waiting.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from fleetkit.core.errors import StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays that grow from `initial` by `multiplier` per failure, never above `cap`.

    Each delay is multiplied by a random factor in ``[1 - jitter, 1]`` so that
    many clients failing together do not retry in lockstep. `jitter` is a
    fraction between 0 (no jitter) and 1 (anywhere between 0 and the delay).
    """

    initial: float = 0.1
    cap: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.3

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.cap < self.initial:
            raise ValueError(f"backoff needs 0 < initial <= cap, got initial={self.initial} cap={self.cap}")
        if self.multiplier < 1:
            raise ValueError(f"backoff multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff jitter must be between 0 and 1, got {self.jitter}")

    def delay(self, failures: int, rand: float) -> float:
        """Return the wait after the `failures`-th consecutive failure (1-based).

        `rand` is a number in ``[0, 1)``; 0 gives the full delay.
        """
        exponent = max(failures - 1, 0)
        # Cap the exponent first: a long outage must not overflow the float.
        raw = self.initial * self.multiplier ** min(exponent, 64)
        return min(raw, self.cap) * (1.0 - self.jitter * rand)


class Attempts:
    """Failure counter that sleeps with backoff, within an optional deadline.

    `deadline` is a number of seconds, counted from construction (or the last
    `reset()`), after which `sleep()` refuses to wait any longer. Call
    `reset()` after a success so that the next outage starts from short delays.
    """

    def __init__(
        self,
        backoff: Backoff | None = None,
        *,
        deadline: float | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ):
        self.backoff = backoff or Backoff()
        self.deadline = deadline
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        self.failures = 0
        self._started = clock()

    def reset(self) -> None:
        """Forget past failures and restart the deadline."""
        self.failures = 0
        self._started = self._clock()

    def remaining(self) -> float | None:
        """Seconds left before the deadline, or None without a deadline."""
        if self.deadline is None:
            return None
        return self.deadline - (self._clock() - self._started)

    def next_delay(self) -> float:
        """Record one more failure and return how long to wait before retrying."""
        self.failures += 1
        return self.backoff.delay(self.failures, self._rand())

    async def sleep(self) -> bool:
        """Record a failure and wait before the next attempt.

        Returns False, without waiting, when the deadline has already passed;
        the caller should then give up. The wait is shortened so that it never
        ends after the deadline.
        """
        delay = self.next_delay()
        left = self.remaining()
        if left is not None:
            if left <= 0:
                return False
            delay = min(delay, left)
        await self._sleep(delay)
        return True


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    retry_on: tuple[type[BaseException], ...] = (StorageUnavailable,),
    backoff: Backoff | None = None,
    deadline: float | None = None,
    describe: str = "operation",
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    rand: Callable[[], float] = random.random,
) -> T:
    """Await `operation()` until it returns, retrying on `retry_on` errors.

    Other errors propagate at once. Once `deadline` seconds have passed since
    the first attempt, the last retryable error is raised. Without a deadline
    the loop runs until it succeeds or the calling task is cancelled.
    `describe` names the operation in log lines.
    """
    attempts = Attempts(backoff, deadline=deadline, clock=clock, sleep=sleep, rand=rand)
    while True:
        try:
            return await operation()
        except retry_on as error:
            if not await attempts.sleep():
                log.warning("%s failed %d times, giving up: %s", describe, attempts.failures, error)
                raise
            log.debug("%s failed (attempt %d), retrying: %s", describe, attempts.failures, error)

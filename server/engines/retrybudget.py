"""RetryBudget: a gateway-wide cap on retries, as a share of requests.

A per-request attempt limit alone lets an outage multiply load: with every backend
failing, each request would make its full number of attempts. The budget allows, over
a sliding window, at most `ratio` retries per request plus a small floor so that a
quiet gateway can still retry (Finagle's RetryBudget and Envoy's retry budgets work
the same way).
"""

from __future__ import annotations

import time
from collections import deque


class RetryBudget:
    def __init__(self, ratio: float = 0.2, minimum: int = 10, window: float = 10.0,
                 clock=time.monotonic):
        self.ratio = ratio
        self.minimum = minimum
        self.window = window
        self._clock = clock
        # One [second, requests, retries] bucket per second of the window.
        self._buckets: deque[list] = deque()
        self.denied = 0

    def _current(self) -> list:
        now = int(self._clock())
        while self._buckets and self._buckets[0][0] <= now - self.window:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != now:
            self._buckets.append([now, 0, 0])
        return self._buckets[-1]

    def record_request(self) -> None:
        self._current()[1] += 1

    def try_retry(self) -> bool:
        """Spend one retry if the window allows it."""
        bucket = self._current()
        requests = sum(b[1] for b in self._buckets)
        retries = sum(b[2] for b in self._buckets)
        if retries < max(self.minimum, self.ratio * requests):
            bucket[2] += 1
            return True
        self.denied += 1
        return False

"""When the proxy may dial istiod again: one pace for all of Envoy's streams.

The proxy opens a fresh upstream stream for every stream Envoy opens, and Envoy reconnects quickly (its
own backoff resets as soon as the agent accepts the local stream). Left alone, a failing istiod would
see a dial every half second from every VM. So the proxy asks this pacer before each dial:

* the first dial, and the first one after a stream that worked (it delivered a response and lived at
  least ``settled_after_s``, or was closed from our side), go out at once;
* after a dial that did not work (refused, ResourceExhausted from istiod's admission limiter, ended
  before its first response or soon after it) the next one waits a full-jitter backoff
  (``vm_agent.backoff``), growing up to ``cap_s``.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vm_agent.backoff import FullJitterBackoff


@dataclass(frozen=True)
class PacingSettings:
    base_s: float = 1.0
    cap_s: float = 30.0
    floor_s: float = 0.1
    settled_after_s: float = 10.0
    """A stream that delivered a response and lasted this long counts as having worked."""


class DialPacer:
    def __init__(
        self,
        settings: PacingSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = s = settings or PacingSettings()
        self._clock = clock
        self._backoff = FullJitterBackoff(s.base_s, s.cap_s, floor=s.floor_s, rng=rng)
        self._not_before = 0.0
        self.dials = 0
        self._recent: deque[float] = deque(maxlen=16)
        self.last_wait = 0.0
        """The last backoff handed out (seconds), for status and metrics."""

    def delay(self) -> float:
        """Seconds until the next dial may go out (0: now)."""
        return max(0.0, self._not_before - self._clock())

    def dialing(self) -> None:
        """A dial goes out now (the caller waited ``delay()``)."""
        self.dials += 1
        self._recent.append(self._clock())

    def recent_gaps(self) -> list[float]:
        """Seconds between the last few dials: what a reconnect loop looks like, if there is one."""
        times = list(self._recent)
        return [round(b - a, 3) for a, b in itertools.pairwise(times)]

    def ended(self, *, responded: bool, lived_s: float, upstream_ended: bool) -> float:
        """Record how a dialed stream went; returns the wait now imposed on the next dial."""
        worked = responded and (lived_s >= self.settings.settled_after_s or not upstream_ended)
        if worked:
            self._backoff.reset()
            self._not_before = self._clock()
            self.last_wait = 0.0
        else:
            self.last_wait = self._backoff.next()
            self._not_before = self._clock() + self.last_wait
        return self.last_wait

    @property
    def failures(self) -> int:
        """Dials in a row that did not work."""
        return self._backoff.attempts

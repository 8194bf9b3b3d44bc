"""Exponential backoff with full jitter, shared by every retry loop that talks to istiod.

A fleet that retries on a fixed or lightly jittered schedule retries in step: after an istiod restart a
thousand VMs would come back in the same second, and istiod admits new streams at a fixed rate (25/s on
two cores) and refuses the rest with ResourceExhausted. Drawing each wait uniformly between a small floor
and an exponentially growing ceiling ("full jitter") spreads the retries over the whole window, so the
work istiod sees is flat instead of a series of spikes. The floor keeps the rare near-zero draw from
turning into a tight loop.
"""

from __future__ import annotations

import random


class FullJitterBackoff:
    """The n-th wait (n counted from 1) is uniform in [floor, min(cap, base * 2**(n-1))]."""

    def __init__(self, base: float, cap: float, *, floor: float = 0.0, rng: random.Random | None = None) -> None:
        if base <= 0 or cap < base or not 0 <= floor <= base:
            raise ValueError(f"backoff: expected 0 <= floor <= base <= cap and base > 0, got {floor}, {base}, {cap}")
        self.base, self.cap, self.floor = base, cap, floor
        self._rng = rng or random.Random()
        self.attempts = 0
        """Waits handed out since the last ``reset``."""

    def ceiling(self) -> float:
        """The upper bound of the next wait."""
        # min() before the power would overflow for long outages; 2**63 is plenty.
        return float(min(self.cap, self.base * 2.0 ** min(self.attempts, 63)))

    def next(self) -> float:
        """The next wait in seconds; every call widens the window until ``cap``."""
        high = self.ceiling()
        self.attempts += 1
        return self._rng.uniform(self.floor, high)

    def reset(self) -> None:
        self.attempts = 0

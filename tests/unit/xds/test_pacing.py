"""Full-jitter backoff and the proxy's dial pacer, on an injected clock and RNG."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from vm_agent.backoff import FullJitterBackoff
from vm_agent.xds.pacing import DialPacer, PacingSettings


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_waits_stay_between_floor_and_a_doubling_ceiling_capped() -> None:
    backoff = FullJitterBackoff(1.0, 30.0, floor=0.1, rng=random.Random(5))
    ceilings = []
    for _ in range(12):
        ceiling = backoff.ceiling()
        wait = backoff.next()
        assert 0.1 <= wait <= ceiling
        ceilings.append(ceiling)
    assert ceilings == [1, 2, 4, 8, 16, 30, 30, 30, 30, 30, 30, 30]
    backoff.reset()
    assert backoff.ceiling() == 1.0 and backoff.attempts == 0


def test_full_jitter_spreads_a_fleet_over_the_whole_window() -> None:
    # 1,000 VMs that failed five times each: their next waits cover [floor, 16 s], not a narrow band.
    waits = []
    for seed in range(1000):
        b = FullJitterBackoff(1.0, 30.0, floor=0.1, rng=random.Random(seed))
        for _ in range(4):
            b.next()
        waits.append(b.next())
    assert min(waits) < 1.0 and max(waits) > 15.0
    assert 7.0 < statistics.mean(waits) < 9.1
    # No second of the window holds more than ~2x its fair share.
    per_second = [sum(1 for w in waits if s <= w < s + 1) for s in range(16)]
    assert max(per_second) < 2 * 1000 / 16


def test_a_long_outage_does_not_overflow() -> None:
    b = FullJitterBackoff(1.0, 30.0, rng=random.Random(1))
    for _ in range(5000):
        assert b.next() <= 30.0


def test_bad_parameters_are_named() -> None:
    with pytest.raises(ValueError, match="floor <= base <= cap"):
        FullJitterBackoff(10.0, 5.0)


def pacer(seed: int = 1) -> tuple[DialPacer, Clock]:
    clock = Clock()
    return DialPacer(PacingSettings(base_s=1.0, cap_s=30.0, floor_s=0.1, settled_after_s=10.0), clock=clock,
                     rng=random.Random(seed)), clock  # fmt: skip


def test_first_dial_goes_out_at_once() -> None:
    p, _ = pacer()
    assert p.delay() == 0


def test_failed_dials_back_off_and_never_in_a_tight_loop() -> None:
    p, clock = pacer()
    dial_times = []
    for _ in range(20):
        clock.now += p.delay()
        p.dialing()
        dial_times.append(clock.now)
        # refused at once, or ResourceExhausted from istiod's admission limiter: no response
        p.ended(responded=False, lived_s=0.01, upstream_ended=True)
    gaps = [b - a for a, b in itertools.pairwise(dial_times)]
    assert all(g >= 0.1 for g in gaps)
    assert max(gaps) <= 30.0
    # 20 dials take minutes, not seconds: the ceiling doubles up to 30 s.
    assert dial_times[-1] - dial_times[0] > 120
    assert p.failures == 20


def test_a_stream_that_worked_lets_the_next_dial_go_at_once() -> None:
    p, clock = pacer()
    for _ in range(5):
        p.dialing()
        p.ended(responded=False, lived_s=0.0, upstream_ended=True)
        clock.now += p.delay()
    assert p.ended(responded=True, lived_s=1800.0, upstream_ended=True) == 0  # istiod's max connection age
    assert p.delay() == 0 and p.failures == 0


def test_a_stream_istiod_ends_soon_after_answering_did_not_work() -> None:
    p, _ = pacer()
    assert p.ended(responded=True, lived_s=2.0, upstream_ended=True) > 0
    assert p.failures == 1


def test_a_stream_envoy_ends_after_an_answer_worked() -> None:
    p, _ = pacer()
    p.ended(responded=False, lived_s=0.0, upstream_ended=True)
    assert p.ended(responded=True, lived_s=0.5, upstream_ended=False) == 0
    assert p.delay() == 0


def test_delay_counts_down_with_the_clock() -> None:
    p, clock = pacer(seed=9)
    wait = p.ended(responded=False, lived_s=0.0, upstream_ended=True)
    assert p.delay() == pytest.approx(wait)
    clock.now += wait / 2
    assert p.delay() == pytest.approx(wait / 2)
    clock.now += wait
    assert p.delay() == 0

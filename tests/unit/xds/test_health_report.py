"""Which health reports go out when (product decision 3), on an injected clock and RNG.

Every report is a WorkloadEntry status write in istiod, so these tests count reports: a steady VM on a
stream that stays up must send none, a reconnect at most two.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics

import pytest

from vm_agent.health.event import HealthEvent
from vm_agent.xds.health_report import HealthReporter, Reason, Report, ReportPolicy, ReportSchedule

UP = HealthEvent(True)
DOWN = HealthEvent(False, "HTTP 503")
HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run_until(schedule: ReportSchedule, clock: Clock, until: float) -> list[tuple[float, Reason, bool]]:
    """Advance the clock from deadline to deadline up to ``until``, collecting (time, reason, healthy)."""
    out: list[tuple[float, Reason, bool]] = []
    while True:
        while (report := schedule.due()) is not None:
            out.append((clock.now, report.reason, report.event.healthy))
        at = schedule.next_at()
        if at is None or at > until:
            clock.now = max(clock.now, until)
            return out
        clock.now = max(clock.now, at)


def make(policy: ReportPolicy | None = None, seed: int = 7) -> tuple[ReportSchedule, Clock]:
    clock = Clock()
    return ReportSchedule(policy or ReportPolicy(), clock=clock, rng=random.Random(seed)), clock


def reasons(reports: list[tuple[float, Reason, bool]]) -> list[Reason]:
    return [r for _, r, _ in reports]


def test_nothing_before_a_stream_or_a_state() -> None:
    schedule, clock = make()
    schedule.update(UP)
    assert schedule.due() is None  # no stream
    assert schedule.next_at() is None
    schedule2, _ = make()
    schedule2.connected()
    assert schedule2.due() is None  # no state yet
    assert run_until(schedule2, clock, clock.now + HOUR) == []


def test_connect_sends_the_state_then_one_confirmation_5_to_15s_later_then_nothing() -> None:
    schedule, clock = make()
    schedule.update(UP)
    start = clock.now
    schedule.connected()
    reports = run_until(schedule, clock, start + 10 * HOUR)
    assert reasons(reports) == [Reason.RECONNECT, Reason.CONFIRM]
    assert reports[0][0] == start
    assert 5.0 <= reports[1][0] - start <= 15.0
    assert all(healthy for _, _, healthy in reports)


def test_confirmation_delay_is_jittered_across_vms() -> None:
    delays = []
    for seed in range(200):
        schedule, clock = make(seed=seed)
        schedule.update(UP)
        start = clock.now
        schedule.connected()
        confirm = [t for t, r, _ in run_until(schedule, clock, start + 60) if r is Reason.CONFIRM]
        delays.append(confirm[0] - start)
    assert min(delays) >= 5.0 and max(delays) <= 15.0
    # Spread over the window, not bunched: a fleet's confirmations do not arrive in step.
    assert max(delays) - min(delays) > 8.0
    assert len({round(d, 3) for d in delays}) > 150


def test_transition_goes_out_at_once_with_one_confirmation() -> None:
    schedule, clock = make()
    schedule.update(UP)
    schedule.connected()
    run_until(schedule, clock, clock.now + 60)
    t0 = clock.now
    schedule.update(DOWN)
    reports = run_until(schedule, clock, t0 + HOUR)
    assert [(r, h) for _, r, h in reports] == [(Reason.TRANSITION, False), (Reason.CONFIRM, False)]
    assert reports[0][0] == t0
    assert 5.0 <= reports[1][0] - t0 <= 15.0


def test_the_same_state_again_is_not_a_transition() -> None:
    schedule, clock = make()
    schedule.update(DOWN)
    schedule.connected()
    run_until(schedule, clock, clock.now + 60)
    schedule.update(HealthEvent(False, "HTTP 503"))
    assert run_until(schedule, clock, clock.now + HOUR) == []
    # A different message is news for istiod's condition (e.g. "agent is shutting down").
    schedule.update(HealthEvent(False, "agent is shutting down"))
    assert reasons(run_until(schedule, clock, clock.now + HOUR)) == [Reason.TRANSITION, Reason.CONFIRM]


def test_reports_made_while_disconnected_are_replayed_once_on_the_next_stream() -> None:
    schedule, clock = make()
    schedule.update(UP)
    gen = schedule.connected()
    run_until(schedule, clock, clock.now + 60)
    schedule.disconnected(gen)
    schedule.update(DOWN)
    schedule.update(UP)
    schedule.update(DOWN)
    assert schedule.due() is None
    clock.now += 30
    schedule.connected()
    reports = run_until(schedule, clock, clock.now + HOUR)
    assert [(r, h) for _, r, h in reports] == [(Reason.RECONNECT, False), (Reason.CONFIRM, False)]


def test_at_most_two_reports_per_reconnect_over_many_reconnects() -> None:
    schedule, clock = make()
    schedule.update(UP)
    total = 0
    for _ in range(48):  # a day at istiod's 30 min max connection age
        gen = schedule.connected()
        total += len(run_until(schedule, clock, clock.now + 30 * 60))
        schedule.disconnected(gen)
    assert total == 2 * 48


def test_disconnect_cancels_a_pending_confirmation() -> None:
    schedule, clock = make()
    schedule.update(UP)
    gen = schedule.connected()
    assert reasons(run_until(schedule, clock, clock.now + 1)) == [Reason.RECONNECT]
    schedule.disconnected(gen)
    assert run_until(schedule, clock, clock.now + HOUR) == []


def test_an_older_streams_end_does_not_disconnect_the_newer_one() -> None:
    schedule, clock = make()
    schedule.update(UP)
    old = schedule.connected()
    schedule.connected()
    schedule.disconnected(old)
    assert reasons(run_until(schedule, clock, clock.now + HOUR)) == [Reason.RECONNECT, Reason.CONFIRM]


def test_steady_vm_on_a_stream_that_stays_up_sends_nothing_for_a_day() -> None:
    schedule, clock = make()
    schedule.update(UP)
    schedule.connected()
    run_until(schedule, clock, clock.now + 60)
    assert run_until(schedule, clock, clock.now + 24 * HOUR) == []


# ---------------------------------------------------------------- what EDS shows (lost reports)


def test_lost_report_is_resent_with_growing_jittered_backoff_until_eds_shows_it() -> None:
    policy = ReportPolicy(settle_s=15.0, resend_cap_s=1800.0)
    schedule, clock = make(policy)
    schedule.update(UP)
    schedule.connected()
    schedule.observed(False)  # the first EDS: the new entry is not Healthy yet
    reports = run_until(schedule, clock, clock.now + 40)
    assert reasons(reports)[:2] == [Reason.RECONNECT, Reason.CONFIRM]
    # istiod took neither: EDS still lacks us after the settle time, so the report goes out again...
    resends = [t for t, r, _ in reports if r is Reason.UNCONFIRMED]
    assert resends and resends[0] - reports[0][0] == pytest.approx(15.0)
    more = run_until(schedule, clock, clock.now + 2 * HOUR)
    times = resends + [t for t, r, _ in more if r is Reason.UNCONFIRMED]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # ...never sooner than the settle time, with the jittered part growing up to its cap.
    assert all(g >= 15.0 for g in gaps)
    assert all(g <= 15.0 + 1800.0 for g in gaps)
    assert statistics.mean(gaps[:3]) < 60 < 200 < statistics.mean(gaps[-5:])
    assert len(times) < 20  # in two hours of istiod never showing the endpoint
    # Once EDS shows the endpoint, the re-sends stop.
    schedule.observed(True)
    assert run_until(schedule, clock, clock.now + 10 * HOUR) == []


def test_report_istiod_took_needs_no_confirmation() -> None:
    schedule, clock = make()
    schedule.update(UP)
    schedule.connected()
    assert reasons(run_until(schedule, clock, clock.now + 1)) == [Reason.RECONNECT]
    schedule.observed(True)  # the push that followed our report shows the endpoint
    assert run_until(schedule, clock, clock.now + HOUR) == []
    assert schedule.skipped_confirmations == 1
    schedule.update(DOWN)
    assert reasons(run_until(schedule, clock, clock.now + 1)) == [Reason.TRANSITION]
    clock.now += 0.3
    schedule.observed(False)
    assert run_until(schedule, clock, clock.now + HOUR) == []
    assert schedule.skipped_confirmations == 2


def test_eds_from_before_the_report_does_not_count_as_confirmation() -> None:
    schedule, clock = make()
    schedule.update(UP)
    schedule.connected()
    run_until(schedule, clock, clock.now + 60)
    schedule.observed(True)
    clock.now += 100
    schedule.update(HealthEvent(False, "down"))
    schedule.update(UP)  # back up before anything went out: still a transition on the wire
    reports = run_until(schedule, clock, clock.now + HOUR)
    assert reasons(reports) == [Reason.TRANSITION, Reason.CONFIRM]


def test_eds_later_contradicting_us_triggers_a_resend_after_the_settle_time() -> None:
    # istiod recreated the entry (say, after a long disconnect on its side) without our health.
    schedule, clock = make()
    schedule.update(UP)
    schedule.connected()
    schedule.observed(True)
    run_until(schedule, clock, clock.now + HOUR)
    t0 = clock.now
    schedule.observed(False)
    reports = run_until(schedule, clock, t0 + 14)
    assert [(r, h) for _, r, h in reports] == [(Reason.UNCONFIRMED, True)]
    assert reports[0][0] == t0  # the last report is long settled: no reason to wait
    schedule.observed(True)
    assert run_until(schedule, clock, clock.now + HOUR) == []


def test_eds_contradiction_right_after_a_report_waits_for_it_to_land() -> None:
    schedule, clock = make()
    schedule.update(UP)
    schedule.connected()
    schedule.observed(True)
    run_until(schedule, clock, clock.now + 60)
    t0 = clock.now
    schedule.update(DOWN)
    assert reasons(run_until(schedule, clock, t0)) == [Reason.TRANSITION]
    clock.now += 0.05
    schedule.observed(True)  # a push computed before istiod wrote our report
    clock.now += 1
    schedule.observed(False)  # ... and the one after it
    assert run_until(schedule, clock, t0 + HOUR) == []


def test_reconnect_forgets_what_the_old_stream_showed() -> None:
    schedule, clock = make()
    schedule.update(UP)
    gen = schedule.connected()
    schedule.observed(True)
    run_until(schedule, clock, clock.now + 60)
    schedule.disconnected(gen)
    schedule.connected()
    # The entry may be new on istiod's side: the replay is confirmed like any other report.
    assert reasons(run_until(schedule, clock, clock.now + HOUR)) == [Reason.RECONNECT, Reason.CONFIRM]


# ---------------------------------------------------------------- heartbeat


def test_heartbeat_is_off_by_default() -> None:
    assert ReportPolicy().heartbeat_s == 0


def test_heartbeat_once_per_period_at_a_random_point_of_each_period() -> None:
    period = 1800.0
    schedule, clock = make(ReportPolicy(heartbeat_s=period), seed=3)
    schedule.update(UP)
    start = clock.now
    schedule.connected()
    beats = [t for t, r, _ in run_until(schedule, clock, start + 48 * period) if r is Reason.HEARTBEAT]
    # One per period, never in the period of the connect report, each inside its own period.
    assert len(beats) in (46, 47)
    for k, t in enumerate(beats, start=1):
        assert start + k * period <= t < start + (k + 1) * period
    offsets = [(t - start) % period for t in beats]
    assert max(offsets) - min(offsets) > period / 2


# ---------------------------------------------------------------- the driver


async def test_reporter_sends_due_reports_at_once_and_timed_ones_later() -> None:
    policy = ReportPolicy(confirm_after_s=(0.05, 0.1), settle_s=0.2)
    reporter = HealthReporter(policy, rng=random.Random(1))
    sent: list[Report] = []
    open_ = True

    def send(report: Report) -> bool:
        if not open_:
            return False
        sent.append(report)
        return True

    reporter.update(DOWN)
    task = asyncio.create_task(reporter.serve(send))
    await asyncio.sleep(0.01)
    assert [r.reason for r in sent] == [Reason.RECONNECT]
    reporter.update(UP)
    # Synchronous: the caller can flush the stream right away (the agent's shutdown does).
    assert [r.reason for r in sent] == [Reason.RECONNECT, Reason.TRANSITION]
    await asyncio.sleep(0.3)
    assert [r.reason for r in sent] == [Reason.RECONNECT, Reason.TRANSITION, Reason.CONFIRM]
    assert reporter.snapshot()["sent_by_reason"] == {"reconnect": 1, "transition": 1, "confirm": 1}
    open_ = False
    reporter.update(DOWN)  # the stream refuses: serve ends and the schedule waits for the next stream
    await asyncio.wait_for(task, 1)
    assert reporter.snapshot()["connected"] is False

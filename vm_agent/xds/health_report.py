"""Which health reports go to istiod, and when (product decision 3).

Every report istiod receives becomes a WorkloadEntry status write to the kube-apiserver, changed or not,
through one queue and istiod's shared kube client budget (istiod-facts-2.md). So the agent sends:

* ``transition``: the checker's new state, at once (the checker already applied the probe thresholds);
* ``reconnect``: the current state once on every new stream, after istiod answered its first ordinary
  request (istiod drops a report sent as a stream's first request, and registers the VM while
  answering that request);
* ``confirm``: one re-send 5-15 s (jittered) after each (re)connect and transition, because a report that
  arrives before istiod's cache holds the WorkloadEntry is dropped. Skipped when EDS already showed
  istiod took the report (``eds_witness``);
* ``unconfirmed``: when EDS keeps showing the opposite of what we reported after the push debounce,
  re-sent with a growing, jittered backoff;
* ``heartbeat``: only when configured (off by default; the config allows no less than 30 min): once per
  period at a uniformly random point of each period, so a fleet never reports in step.

A VM whose health does not change and whose stream stays up therefore costs istiod nothing; a reconnect
costs at most two writes. ``ReportSchedule`` is the pure decision (injected clock and RNG);
``HealthReporter`` drives it on a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from vm_agent.health.event import HealthEvent
from vm_agent.metrics import REGISTRY, Counter, Gauge

REPORTS_SENT = Counter(
    "vm_agent_xds_health_reports_sent",
    "HealthInformation requests sent upstream (each is a WorkloadEntry status write in istiod), by reason",
    ["reason"],
    registry=REGISTRY,
)
CONFIRMS_SKIPPED = Counter(
    "vm_agent_xds_health_confirmations_skipped",
    "Confirmation re-sends left out because EDS already showed istiod took the report",
    registry=REGISTRY,
)
LAST_SENT_STATE = Gauge(
    "vm_agent_xds_health_last_sent_state",
    "Health last sent to istiod: 1 healthy, 0 unhealthy, -1 nothing sent yet",
    registry=REGISTRY,
)
LAST_SENT_STATE.set(-1)


class Reason(StrEnum):
    TRANSITION = "transition"
    RECONNECT = "reconnect"
    CONFIRM = "confirm"
    UNCONFIRMED = "unconfirmed"
    HEARTBEAT = "heartbeat"


@dataclass(frozen=True)
class ReportPolicy:
    confirm_after_s: tuple[float, float] = (5.0, 15.0)
    """Window of the one confirmation after each (re)connect and transition."""
    settle_s: float = 15.0
    """How long istiod may take to show a report in EDS: the write, then the push debounce (at most 10 s)."""
    resend_cap_s: float = 1800.0
    """Cap of the jittered part of the backoff between re-sends of a report EDS does not confirm."""
    heartbeat_s: float = 0.0
    """Periodic re-send; 0 turns it off."""


@dataclass(frozen=True)
class Report:
    event: HealthEvent
    reason: Reason


class ReportSchedule:
    """Decides which report goes out when. Pure: no I/O, time comes from ``clock``, jitter from ``rng``.

    Inputs: ``update`` (the checker's state), ``connected``/``disconnected`` (a stream that can carry
    reports), ``observed`` (what EDS shows). Outputs: ``due`` (the report to send now, if any; call it
    until it returns ``None``) and ``next_at`` (when ``due`` may next have something).
    """

    def __init__(
        self, policy: ReportPolicy | None = None, *, clock: Callable[[], float], rng: random.Random | None = None
    ) -> None:
        self.policy = policy or ReportPolicy()
        self._clock = clock
        self._rng = rng or random.Random()
        self.current: HealthEvent | None = None
        self.last_sent: HealthEvent | None = None
        self.last_sent_at: float | None = None
        self._generation = 0
        self._connected = False
        self._pending: Reason | None = None
        self._confirm_at: float | None = None
        self._check_at: float | None = None
        self._resends = 0
        self._heartbeat_start = 0.0
        self._heartbeat_window = 0
        self._heartbeat_at: float | None = None
        self.witness: bool | None = None
        self._witness_at: float | None = None
        self.skipped_confirmations = 0

    # ------------------------------------------------------------------ inputs

    def update(self, event: HealthEvent) -> None:
        """The checker's latest state; a different one is a transition."""
        if event == self.current:
            return
        self.current = event
        if self._connected:
            self._pending = Reason.TRANSITION

    def connected(self) -> int:
        """A new stream can carry reports; returns its generation for ``disconnected``."""
        self._generation += 1
        self._connected = True
        # What EDS showed on the old stream may be stale (the entry can be gone after the grace period).
        self.witness = self._witness_at = None
        self._pending = Reason.RECONNECT if self.current is not None else None
        self._confirm_at = self._check_at = None
        self._heartbeat_start = self._clock()
        self._heartbeat_window = 0
        self._heartbeat_at = self._next_heartbeat()
        return self._generation

    def disconnected(self, generation: int) -> None:
        """The stream of ``generation`` ended; a later stream's ``connected`` already superseded an older one."""
        if generation != self._generation:
            return
        self._connected = False
        self._pending = self._confirm_at = self._check_at = self._heartbeat_at = None

    def observed(self, serving: bool) -> None:
        """EDS shows istiod serving (True) or not serving (False) this VM's endpoint."""
        now = self._clock()
        self.witness, self._witness_at = serving, now
        if not self._connected or self.current is None or self.last_sent_at is None:
            return
        if serving == self.current.healthy:
            self._check_at = None
            self._resends = 0
        elif self._check_at is None:
            # istiod's view differs from ours although we reported: maybe our report is still on its way,
            # maybe istiod lost it (or recreated the entry). Look again once a report had time to land.
            self._check_at = max(now, self.last_sent_at + self.policy.settle_s)

    # ------------------------------------------------------------------ outputs

    def due(self) -> Report | None:
        current = self.current
        if not self._connected or current is None:
            return None
        now = self._clock()
        if self._pending is not None:
            reason, self._pending = self._pending, None
            self._confirm_at = now + self._rng.uniform(*self.policy.confirm_after_s)
            self._check_at = now + self.policy.settle_s
            self._resends = 0
            return self._sent(reason, now)
        if self._confirm_at is not None and now >= self._confirm_at:
            self._confirm_at = None
            if self._confirmed_by_witness():
                self.skipped_confirmations += 1
                CONFIRMS_SKIPPED.inc()
            else:
                return self._sent(Reason.CONFIRM, now)
        if self._check_at is not None and now >= self._check_at:
            if self.witness is not None and self.witness != current.healthy:
                self._resends += 1
                jitter = min(self.policy.resend_cap_s, self.policy.settle_s * 2**self._resends)
                self._check_at = now + self.policy.settle_s + self._rng.uniform(0, jitter)
                return self._sent(Reason.UNCONFIRMED, now)
            self._check_at = None
        if self._heartbeat_at is not None and now >= self._heartbeat_at:
            self._heartbeat_at = self._next_heartbeat()
            return self._sent(Reason.HEARTBEAT, now)
        return None

    def next_at(self) -> float | None:
        if not self._connected or self.current is None:
            return None
        if self._pending is not None:
            return self._clock()
        times = [t for t in (self._confirm_at, self._check_at, self._heartbeat_at) if t is not None]
        return min(times) if times else None

    def snapshot(self) -> dict[str, Any]:
        return {
            "connected": self._connected,
            "eds_shows_serving": self.witness,
            "confirm_at": self._confirm_at,
            "check_at": self._check_at,
            "heartbeat_at": self._heartbeat_at,
            "resends_in_a_row": self._resends,
            "skipped_confirmations": self.skipped_confirmations,
        }

    # ------------------------------------------------------------------ helpers

    def _sent(self, reason: Reason, now: float) -> Report:
        assert self.current is not None
        self.last_sent, self.last_sent_at = self.current, now
        return Report(self.current, reason)

    def _confirmed_by_witness(self) -> bool:
        return (
            self.current is not None
            and self.witness == self.current.healthy
            and self._witness_at is not None
            and self.last_sent_at is not None
            and self._witness_at >= self.last_sent_at
        )

    def _next_heartbeat(self) -> float | None:
        period = self.policy.heartbeat_s
        if period <= 0:
            return None
        # One report at a uniformly random point of each period after the connect: a rate of one per period
        # with no two VMs in step, and never in the period the reconnect report was just sent in.
        self._heartbeat_window += 1
        return self._heartbeat_start + period * self._heartbeat_window + self._rng.uniform(0, period)


Send = Callable[[Report], bool]
"""Queues a report on the stream; False when the stream cannot take it (ended)."""


class HealthReporter:
    """Drives a ``ReportSchedule`` on the stream that currently carries reports.

    A report that is due goes out synchronously from ``update``/``observed`` (so a caller can flush the
    stream right after reporting, as the shutdown does); timed ones go out from ``serve``.
    """

    def __init__(
        self,
        policy: ReportPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.schedule = ReportSchedule(policy, clock=clock, rng=rng)
        self._clock = clock
        self._wake = asyncio.Event()
        self._send: Send | None = None
        self.sent: dict[str, int] = {}
        self.reported_at: float | None = None
        self.last_sent_wall: float | None = None

    def update(self, event: HealthEvent) -> None:
        self.reported_at = time.time()
        self.schedule.update(event)
        self._pump()

    def observed(self, serving: bool) -> None:
        self.schedule.observed(serving)
        self._pump()

    async def serve(self, send: Send) -> None:
        """Send reports through ``send`` until cancelled (the stream ended or was replaced)."""
        generation = self.schedule.connected()
        self._send = send
        try:
            while self._pump() and self._send is send:
                wake_at = self.schedule.next_at()
                self._wake.clear()
                timeout = None if wake_at is None else max(0.0, wake_at - self._clock())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
        finally:
            if self._send is send:
                self._send = None
            self.schedule.disconnected(generation)

    def _pump(self) -> bool:
        """Send what is due; False when the stream refused a report (it ended)."""
        send = self._send
        if send is None:
            return True
        try:
            while (report := self.schedule.due()) is not None:
                if not send(report):
                    self._send = None
                    return False
                self._record(report)
            return True
        finally:
            self._wake.set()  # the next deadline may have moved, or the stream is gone

    def _record(self, report: Report) -> None:
        self.sent[report.reason.value] = self.sent.get(report.reason.value, 0) + 1
        self.last_sent_wall = time.time()
        REPORTS_SENT.labels(report.reason.value).inc()
        LAST_SENT_STATE.set(1 if report.event.healthy else 0)

    def snapshot(self) -> dict[str, Any]:
        s = self.schedule
        return {
            "latest": None if s.current is None else {"healthy": s.current.healthy, "message": s.current.message},
            "reported_at": self.reported_at,
            "last_sent": None
            if s.last_sent is None
            else {"healthy": s.last_sent.healthy, "message": s.last_sent.message},
            "last_sent_at": self.last_sent_wall,
            "sent_by_reason": dict(self.sent),
            "heartbeat_s": s.policy.heartbeat_s,
            **s.snapshot(),
        }

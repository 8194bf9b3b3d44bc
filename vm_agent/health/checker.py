"""The readiness checker: Envoy first, then the WorkloadGroup probe, thresholds, transitions (§9.4).

Only transitions become ``HealthEvent``s; the xDS proxy's report schedule (``xds/health_report.py``) decides
when each goes to istiod.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from vm_agent.config.probe import ReadinessProbe
from vm_agent.health.event import HealthEvent
from vm_agent.health.probers import probe_once
from vm_agent.logs import get_logger
from vm_agent.metrics import REGISTRY, Counter, Gauge, Histogram

log = get_logger("health")

# An Envoy readiness check that hangs must not stall probing forever; Istio's own checks use 1 s and 3 s.
ENVOY_READY_TIMEOUT = 5.0

PROBES = Counter(
    "vm_agent_health_probes",
    "Readiness probe rounds (Envoy check plus the WorkloadGroup probe), by result",
    ["result"],
    registry=REGISTRY,
)
PROBE_SECONDS = Histogram(
    "vm_agent_health_probe_duration_seconds",
    "Time one readiness probe round took",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
STATE = Gauge(
    "vm_agent_health_state",
    "Workload readiness the checker last decided (sent on by the xDS proxy): 1 healthy, 0 unhealthy, -1 none yet",
    registry=REGISTRY,
)
LAST_RESULT = Gauge(
    "vm_agent_health_last_probe_success",
    "1 if the last probe round succeeded, 0 if it failed, -1 before the first round",
    registry=REGISTRY,
)
CONSECUTIVE = Gauge(
    "vm_agent_health_consecutive_results",
    "How many probe rounds in a row gave the same result as the last one",
    registry=REGISTRY,
)
TRANSITIONS = Counter(
    "vm_agent_health_transitions",
    "Readiness transitions reported to istiod, by new state",
    ["to"],
    registry=REGISTRY,
)
STATE.set(-1)
LAST_RESULT.set(-1)


@dataclass(frozen=True)
class HealthSettings:
    probe: ReadinessProbe
    default_host: str  # first instance IP, or "localhost" with REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION
    source_address: str | None = None  # "127.0.0.6" / "::6" when capture is on, else None


class ThresholdStateMachine:
    """Istio's counting rules, kept exact: the counters compare with ``==`` and reset only when emitting.

    Starting from "not reported", the first event needs ``success_threshold`` consecutive successes or
    ``failure_threshold`` consecutive failures; afterwards only a change of state is emitted.
    """

    def __init__(self, success_threshold: int, failure_threshold: int) -> None:
        if success_threshold < 1 or failure_threshold < 1:
            raise ValueError(
                f"readiness probe thresholds: expected successThreshold and failureThreshold >= 1, "
                f"got {success_threshold} and {failure_threshold}"
            )
        self.success_threshold = success_threshold
        self.failure_threshold = failure_threshold
        self.healthy: bool | None = None  # None: nothing reported yet
        self._num_success = 0
        self._num_fail = 0

    def observe(self, ok: bool, message: str) -> HealthEvent | None:
        if ok:
            self._num_success += 1
            self._num_fail = 0
            if self._num_success == self.success_threshold and self.healthy is not True:
                self._num_success = 0
                self.healthy = True
                return HealthEvent(healthy=True)
            return None
        self._num_fail += 1
        self._num_success = 0
        if self._num_fail == self.failure_threshold and self.healthy is not False:
            self._num_fail = 0
            self.healthy = False
            return HealthEvent(healthy=False, message=message or "readiness probe failed")
        return None

    def force_unhealthy(self, message: str) -> HealthEvent:
        self.healthy = False
        self._num_success = self._num_fail = 0
        return HealthEvent(healthy=False, message=message)


Prober = Callable[[], Awaitable[tuple[bool, str]]]


class Checker:
    """Runs the readiness probe on Istio's schedule and reports transitions through ``on_event``.

    ``prober``, ``clock`` and ``sleep`` are seams for tests (scripted results, a fake clock); the agent
    leaves them at their defaults.
    """

    def __init__(
        self,
        settings: HealthSettings,
        *,
        envoy_ready: Callable[[], Awaitable[str | None]],
        on_event: Callable[[HealthEvent], None],
        prober: Prober | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._settings = settings
        self._probe = settings.probe
        self._envoy_ready = envoy_ready
        self._on_event = on_event
        self._prober = prober
        self._clock = clock
        self._sleep = sleep
        self._machine = ThresholdStateMachine(self._probe.success_threshold, self._probe.failure_threshold)
        self._loop_task: asyncio.Task[None] | None = None
        self._stopped_reason: str | None = None
        self._rounds = 0
        self._transitions = 0
        self._last_ok: bool | None = None
        self._last_message = ""
        self._last_at: float | None = None  # wall-clock, for humans
        self._last_duration = 0.0
        self._consecutive = 0
        self._last_event: HealthEvent | None = None

    # --- lifecycle -----------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Probe until cancelled, or until ``report_not_ready``; then hold (the service contract) until cancelled."""
        try:
            if self._stopped_reason is None:
                self._loop_task = asyncio.create_task(self._probe_loop(), name="health-probe-loop")
                # wait() does not re-raise the inner task's cancellation by report_not_ready.
                await asyncio.wait({self._loop_task})
                if not self._loop_task.cancelled() and (exc := self._loop_task.exception()) is not None:
                    raise exc
            await asyncio.Event().wait()
        finally:
            if self._loop_task is not None and not self._loop_task.done():
                self._loop_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._loop_task

    def report_not_ready(self, reason: str) -> None:
        """Report unhealthy now (shutdown: before Envoy drains) and stop probing. Later calls do nothing."""
        if self._stopped_reason is not None:
            return
        self._stopped_reason = reason or "agent is shutting down"
        if self._loop_task is not None and not self._loop_task.done():
            self._loop_task.cancel()
        log.info("reporting not ready and stopping readiness probes: %s", self._stopped_reason)
        self._emit(self._machine.force_unhealthy(self._stopped_reason))

    def snapshot(self) -> dict[str, Any]:
        healthy = self._machine.healthy
        return {
            "state": "unknown" if healthy is None else ("healthy" if healthy else "unhealthy"),
            "reported_message": self._last_event.message if self._last_event else "",
            "probe": self._probe.to_json(),
            "default_host": self._settings.default_host,
            "source_address": self._settings.source_address,
            "rounds": self._rounds,
            "last_result": None
            if self._last_ok is None
            else {
                "success": self._last_ok,
                "message": self._last_message,
                "at": self._last_at,
                "duration_seconds": round(self._last_duration, 6),
            },
            "consecutive": self._consecutive,
            "transitions": self._transitions,
            "stopped": self._stopped_reason is not None,
            "stopped_reason": self._stopped_reason,
        }

    # --- probing -------------------------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        probe = self._probe
        if probe.initial_delay_seconds > 0:
            await self._sleep(probe.initial_delay_seconds)
        period = float(probe.period_seconds)
        next_tick = self._clock() + period
        while True:
            await self._check()
            now = self._clock()
            if now < next_tick:
                await self._sleep(next_tick - now)
                next_tick += period
            elif period > 0:
                # Ticks that passed during a slow probe coalesce into one that fires now (Go's ticker).
                next_tick += (math.floor((now - next_tick) / period) + 1) * period
            else:
                await asyncio.sleep(0)  # a zero period must still let the loop breathe

    async def _check(self) -> None:
        started = self._clock()
        ok, message = await self._one_round()
        duration = max(self._clock() - started, 0.0)
        if self._stopped_reason is not None:
            return  # a result that finished after report_not_ready must not undo it
        self._record(ok, message, duration)
        event = self._machine.observe(ok, message)
        if event is not None:
            self._emit(event)

    async def _one_round(self) -> tuple[bool, str]:
        """The aggregate prober: Envoy's readiness first; its reason short-circuits the app probe."""
        try:
            async with asyncio.timeout(ENVOY_READY_TIMEOUT):
                reason = await self._envoy_ready()
        except TimeoutError:
            return False, f"Envoy readiness check did not answer within {ENVOY_READY_TIMEOUT:g}s"
        except Exception as exc:  # a flaky admin call is a failed round, not a dead checker
            log.warning("Envoy readiness check failed: %s", exc)
            return False, f"Envoy readiness check failed: {exc}"
        if reason is not None:
            return False, reason
        if self._prober is not None:
            return await self._prober()
        return await probe_once(
            self._probe.action,
            default_host=self._settings.default_host,
            timeout=float(self._probe.timeout_seconds),
            source_address=self._settings.source_address,
        )

    def _record(self, ok: bool, message: str, duration: float) -> None:
        self._rounds += 1
        self._consecutive = self._consecutive + 1 if ok == self._last_ok else 1
        self._last_ok = ok
        self._last_message = message
        self._last_at = time.time()
        self._last_duration = duration
        PROBES.labels(result="success" if ok else "failure").inc()
        PROBE_SECONDS.observe(duration)
        LAST_RESULT.set(1 if ok else 0)
        CONSECUTIVE.set(self._consecutive)
        if not ok:
            log.debug("readiness probe failed: %s", message)

    def _emit(self, event: HealthEvent) -> None:
        self._transitions += 1
        self._last_event = event
        STATE.set(1 if event.healthy else 0)
        TRANSITIONS.labels(to="healthy" if event.healthy else "unhealthy").inc()
        if event.healthy:
            log.info("workload is ready")
        else:
            log.info("workload is not ready: %s", event.message)
        self._on_event(event)

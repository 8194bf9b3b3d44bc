"""Istio's threshold rules (§9.4) and the checker's schedule, driven by scripted results and a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

import pytest

from vm_agent.config.probe import ReadinessProbe, TcpSocketAction
from vm_agent.health import Checker, HealthEvent, HealthSettings, ThresholdStateMachine
from vm_agent.metrics import REGISTRY

OK = (True, "")


def fail(msg: str = "boom") -> tuple[bool, str]:
    return (False, msg)


def H() -> HealthEvent:
    return HealthEvent(healthy=True)


def U(msg: str = "boom") -> HealthEvent:
    return HealthEvent(healthy=False, message=msg)


def events_for(results: Sequence[tuple[bool, str]], success: int = 1, failure: int = 1) -> list[HealthEvent]:
    machine = ThresholdStateMachine(success, failure)
    out = []
    for ok, msg in results:
        event = machine.observe(ok, msg)
        if event is not None:
            out.append(event)
    return out


@pytest.mark.parametrize(
    ("success", "failure", "results", "expected"),
    [
        # Istio's defaults (1/1): every change of result is a transition, repeats are silent.
        (1, 1, [OK, OK, fail("a"), fail("b"), OK], [H(), U("a"), H()]),
        # Nothing is reported before a threshold is reached from "unknown".
        (3, 3, [OK, OK, fail(), OK, OK, fail(), fail()], []),
        (3, 2, [OK, OK, fail("x"), OK, OK, OK], [H()]),
        # The message is the one of the round that crossed the failure threshold.
        (1, 3, [fail("1"), fail("2"), fail("3"), fail("4")], [U("3")]),
        # A success between failures restarts the failure count.
        (1, 2, [OK, fail("a"), OK, fail("b"), fail("c")], [H(), U("c")]),
        # After a transition the counter restarts; further failures in the same state never re-emit.
        (1, 2, [fail(), fail(), fail(), fail(), fail(), OK, fail("p"), fail("q")], [U(), H(), U("q")]),
        (2, 1, [OK, fail("f"), OK, OK, OK, OK], [U("f"), H()]),
    ],
)
def test_threshold_sequences_emit_only_transitions(
    success: int, failure: int, results: list[tuple[bool, str]], expected: list[HealthEvent]
) -> None:
    assert events_for(results, success, failure) == expected


def test_unhealthy_without_message_still_says_something() -> None:
    assert events_for([fail("")]) == [U("readiness probe failed")]


def test_thresholds_below_one_are_rejected_with_names() -> None:
    with pytest.raises(ValueError, match="successThreshold and failureThreshold"):
        ThresholdStateMachine(0, 1)


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class Script:
    """Scripted probe results, each (ok, message, seconds it takes on the fake clock)."""

    def __init__(self, fake: FakeTime, steps: Sequence[tuple[bool, str, float]]) -> None:
        self.fake = fake
        self.steps = list(steps)
        self.starts: list[float] = []
        self.done = asyncio.Event()

    async def __call__(self) -> tuple[bool, str]:
        if len(self.starts) == len(self.steps):
            self.done.set()
            await asyncio.Event().wait()
        ok, msg, seconds = self.steps[len(self.starts)]
        self.starts.append(self.fake.now)
        self.fake.now += seconds
        return ok, msg


def make_probe(**kw: int) -> ReadinessProbe:
    return ReadinessProbe(action=TcpSocketAction(port=1), **kw)


async def always_ready() -> str | None:
    return None


async def run_until(checker: Checker, done: Callable[[], Awaitable[object]]) -> None:
    task = asyncio.create_task(checker.run())
    try:
        await asyncio.wait_for(done(), 5)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_schedule_initial_delay_fixed_ticker_and_coalesced_ticks() -> None:
    fake = FakeTime()
    script = Script(fake, [(True, "", 0), (True, "", 25), (True, "", 0), (True, "", 0)])
    events: list[HealthEvent] = []
    checker = Checker(
        HealthSettings(make_probe(initial_delay_seconds=5, period_seconds=10), default_host="127.0.0.1"),
        envoy_ready=always_ready,
        on_event=events.append,
        prober=script,
        clock=fake.clock,
        sleep=fake.sleep,
    )
    await run_until(checker, script.done.wait)
    # Ticks at 15, 25, 35, 45: the round at 15 runs until 40, so 25 fires late at 40 and 35 is dropped.
    assert script.starts == [5, 15, 40, 45]
    assert events == [H()]


async def test_checker_reports_threshold_transitions_in_order() -> None:
    fake = FakeTime()
    results = [OK, OK, fail("a"), fail("b"), fail("c"), OK, fail("d")]
    script = Script(fake, [(ok, msg, 0.1) for ok, msg in results])
    events: list[HealthEvent] = []
    checker = Checker(
        HealthSettings(make_probe(success_threshold=2, failure_threshold=2), default_host="127.0.0.1"),
        envoy_ready=always_ready,
        on_event=events.append,
        prober=script,
        clock=fake.clock,
        sleep=fake.sleep,
    )
    await run_until(checker, script.done.wait)
    assert events == [H(), U("b")]
    assert script.starts == [0, 10, 20, 30, 40, 50, 60]
    snap = checker.snapshot()
    assert snap["state"] == "unhealthy"
    assert snap["rounds"] == 7
    assert snap["transitions"] == 2
    assert snap["last_result"]["success"] is False
    assert snap["last_result"]["message"] == "d"
    assert snap["consecutive"] == 1


async def test_envoy_readiness_is_checked_first_and_short_circuits() -> None:
    fake = FakeTime()
    script = Script(fake, [(True, "", 0)] * 3)
    envoy_answers = ["config not received from XDS server (is Istiod running?)", None, None, None, None]
    envoy_calls = 0

    async def envoy_ready() -> str | None:
        nonlocal envoy_calls
        envoy_calls += 1
        return envoy_answers[envoy_calls - 1]

    events: list[HealthEvent] = []
    checker = Checker(
        HealthSettings(make_probe(), default_host="127.0.0.1"),
        envoy_ready=envoy_ready,
        on_event=events.append,
        prober=script,
        clock=fake.clock,
        sleep=fake.sleep,
    )
    await run_until(checker, script.done.wait)
    assert events == [U("config not received from XDS server (is Istiod running?)"), H()]
    # The app probe did not run in the round Envoy was not ready.
    assert script.starts == [10, 20, 30]


async def test_envoy_readiness_error_counts_as_a_failed_round() -> None:
    fake = FakeTime()
    script = Script(fake, [(True, "", 0)])

    async def envoy_ready() -> str | None:
        raise ConnectionResetError("admin port went away")

    events: list[HealthEvent] = []
    checker = Checker(
        HealthSettings(make_probe(), default_host="127.0.0.1"),
        envoy_ready=envoy_ready,
        on_event=events.append,
        prober=script,
        clock=fake.clock,
        sleep=fake.sleep,
    )

    async def first_event() -> None:
        while not events:
            await asyncio.sleep(0)

    await run_until(checker, first_event)
    assert events == [U("Envoy readiness check failed: admin port went away")]
    assert script.starts == []


async def test_report_not_ready_emits_now_cancels_probe_and_stops() -> None:
    fake = FakeTime()
    probe_started = asyncio.Event()
    release = asyncio.Event()
    calls = 0

    async def prober() -> tuple[bool, str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return OK
        probe_started.set()
        await release.wait()  # an in-flight probe that would succeed after shutdown began
        return OK

    events: list[HealthEvent] = []
    checker = Checker(
        HealthSettings(make_probe(), default_host="127.0.0.1"),
        envoy_ready=always_ready,
        on_event=events.append,
        prober=prober,
        clock=fake.clock,
        sleep=fake.sleep,
    )
    task = asyncio.create_task(checker.run())
    await asyncio.wait_for(probe_started.wait(), 5)
    assert events == [H()]
    checker.report_not_ready("agent is shutting down")
    assert events == [H(), U("agent is shutting down")]  # synchronously, before Envoy drains
    release.set()
    for _ in range(50):
        await asyncio.sleep(0)
    checker.report_not_ready("again")
    assert events == [H(), U("agent is shutting down")]
    assert calls == 2
    assert not task.done()  # run() holds until cancelled, like every service
    snap = checker.snapshot()
    assert snap["stopped"] is True
    assert snap["state"] == "unhealthy"
    assert snap["reported_message"] == "agent is shutting down"
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_report_not_ready_before_run_never_probes() -> None:
    calls = 0

    async def prober() -> tuple[bool, str]:
        nonlocal calls
        calls += 1
        return OK

    events: list[HealthEvent] = []
    checker = Checker(
        HealthSettings(make_probe(), default_host="127.0.0.1"),
        envoy_ready=always_ready,
        on_event=events.append,
        prober=prober,
        sleep=FakeTime().sleep,
    )
    checker.report_not_ready("stopping")
    task = asyncio.create_task(checker.run())
    for _ in range(20):
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert events == [U("stopping")]
    assert calls == 0


async def test_metrics_show_state_last_result_consecutive_and_transitions() -> None:
    def sample(name: str, labels: dict[str, str] | None = None) -> float:
        value = REGISTRY.get_sample_value(name, labels or {})
        return 0.0 if value is None else float(value)

    before_healthy = sample("vm_agent_health_transitions_total", {"to": "healthy"})
    before_unhealthy = sample("vm_agent_health_transitions_total", {"to": "unhealthy"})
    before_fail = sample("vm_agent_health_probes_total", {"result": "failure"})
    fake = FakeTime()
    script = Script(fake, [(False, "x", 0), (False, "y", 0), (True, "", 0), (True, "", 0), (True, "", 0)])
    checker = Checker(
        HealthSettings(make_probe(), default_host="127.0.0.1"),
        envoy_ready=always_ready,
        on_event=lambda e: None,
        prober=script,
        clock=fake.clock,
        sleep=fake.sleep,
    )
    await run_until(checker, script.done.wait)
    assert sample("vm_agent_health_state") == 1
    assert sample("vm_agent_health_last_probe_success") == 1
    assert sample("vm_agent_health_consecutive_results") == 3
    assert sample("vm_agent_health_transitions_total", {"to": "healthy"}) == before_healthy + 1
    assert sample("vm_agent_health_transitions_total", {"to": "unhealthy"}) == before_unhealthy + 1
    assert sample("vm_agent_health_probes_total", {"result": "failure"}) == before_fail + 2
    assert checker.snapshot()["consecutive"] == 3

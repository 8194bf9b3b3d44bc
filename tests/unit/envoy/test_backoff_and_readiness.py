"""Restart backoff with an injected clock, exit reasons, and pilot-agent's readiness texts."""

from __future__ import annotations

import signal

from vm_agent.envoy.admin import UpdateStats, config_error, liveness_error, parse_stats
from vm_agent.envoy.supervisor import Backoff, exit_reason


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def crash_after(backoff: Backoff, clock: Clock, ran_for: float) -> float:
    backoff.started()
    clock.now += ran_for
    delay = backoff.exited()
    clock.now += delay
    return delay


def test_backoff_doubles_to_the_cap() -> None:
    clock = Clock()
    b = Backoff(clock=clock)
    delays = [crash_after(b, clock, 1.0) for _ in range(9)]
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_backoff_resets_after_a_stable_minute() -> None:
    clock = Clock()
    b = Backoff(clock=clock)
    assert [crash_after(b, clock, 5.0) for _ in range(4)] == [0.5, 1, 2, 4]
    assert crash_after(b, clock, 59.9) == 8  # not quite stable
    assert crash_after(b, clock, 60.0) == 0.5  # a stable minute
    assert crash_after(b, clock, 1.0) == 1


def test_exit_reasons() -> None:
    assert exit_reason(-signal.SIGKILL) == "killed by signal SIGKILL"
    assert exit_reason(-signal.SIGSEGV) == "killed by signal SIGSEGV"
    assert exit_reason(1) == "exited with status 1"
    assert exit_reason(0) == "exited with status 0"


def test_parse_stats_first_line_wins() -> None:
    text = "server.state: 0\nserver.state: 2\nlistener_manager.workers_started: 1\ngarbage\n"
    assert parse_stats(text) == {"server.state": "0", "listener_manager.workers_started": "1"}


def test_config_error_texts() -> None:
    assert config_error(UpdateStats(0, 0, 0, 0)) == (
        "config not received from XDS server (is Istiod running?): "
        "cds updates: 0 successful, 0 rejected; lds updates: 0 successful, 0 rejected"
    )
    assert config_error(UpdateStats(0, 1, 1, 0)) == (
        "config received from XDS server, but was rejected: "
        "cds updates: 0 successful, 1 rejected; lds updates: 1 successful, 0 rejected"
    )
    assert config_error(UpdateStats(1, 0, 0, 0)) == (
        "config not fully received from XDS server: "
        "cds updates: 1 successful, 0 rejected; lds updates: 0 successful, 0 rejected"
    )
    assert config_error(UpdateStats(1, 3, 2, 0)) is None  # applied once is enough


def test_liveness_error_texts() -> None:
    live = {"server.state": "0", "listener_manager.workers_started": "1"}
    assert liveness_error(live) is None
    assert liveness_error({**live, "server.state": "2"}) == "server is not live, current state is: PRE_INITIALIZING"
    assert liveness_error({**live, "server.state": "3"}) == "server is not live, current state is: INITIALIZING"
    assert liveness_error({**live, "listener_manager.workers_started": "0"}) == "workers have not yet started"
    assert (liveness_error({"server.state": "0"}) or "").startswith("failed to get readiness stats")

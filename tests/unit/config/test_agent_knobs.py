"""VM_AGENT_HEALTH_HEARTBEAT: off by default, and never frequent (each report is a WorkloadEntry write in istiod)."""

from __future__ import annotations

import pytest

from tests.unit.config.conftest import FixtureFactory
from vm_agent.config import Options, load
from vm_agent.config.agent_knobs import heartbeat_problem, proxy_log_level


def heartbeat(fixture_copy: FixtureFactory, cluster_env_line: str | None) -> tuple[float, list[str]]:
    folder = fixture_copy()
    if cluster_env_line is not None:
        with (folder / "cluster.env").open("a") as f:
            f.write(f"\n{cluster_env_line}\n")
    cfg = load(Options(config_dir=folder, resolv_conf=fixture_copy.resolv_conf, scan_interfaces=False))
    return cfg.agent.health_heartbeat_s, [str(p) for p in cfg.problems if p.key == "VM_AGENT_HEALTH_HEARTBEAT"]


def test_off_by_default(fixture_copy: FixtureFactory) -> None:
    assert heartbeat(fixture_copy, None) == (0.0, [])


def test_thirty_minutes_or_more_is_kept(fixture_copy: FixtureFactory) -> None:
    assert heartbeat(fixture_copy, "VM_AGENT_HEALTH_HEARTBEAT=45m") == (2700.0, [])


def test_the_old_60s_is_refused_naming_file_line_and_why(fixture_copy: FixtureFactory) -> None:
    value, problems = heartbeat(fixture_copy, "VM_AGENT_HEALTH_HEARTBEAT=60s")
    assert value == 0.0
    (problem,) = problems
    assert "cluster.env:" in problem
    assert "at least 30m" in problem and "WorkloadEntry status write" in problem


@pytest.mark.parametrize(("seconds", "ok"), [(0, True), (1, False), (1799, False), (1800, True), (86400, True)])
def test_heartbeat_rule(seconds: float, ok: bool) -> None:
    assert (heartbeat_problem(seconds) is None) is ok


def test_proxy_log_level_from_agent_flags() -> None:
    assert proxy_log_level("") == ("warning", None)
    assert proxy_log_level("--foo --proxyLogLevel=debug,upstream:trace,misc:error") == (
        "debug",
        "upstream:trace,misc:error",
    )

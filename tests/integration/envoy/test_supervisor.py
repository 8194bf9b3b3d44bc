"""A real Envoy under the Supervisor: LIVE, restarts after kill -9, leftovers, drain, no orphans."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.helpers.net import async_wait_for
from tests.integration.envoy.ads_stub import AdsStub, envoy_settings_for_test
from vm_agent.envoy import EnvoySettings, Supervisor, envoy_command, write_bootstrap
from vm_agent.metrics import REGISTRY

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def running(sup: Supervisor) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(sup.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_ready(sup: Supervisor, timeout: float = 20.0) -> None:
    async def check() -> bool:
        return await sup.admin.ready() is None

    await async_wait_for(check, timeout=timeout, interval=0.1, what="Envoy ready")


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]


async def http_get(port: int) -> Reply:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/") as resp:
        return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()})


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize(
    ("delta", "ipv6_only"), [(True, False), (False, False), (True, True)], ids=["delta", "sotw", "delta-ipv6"]
)
async def test_envoy_reaches_ready_and_is_gone_after_cancel(
    short_tmp: Path, ads: AdsStub, delta: bool, ipv6_only: bool
) -> None:
    settings = envoy_settings_for_test(short_tmp, delta_xds=delta, ipv6_only=ipv6_only)
    sup = Supervisor(settings)
    async with running(sup):
        await wait_ready(sup)
        assert await sup.admin.live()
        assert sup.admin.host == ("::1" if ipv6_only else "127.0.0.1")
        snap = sup.snapshot()
        pid = snap["pid"]
        assert snap["state"] == "running"
        assert snap["restarts"] == 0
        assert isinstance(pid, int)
        assert settings.pid_file is not None
        assert settings.pid_file.read_text().strip() == str(pid)
        assert settings.bootstrap_path.exists()
        assert oct(settings.config_dir.stat().st_mode & 0o777) == "0o700"
        assert ads.servicer.streams >= 1
    assert gone(pid)
    assert sup.snapshot()["state"] == "stopped"
    assert not settings.pid_file.exists()
    assert not settings.bootstrap_path.exists()


async def test_kill9_restarts_with_backoff(short_tmp: Path, ads: AdsStub) -> None:
    sup = Supervisor(envoy_settings_for_test(short_tmp))
    before = REGISTRY.get_sample_value("vm_agent_envoy_restarts_total") or 0.0
    killed_before = REGISTRY.get_sample_value("vm_agent_envoy_exits_total", {"reason": "SIGKILL"}) or 0.0
    async with running(sup):
        await wait_ready(sup)
        for round_ in range(1, 4):
            old = sup.pid
            assert old is not None
            os.kill(old, signal.SIGKILL)
            t0 = time.monotonic()

            async def restarted(old: int = old) -> bool:
                return sup.pid not in (None, old)

            await async_wait_for(restarted, timeout=15, what=f"restart #{round_}")
            # 0.5 s, 1 s, 2 s: the backoff doubles on each crash (plus process start time).
            delay = 0.5 * 2 ** (round_ - 1)
            assert delay * 0.9 <= time.monotonic() - t0 < delay + 5
            await wait_ready(sup)
            snap = sup.snapshot()
            assert snap["restarts"] == round_
            assert "SIGKILL" in snap["last_exit_reason"]
    after = REGISTRY.get_sample_value("vm_agent_envoy_restarts_total") or 0.0
    assert after - before == 3
    killed = REGISTRY.get_sample_value("vm_agent_envoy_exits_total", {"reason": "SIGKILL"}) or 0.0
    assert killed - killed_before == 3


def start_envoy_like_an_earlier_run(settings: EnvoySettings) -> subprocess.Popen[bytes]:
    path = write_bootstrap(settings)
    proc = subprocess.Popen(
        envoy_command(settings, path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    assert settings.pid_file is not None
    settings.pid_file.parent.mkdir(parents=True, exist_ok=True)
    settings.pid_file.write_text(f"{proc.pid}\n")
    return proc


async def test_leftover_envoy_from_earlier_run_is_stopped(short_tmp: Path, ads: AdsStub) -> None:
    settings = envoy_settings_for_test(short_tmp)
    leftover = start_envoy_like_an_earlier_run(settings)
    try:
        sup = Supervisor(settings)
        await async_wait_for(sup.admin.live, timeout=20, what="leftover Envoy live")
        async with running(sup):

            async def replaced() -> bool:
                return sup.pid not in (None, leftover.pid)

            # Readiness alone could be answered by the leftover on the same admin port: wait for our own Envoy.
            await async_wait_for(replaced, timeout=20, what="the supervisor's own Envoy")
            await wait_ready(sup)
            # The supervisor reaps it (it is our child here), so poll() cannot show the signal, only the exit.
            assert leftover.poll() is not None, "the leftover Envoy should have been stopped"
    finally:
        if leftover.poll() is None:
            leftover.kill()
        leftover.wait()


async def test_unrelated_process_named_in_stale_pid_file_is_never_killed(short_tmp: Path, ads: AdsStub) -> None:
    settings = envoy_settings_for_test(short_tmp)
    assert settings.pid_file is not None
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        settings.pid_file.parent.mkdir(parents=True, exist_ok=True)
        settings.pid_file.write_text(f"{bystander.pid}\n")
        sup = Supervisor(settings)
        async with running(sup):
            await wait_ready(sup)
            assert bystander.poll() is None
            assert sup.pid != bystander.pid
            assert settings.pid_file.read_text().strip() == str(sup.pid)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


async def test_drain_posts_drain_listeners_waits_then_stops(short_tmp: Path, ads: AdsStub) -> None:
    settings = envoy_settings_for_test(short_tmp, termination_drain_duration_s=1.5)
    sup = Supervisor(settings)
    async with running(sup) as task:
        await wait_ready(sup)
        pid = sup.pid
        assert pid is not None
        t0 = time.monotonic()
        assert ads.inbound_port is not None
        before = await http_get(ads.inbound_port)
        assert before.status == 200
        assert "close" not in before.headers.get("connection", "").lower()
        drain = asyncio.create_task(sup.drain())

        # A draining HTTP listener tells each client to close its connection.
        async def draining() -> bool:
            resp = await http_get(ads.inbound_port or 0)
            return "close" in resp.headers.get("connection", "").lower()

        await async_wait_for(draining, timeout=1.4, interval=0.05, what="inbound listener draining")
        assert sup.snapshot()["state"] == "draining"
        await drain
        elapsed = time.monotonic() - t0
        assert elapsed >= 1.4
        assert elapsed < 8
        await asyncio.wait_for(task, timeout=5)  # run() returns by itself after drain()
    assert gone(pid)
    assert sup.snapshot()["state"] == "stopped"


async def test_drain_after_drain_in_place_stops_at_once(short_tmp: Path, ads: AdsStub) -> None:
    sup = Supervisor(envoy_settings_for_test(short_tmp, termination_drain_duration_s=30))
    async with running(sup):
        await wait_ready(sup)
        pid = sup.pid
        assert pid is not None
        await sup.drain_in_place()
        assert sup.pid == pid  # /drain does not stop Envoy
        t0 = time.monotonic()
        await sup.drain()
        assert time.monotonic() - t0 < 5
        assert gone(pid)


async def test_second_signal_cancels_a_long_drain_at_once(short_tmp: Path, ads: AdsStub) -> None:
    sup = Supervisor(envoy_settings_for_test(short_tmp, termination_drain_duration_s=60))
    task = asyncio.create_task(sup.run())
    await wait_ready(sup)
    pid = sup.pid
    assert pid is not None
    drain = asyncio.create_task(sup.drain())
    await asyncio.sleep(0.3)
    assert not drain.done()
    # What the composition root does on a second SIGTERM: cancel everything.
    t0 = time.monotonic()
    drain.cancel()
    task.cancel()
    for t in (drain, task):
        with contextlib.suppress(asyncio.CancelledError):
            await t
    assert time.monotonic() - t0 < 5
    assert gone(pid)


async def test_backoff_comes_from_settings(short_tmp: Path, ads: AdsStub) -> None:
    settings = envoy_settings_for_test(short_tmp, restart_backoff_initial_s=0.05, restart_backoff_max_s=0.1)
    sup = Supervisor(settings)
    async with running(sup):
        await wait_ready(sup)
        for round_ in range(1, 5):
            old = sup.pid
            assert old is not None
            os.kill(old, signal.SIGKILL)
            t0 = time.monotonic()

            async def restarted(old: int = old) -> bool:
                return sup.pid not in (None, old)

            await async_wait_for(restarted, timeout=10, what=f"restart #{round_}")
            # With the default 0.5 s doubling, the 4th restart would wait 4 s.
            assert time.monotonic() - t0 < 2.5
        assert sup.snapshot()["restarts"] == 4

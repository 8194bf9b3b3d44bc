"""If the agent itself is SIGKILLed (no finally runs), the kernel takes Envoy down with it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers.net import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("how", ["setpriv", "no-setpriv"])
def test_envoy_dies_with_a_killed_agent(short_tmp: Path, how: str) -> None:
    agent = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.envoy.run_supervisor", str(short_tmp), how],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    envoy_pid = 0
    try:
        assert agent.stdout is not None
        line = agent.stdout.readline()
        envoy_pid = int(line)
        envoy = psutil.Process(envoy_pid)
        assert envoy.ppid() == agent.pid
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=10)

        def envoy_gone() -> bool:
            try:
                return envoy.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(envoy_gone, timeout=10, what="Envoy to die with its parent")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        if envoy_pid and psutil.pid_exists(envoy_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(envoy_pid, signal.SIGKILL)

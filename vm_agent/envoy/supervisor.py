"""Runs Envoy, restarts it with capped exponential backoff, drains and stops it (§7, product.md point 2).

Unlike pilot-agent, which exits when Envoy dies and leaves the restart to systemd, the supervisor restarts
Envoy in-process so identity, SDS, DNS and the status server stay up across an Envoy crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vm_agent.envoy.admin import EnvoyAdmin
from vm_agent.envoy.bootstrap import EnvoySettings, envoy_command, write_bootstrap
from vm_agent.envoy_binary import find_envoy_binary
from vm_agent.logs import get_logger
from vm_agent.metrics import REGISTRY, Counter, Gauge

log = get_logger("envoy")

ENVOY_RESTARTS = Counter(
    "vm_agent_envoy_restarts", "Times the supervisor restarted Envoy after it exited", registry=REGISTRY
)
ENVOY_EXITS = Counter(
    "vm_agent_envoy_exits", "Envoy exits not asked for by the agent, by reason", ["reason"], registry=REGISTRY
)
ENVOY_RUNNING = Gauge("vm_agent_envoy_running", "1 while an Envoy process is running", registry=REGISTRY)
ENVOY_BACKOFF = Gauge(
    "vm_agent_envoy_restart_backoff_seconds", "Delay before the pending Envoy restart (0 when none)", registry=REGISTRY
)

_PR_SET_PDEATHSIG = 1
_KILL_WAIT_S = 5.0


class Backoff:
    """Restart delays: ``initial`` doubling up to ``cap``; a run that lasted ``stable_after`` resets it."""

    def __init__(
        self,
        initial: float = 0.5,
        cap: float = 30.0,
        stable_after: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.initial = initial
        self.cap = cap
        self.stable_after = stable_after
        self._clock = clock
        self._next = initial
        self._started_at: float | None = None

    def started(self) -> None:
        self._started_at = self._clock()

    def exited(self) -> float:
        """The delay before the next start, given that the process just exited."""
        now = self._clock()
        if self._started_at is not None and now - self._started_at >= self.stable_after:
            self._next = self.initial
        self._started_at = None
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


# Looked up once in the parent: the child of a multi-threaded agent should not dlopen() between fork and exec.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        # Runs in the forked child: if the agent dies without cleaning up (SIGKILL, OOM), the kernel kills
        # Envoy too, so no orphan keeps the ports and a stale config.
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:  # the agent died before prctl took effect
            os._exit(1)

    return preexec


def spawn_plan(argv: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """How to start Envoy so that it dies with the agent (PR_SET_PDEATHSIG).

    Preferred: util-linux ``setpriv --pdeathsig KILL`` execs Envoy, so Python can spawn with vfork and no
    preexec hook. A forked child of an agent that runs grpcio can otherwise abort in gRPC's fork handlers
    before it reaches exec (seen here as an occasional SIGABRT on start). Without setpriv, a preexec hook
    sets the signal instead.
    """
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--", *argv], None
    return argv, _die_with_parent(os.getpid())


def is_our_envoy(pid: int, binary: Path, bootstrap: Path) -> bool:
    """True only for a live process running ``binary`` with ``-c bootstrap`` (never an unrelated pid reuse)."""
    import psutil  # only after an unclean exit left a pid file behind

    try:
        proc = psutil.Process(pid)
        cmdline = proc.cmdline()
        exe = proc.exe()
    except (psutil.Error, OSError):
        return False
    if proc.status() == psutil.STATUS_ZOMBIE or not cmdline:
        return False
    want = os.path.realpath(binary)
    if os.path.realpath(exe) != want and os.path.realpath(cmdline[0]) != want:
        return False
    for flag, value in itertools.pairwise(cmdline):
        if flag in ("-c", "--config-path") and os.path.realpath(value) == os.path.realpath(bootstrap):
            return True
    return False


def stop_leftover(pid_file: Path, binary: Path, bootstrap: Path) -> int | None:
    """Stop an Envoy left by an earlier agent run, if the pid file names one; returns its pid if stopped."""
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        pid = int(text)
    except ValueError:
        log.warning("ignoring pid file %s: expected a process id, found %r", pid_file, text[:40])
        pid_file.unlink(missing_ok=True)
        return None
    if not is_our_envoy(pid, binary, bootstrap):
        log.info("pid file %s names pid %d, which is not our Envoy; leaving it alone", pid_file, pid)
        pid_file.unlink(missing_ok=True)
        return None
    log.warning("stopping Envoy pid %d left over from an earlier agent run", pid)
    import psutil

    # SIGKILL straight away: its agent is gone, nobody drains for it, and pilot-agent ends Envoy with SIGKILL too.
    try:
        proc = psutil.Process(pid)
        proc.kill()
        proc.wait(timeout=_KILL_WAIT_S)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        log.warning("leftover Envoy pid %d did not exit %.0fs after SIGKILL", pid, _KILL_WAIT_S)
    pid_file.unlink(missing_ok=True)
    return pid


class Supervisor:
    """Owns the Envoy process. ``run()`` until cancelled; ``drain()``/``stop()`` end it on purpose."""

    def __init__(
        self,
        settings: EnvoySettings,
        *,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.admin = EnvoyAdmin(settings.admin_port, settings.localhost)
        self._backoff = backoff or Backoff(
            initial=settings.restart_backoff_initial_s,
            cap=settings.restart_backoff_max_s,
            stable_after=settings.restart_stable_after_s,
            clock=clock,
        )
        self._clock = clock
        self._proc: asyncio.subprocess.Process | None = None
        self._state = "new"
        self._restarts = 0
        self._starts = 0
        self._last_exit_reason: str | None = None
        self._last_exit_time: float | None = None
        self._started_at: float | None = None
        self._restart_at: float | None = None
        self._binary: Path | None = None
        self._stopping = False
        self._drained = False
        self._stop = asyncio.Event()
        self._stopped = asyncio.Event()
        self.first_start = asyncio.Event()
        """Set once the first Envoy process is started, or ``run()`` gave up before it could start one."""

    # -- lifecycle ---------------------------------------------------------------------------------

    async def run(self) -> None:
        bootstrap = self.settings.bootstrap_path
        try:
            self._binary = self.settings.binary or find_envoy_binary()
            if self.settings.pid_file is not None and self.settings.pid_file.exists():
                await asyncio.to_thread(stop_leftover, self.settings.pid_file, self._binary, bootstrap)
            write_bootstrap(self.settings)
        except BaseException:
            self.first_start.set()
            raise
        try:
            while not self._stopping:
                proc = await self._start(bootstrap)
                await self._wait_exit_or_stop(proc)
                if self._stopping:
                    break
                self._record_exit(proc)
                delay = self._backoff.exited()
                self._state = "backoff"
                self._restart_at = self._clock() + delay
                ENVOY_BACKOFF.set(delay)
                log.warning("Envoy %s; restarting in %.1fs", self._last_exit_reason, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)
                ENVOY_BACKOFF.set(0)
                self._restart_at = None
                if not self._stopping:
                    self._restarts += 1
                    ENVOY_RESTARTS.inc()
        finally:
            self.first_start.set()
            self._stopping = True
            await self._kill()
            self._state = "stopped"
            ENVOY_RUNNING.set(0)
            ENVOY_BACKOFF.set(0)
            if self.settings.pid_file is not None:
                self.settings.pid_file.unlink(missing_ok=True)
            bootstrap.unlink(missing_ok=True)
            self._stopped.set()

    async def drain(self) -> None:
        """SIGTERM path: drain the listeners (inbound ones for a sidecar) for the termination drain duration, then
        stop Envoy.

        After ``drain_in_place()`` (``POST /drain``) or with no Envoy running, Envoy is stopped at once.
        """
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None and not self._drained:
            self._state = "draining"
            self._drained = True
            # Like pilot-agent, wait the full duration even if the drain request failed: connections that are
            # open keep being served until then.
            await self.admin.drain_listeners(inbound_only=self.settings.drain_inbound_only, graceful=True)
            log.info("draining Envoy for %.1fs", self.settings.termination_drain_duration_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=self.settings.termination_drain_duration_s)
        await self.stop()

    async def drain_in_place(self) -> None:
        """``POST /drain``: start a graceful inbound drain that does not exit Envoy; a later drain() is instant."""
        self._drained = True
        if self._proc is not None and self._proc.returncode is None:
            self._state = "draining"
            await self.admin.drain_listeners(
                inbound_only=self.settings.drain_inbound_only, graceful=True, skip_exit=True
            )

    async def stop(self) -> None:
        """Stop Envoy now and make run() return (waits for it if run() is running)."""
        self._stopping = True
        self._stop.set()
        if self._state != "new":
            await self._stopped.wait()

    # -- readiness and state -------------------------------------------------------------------------

    async def ready(self) -> str | None:
        """The ``envoy_ready`` seam: None when Envoy is ready, else why not."""
        proc = self._proc
        if self._stopping:
            return "server is terminated"
        if proc is None or proc.returncode is not None:
            if self._restart_at is not None:
                wait = max(0.0, self._restart_at - self._clock())
                return f"Envoy is not running ({self._last_exit_reason}); restarting in {wait:.1f}s"
            return "Envoy is not running"
        return await self.admin.ready()

    async def wait_live(self, interval: float = 0.1) -> None:
        """Returns once Envoy's admin says LIVE (for sd_notify READY=1)."""
        while True:
            if self._proc is not None and self._proc.returncode is None and await self.admin.live():
                return
            await asyncio.sleep(interval)

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def last_exit_reason(self) -> str | None:
        return self._last_exit_reason

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "state": self._state,
            "pid": self.pid,
            "binary": str(self._binary) if self._binary else None,
            "bootstrap": str(self.settings.bootstrap_path),
            "admin_port": self.settings.admin_port,
            "restarts": self._restarts,
            "last_exit_reason": self._last_exit_reason,
            "last_exit_time": self._last_exit_time,
            "uptime_s": round(now - self._started_at, 3) if self._started_at is not None and self.pid else None,
            "restart_in_s": round(max(0.0, self._restart_at - now), 3) if self._restart_at is not None else None,
        }

    # -- internals -----------------------------------------------------------------------------------

    async def _start(self, bootstrap: Path) -> asyncio.subprocess.Process:
        argv, preexec = spawn_plan(envoy_command(self.settings, bootstrap))
        self._state = "starting"
        self.admin.reset()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=preexec,
            # Its own process group: a terminal's Ctrl-C reaches only the agent, which decides how to drain.
            start_new_session=True,
        )
        self._proc = proc
        self._starts += 1
        self._started_at = self._clock()
        self._backoff.started()
        ENVOY_RUNNING.set(1)
        if self.settings.pid_file is not None:
            self.settings.pid_file.parent.mkdir(parents=True, exist_ok=True)
            self.settings.pid_file.write_text(f"{proc.pid}\n")
        self._state = "running"
        self.first_start.set()
        log.info("started Envoy pid %d (start #%d)", proc.pid, self._starts)
        return proc

    async def _wait_exit_or_stop(self, proc: asyncio.subprocess.Process) -> None:
        exit_task = asyncio.ensure_future(proc.wait())
        stop_task = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({exit_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (exit_task, stop_task):
                task.cancel()
            await asyncio.gather(exit_task, stop_task, return_exceptions=True)

    def _record_exit(self, proc: asyncio.subprocess.Process) -> None:
        rc = proc.returncode if proc.returncode is not None else 0
        reason = exit_reason(rc)
        if rc == -signal.SIGKILL:
            reason += " (possibly out of memory)"
        self._last_exit_reason = reason
        self._last_exit_time = time.time()
        # Readiness is cached after the first success; a dead Envoy must stop looking ready at once.
        self.admin.reset()
        self._started_at = None
        ENVOY_RUNNING.set(0)
        label = signal.Signals(-rc).name if rc < 0 and -rc in signal.valid_signals() else f"exit_{rc}"
        ENVOY_EXITS.labels(reason=label).inc()

    async def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        # SIGKILL is already sent; if we are cancelled again while reaping, the kernel still finishes the job.
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=_KILL_WAIT_S)
        except TimeoutError:
            log.warning("Envoy pid %d did not exit %.0fs after SIGKILL", proc.pid, _KILL_WAIT_S)
        log.info("stopped Envoy pid %d", proc.pid)

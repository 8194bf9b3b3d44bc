"""The checks in their fixed order, run concurrently; a check that needs an earlier one awaits its result."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from vm_agent.config import Config
from vm_agent.doctor import capture, envoy, identity, inputs, network, running, workload
from vm_agent.doctor.context import DEADLINE, Context, DoctorOptions
from vm_agent.doctor.result import CheckResult, fail

Check = Callable[[Context], Awaitable[CheckResult]]

CHECKS: tuple[tuple[str, Check], ...] = (
    (inputs.CONFIG, inputs.check_config),
    (identity.TOKEN, identity.check_token),
    (identity.CERTIFICATE, identity.check_certificate),
    (network.ISTIOD_NAME, network.check_istiod_name),
    (network.CA, network.check_ca),
    (network.DISCOVERY, network.check_discovery),
    (envoy.ENVOY, envoy.check_envoy),
    (capture.CAPTURE_RULES, capture.check_capture_rules),
    (workload.READINESS_PROBE, workload.check_readiness_probe),
    (workload.INSTANCE_IPS, workload.check_instance_ips),
    (running.AGENT, running.check_agent),
    (capture.DNS_CAPTURE, capture.check_dns_capture),
)
CHECK_IDS: tuple[str, ...] = tuple(check_id for check_id, _ in CHECKS)


async def _guarded(ctx: Context, check_id: str, check: Check) -> CheckResult:
    """A broken check is one failed line, never a traceback that hides every other answer."""
    deadline = ctx.options.check_deadline_s
    scope = asyncio.timeout(deadline)
    DEADLINE.set(scope)  # this task's own copy of the context
    try:
        async with scope:
            result = await check(ctx)
        if result.id != check_id:
            raise RuntimeError(f"it answered as {result.id!r}")
    except TimeoutError as exc:
        if not scope.expired():
            return fail(check_id, f"the check itself failed: {exc!r}", "this is a vm-agent bug: please report it")
        return fail(check_id, f"the check did not finish within {deadline:g}s", "run it again; report it if it repeats")
    except Exception as exc:
        return fail(
            check_id,
            f"the check itself failed: {type(exc).__name__}: {exc}",
            "this is a vm-agent bug: please report it",
        )
    return result


async def run_checks(config: Config, options: DoctorOptions | None = None) -> list[CheckResult]:
    """Every check's result, in the documented order (docs/doctor.md)."""
    return await run(config, options or DoctorOptions(), CHECKS)


async def run(config: Config, options: DoctorOptions, checks: Sequence[tuple[str, Check]]) -> list[CheckResult]:
    ctx = Context(config, options, tuple(check_id for check_id, _ in checks))
    tasks: list[asyncio.Task[CheckResult]] = []
    async with asyncio.TaskGroup() as group:
        for check_id, check in checks:
            task = group.create_task(_guarded(ctx, check_id, check), name=f"doctor-{check_id}")
            ctx.register(check_id, task)
            tasks.append(task)
    return [task.result() for task in tasks]

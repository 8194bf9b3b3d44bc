"""Check 11: the running agent, seen through its status server (/healthz/ready and the ``vm-agent status`` snapshot).

Doctor is most needed when the agent is not running, so "not running" is a warning with a hint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import aiohttp

from vm_agent.doctor.context import Context
from vm_agent.doctor.result import CheckResult, fail, ok, warn

AGENT = "agent"


class Unreachable(Exception):
    """Nothing answered at the status URL (message says what happened)."""


async def get(ctx: Context, path: str) -> tuple[int, bytes]:
    """(status, body) of a GET to the agent's status server; ``Unreachable`` when nothing answers in time."""
    timeout = aiohttp.ClientTimeout(total=ctx.options.timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(ctx.status_url + path, allow_redirects=False) as resp,
        ):
            return resp.status, await resp.read()
    except TimeoutError as exc:
        raise Unreachable(f"no answer within {ctx.options.timeout_s:g}s") from exc
    except aiohttp.ClientConnectorError as exc:
        # aiohttp's text is asyncio's "Connect call failed (...)"; the errno names the cause.
        errno = exc.os_error.errno
        raise Unreachable(os.strerror(errno).lower() if errno else str(exc.os_error)) from exc
    except aiohttp.ClientError as exc:
        raise Unreachable(str(exc) or type(exc).__name__) from exc


async def get_json(ctx: Context, path: str) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None when the answer is not one (403 off loopback, another server...)."""
    status, body = await get(ctx, path)
    return _object(body) if status == 200 else None


def _object(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _what(doc: dict[str, Any]) -> str:
    ident = doc.get("identity") or {}
    envoy = doc.get("envoy") or {}
    upstream = (doc.get("xds") or {}).get("upstream") or {}
    parts = []
    if ident.get("spiffe_id"):
        parts.append(f"{ident['spiffe_id']} until {ident.get('not_after')}")
    else:
        parts.append("no certificate yet")
    parts.append(f"Envoy {envoy.get('state')}")
    parts.append(f"istiod {upstream.get('state')}")
    health = doc.get("health")
    if isinstance(health, dict) and health.get("state"):
        parts.append(f"health {health['state']}")
    return ", ".join(parts)


async def check_agent(ctx: Context) -> CheckResult:
    url = ctx.status_url
    details: dict[str, Any] = {"url": url, "running": False, "ready": None, "reason": None}
    try:
        status, body = await get(ctx, "/healthz/ready")
    except Unreachable as exc:
        return warn(
            AGENT,
            f"not running: nothing answers at {url} ({exc})",
            "start it with `systemctl start vm-agent` and read `journalctl -u vm-agent`; the lines above "
            "say what would stop it",
            **details,
        )
    try:
        debug_status, debug_body = await get(ctx, "/debug/status")
    except Unreachable:
        debug_status, debug_body = 0, b""
    doc = _object(debug_body) if debug_status == 200 else None
    # vm-agent answers /debug/status with its snapshot, or 403 to a client that is not on loopback.
    looks_like_us = (doc is not None and "identity" in doc) or debug_status == 403
    if status not in (200, 503) or not looks_like_us:
        return fail(
            AGENT,
            f"something answers at {url} (HTTP {status} on /healthz/ready), but it is not vm-agent",
            "another proxy (pilot-agent?) may own the status port: stop it, or give vm-agent another statusPort",
            **details,
        )
    details["running"] = True
    details["ready"] = status == 200
    what = _what(doc) if doc is not None else "no /debug/status (the status server is not on loopback)"
    if status == 200:
        return ok(AGENT, f"running and ready at {url}: {what}", **details)
    reason = body.decode("utf-8", "replace").strip() or "(no reason given)"
    details["reason"] = reason
    return fail(
        AGENT,
        f"running but not ready: {reason} ({what})",
        "`vm-agent status` shows identity, Envoy, xDS and health in detail; `journalctl -u vm-agent` has the log",
        **details,
    )

"""Checks 4 and 5: istiod's name through the hosts file, then TCP and TLS to the CA and discovery addresses.

The TLS handshake verifies exactly what the agent will verify: the server certificate against
root-cert.pem under the upstream's server name (the host of the address, or ISTIOD_SAN for discovery).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
from typing import Any

from vm_agent.config import Upstream
from vm_agent.config.formats import is_ip
from vm_agent.doctor.context import Context
from vm_agent.doctor.result import CheckResult, fail, ok, skip, warn

ISTIOD_NAME = "istiod-name"
CA = "ca"
DISCOVERY = "discovery"

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH / X509_V_ERR_IP_ADDRESS_MISMATCH: the signer is fine, the name is not.
_NAME_MISMATCH = {62, 64}


async def resolve(name: str) -> list[str]:
    """The system resolver's addresses for ``name``; OSError when it has none.

    getaddrinfo cannot be cancelled; it runs in a daemon thread so that a caller's timeout really ends the
    wait, and a resolver that hangs cannot keep the process alive at exit.
    """
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[list[str]] = loop.create_future()

    def deliver(result: list[str] | None, error: OSError | None) -> None:
        if answer.done():
            return
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(result or [])

    def work() -> None:
        try:
            infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
            result: list[str] | None = list(dict.fromkeys(str(info[4][0]) for info in infos))
            error: OSError | None = None
        except OSError as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed while we waited
            loop.call_soon_threadsafe(deliver, result, error)

    threading.Thread(target=work, name=f"doctor-resolve-{name}", daemon=True).start()
    return await answer


def _upstreams(ctx: Context) -> list[Upstream]:
    config = ctx.config
    return [config.ca, config.discovery] if config.ca.host != config.discovery.host else [config.ca]


async def check_istiod_name(ctx: Context) -> CheckResult:
    config = ctx.config
    hosts_file = str(config.paths.hosts)
    names: dict[str, dict[str, Any]] = {}
    for up in _upstreams(ctx):
        host = up.host.lower()
        if is_ip(host):
            names[host] = {"addresses": [host], "source": "address"}
        elif host in config.hosts:
            names[host] = {"addresses": list(config.hosts[host]), "source": "hosts file"}
        else:
            try:
                async with asyncio.timeout(ctx.options.timeout_s):
                    found = await resolve(host)
                names[host] = {"addresses": found, "source": "system resolver"}
            except TimeoutError:
                names[host] = {"addresses": [], "source": None, "error": f"no answer in {ctx.options.timeout_s:g}s"}
            except OSError as exc:
                names[host] = {"addresses": [], "source": None, "error": exc.strerror or str(exc)}
    details = {"hosts_file": hosts_file, "names": names}
    unresolved = [n for n, e in names.items() if not e["addresses"]]
    if unresolved:
        name = unresolved[0]
        return fail(
            ISTIOD_NAME,
            f"{name} is not in {hosts_file} and does not resolve ({names[name]['error']})",
            f"add istioctl's hosts line (`<east-west gateway or istiod IP> {name}`) to {hosts_file}",
            **details,
        )
    shown = "; ".join(f"{n} → {', '.join(e['addresses'])}" for n, e in names.items())
    if all(e["source"] == "address" for e in names.values()):
        return ok(ISTIOD_NAME, f"istiod is addressed by IP ({shown}); nothing to resolve", **details)
    elsewhere = [n for n, e in names.items() if e["source"] == "system resolver"]
    if elsewhere:
        return warn(
            ISTIOD_NAME,
            f"{shown}: {', '.join(elsewhere)} is not in {hosts_file}; the system resolver answered",
            f"istioctl's hosts file maps istiod's name to the address the VM must use; add that line to {hosts_file}",
            **details,
        )
    return ok(ISTIOD_NAME, f"{shown} (from {hosts_file})", **details)


async def check_ca(ctx: Context) -> CheckResult:
    return await _reachable(ctx, CA, ctx.config.ca, "CA_ADDR in cluster.env")


async def check_discovery(ctx: Context) -> CheckResult:
    return await _reachable(ctx, DISCOVERY, ctx.config.discovery, "discoveryAddress in the mesh config or PROXY_CONFIG")


def _os_error(exc: OSError) -> str:
    # asyncio's connect replaces strerror with "Connect call failed (...)"; the errno still names the cause.
    text = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
    return text[:1].lower() + text[1:]


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        writer.close()


async def _reachable(ctx: Context, check_id: str, up: Upstream, setting: str) -> CheckResult:
    timeout = ctx.options.timeout_s
    names = (await ctx.result(ISTIOD_NAME, for_check=check_id)).details.get("names", {})
    addresses = (names.get(up.host.lower()) or {}).get("addresses") or []
    if not addresses:
        return skip(check_id, f"{up.host} does not resolve (see {ISTIOD_NAME})", address=up.address)
    ip = addresses[0]
    target = f"[{ip}]:{up.port}" if ":" in ip else f"{ip}:{up.port}"
    where = up.address if up.address == target else f"{up.address} ({target})"
    details: dict[str, Any] = {"address": up.address, "dialed": target, "server_name": up.server_name, "tcp": False}
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(ip, up.port)
    except TimeoutError:
        why = f"no answer within {timeout:g}s"
    except OSError as exc:
        why = _os_error(exc)
    else:
        why = ""
    if why:
        return fail(
            check_id,
            f"TCP to {where} failed: {why}",
            f"check that istiod (or the east-west gateway in front of it) listens on port {up.port} and that "
            f"firewalls and security groups let this VM reach {target}; {setting} sets this address",
            **details,
        )
    details["tcp"] = True
    try:
        return await _tls(ctx, check_id, up, writer, where, details)
    finally:
        _close(writer)


async def _tls(
    ctx: Context, check_id: str, up: Upstream, writer: asyncio.StreamWriter, where: str, details: dict[str, Any]
) -> CheckResult:
    timeout = ctx.options.timeout_s
    if up.plaintext:
        details["tls"] = None
        return ok(check_id, f"{where}: TCP ok (port {up.port} is plaintext: no TLS)", **details)
    root = up.root_cert
    try:
        tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.set_alpn_protocols(["h2"])
        tls.load_verify_locations(cadata=root.read_text(encoding="ascii", errors="replace"))
    except (OSError, ssl.SSLError, ValueError) as exc:
        details["tls"] = None
        why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        summary = f"{where}: TCP ok; TLS not checked: cannot use {root} ({why})"
        return warn(check_id, summary, "see the config line", **details)
    name = up.server_name
    try:
        async with asyncio.timeout(timeout):
            await writer.start_tls(tls, server_hostname=name)
    except ssl.SSLCertVerificationError as exc:
        details["tls"] = False
        if exc.verify_code in _NAME_MISMATCH:
            return fail(
                check_id,
                f"{where}: TCP ok; TLS: istiod's certificate is not valid for {name!r}, the name the agent verifies "
                f"({exc.verify_message})",
                "the agent verifies the host of the address (ISTIOD_SAN overrides it for discovery): use istiod's "
                "name (istiod.istio-system.svc) there and map it to the gateway's address in the hosts file",
                **details,
            )
        return fail(
            check_id,
            f"{where}: TCP ok; TLS: istiod's certificate is not signed by {root} ({exc.verify_message})",
            f"{root} does not belong to the mesh at this address: install the root-cert.pem istioctl wrote for it",
            **details,
        )
    except ssl.SSLError as exc:
        details["tls"] = False
        return fail(
            check_id,
            f"{where}: TCP ok; TLS handshake failed: {exc.reason or exc}",
            f"is {_port_of(up)} istiod's TLS port? a proxy or load balancer in between must pass TLS through",
            **details,
        )
    except TimeoutError:
        details["tls"] = False
        return fail(
            check_id,
            f"{where}: TCP ok; TLS: no handshake within {timeout:g}s",
            f"is {_port_of(up)} istiod's TLS port (15012)?",
            **details,
        )
    except OSError as exc:
        details["tls"] = False
        return fail(
            check_id,
            f"{where}: TCP ok; TLS: the connection broke during the handshake ({_os_error(exc)})",
            f"is {_port_of(up)} istiod's TLS port (15012)?",
            **details,
        )
    details["tls"] = True
    return ok(check_id, f"{where}: TCP ok, TLS ok (verified {name!r} against {root.name})", **details)


def _port_of(up: Upstream) -> str:
    return f"port {up.port} of {up.host}"

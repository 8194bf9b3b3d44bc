"""One readiness probe against the application: HTTP GET, TCP connect, exec, or gRPC health Check (§9.3).

Every prober returns ``(healthy, message)``; the message is what istiod writes into the WorkloadEntry's
Healthy condition, so failure texts follow the shapes Istio's agent produces (Go error strings) where
an operator may already know them.

Where vm-agent deliberately differs from Istio's agent:

* HTTPS probes do not verify the application's certificate (the kubelet's behaviour and Istio's intent).
* With traffic capture on, TCP and gRPC probes leave from the bypass source address too, not only HTTP,
  so they reach the application and not Envoy's inbound capture port.
* The bypass source address is bound only when the target is an address of this host in the same address
  family; an off-box ``host`` or an IPv6 target with 127.0.0.6 would otherwise fail every time (§18 P19).
* A gRPC reply other than SERVING is reported as unhealthy with a message instead of crashing (§18 P4).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import signal
import socket
import ssl
from urllib.parse import quote, urljoin, urlsplit

from vm_agent.config.probe import ExecAction, GrpcAction, HttpGetAction, ProbeAction, TcpSocketAction
from vm_agent.http11 import ConnectError, HttpError, authority, fetch
from vm_agent.interfaces import interface_addresses
from vm_agent.logs import get_logger

log = get_logger("health")

USER_AGENT = "istio-probe/1.0"
MAX_REDIRECTS = 10  # Go's http.Client default policy, which Istio's HTTP prober uses
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})(.{0,2})", re.S)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


async def probe_once(
    action: ProbeAction,
    *,
    default_host: str,
    timeout: float,  # noqa: ASYNC109 - timeoutSeconds is part of the probe's contract and of its messages
    source_address: str | None,
) -> tuple[bool, str]:
    """Run one probe of ``action`` within ``timeout`` seconds; ``(True, "")`` or ``(False, why)``.

    ``default_host`` is the target when the action names none (always for gRPC, as in Istio).
    ``source_address`` (e.g. 127.0.0.6) is bound for HTTP, TCP and gRPC when it applies to the target.
    Never raises for application-side failures; only cancellation propagates.
    """
    if isinstance(action, HttpGetAction):
        return await _probe_http(action, default_host, timeout, source_address)
    if isinstance(action, TcpSocketAction):
        return await _probe_tcp(action.host or default_host, action.port, timeout, source_address)
    if isinstance(action, ExecAction):
        return await _probe_exec(action.command, timeout)
    if isinstance(action, GrpcAction):
        # grpclib and the health protos load only for a workload that has a gRPC probe.
        from vm_agent.health.grpc_probe import probe_grpc

        return await probe_grpc(action, default_host, timeout, source_address)
    raise TypeError(
        f"readiness probe action: expected HttpGetAction, TcpSocketAction, ExecAction or GrpcAction, got {action!r}"
    )


# --- where a probe leaves from -----------------------------------------------------------------------------


join_host_port = authority


_warned_sources: set[str] = set()


def _local_addresses() -> set[str]:
    return {address for _, address in interface_addresses(up_only=False)}


def _is_local(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return ip.is_loopback or str(ip) in _local_addresses()


async def source_for(host: str, source_address: str | None) -> tuple[str | None, socket.AddressFamily]:
    """The source address to bind for a probe of ``host``, and the address family to dial it in.

    ``(None, AF_UNSPEC)`` (no binding, any family) when no source is configured, or when ``host`` has no address
    of this machine in the source's family: binding a loopback source for such a target cannot work.
    """
    if not source_address:
        return None, socket.AF_UNSPEC
    if not _is_local(source_address):
        # ::6 exists only where capture set-up added it to lo; binding it elsewhere fails every probe.
        if source_address not in _warned_sources:
            _warned_sources.add(source_address)
            log.warning("probe source address %s is not configured on this host; probing without it", source_address)
        return None, socket.AF_UNSPEC
    family = socket.AF_INET6 if ":" in source_address else socket.AF_INET
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, family=family, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None, socket.AF_UNSPEC
    addresses = {str(info[4][0]) for info in infos}
    if addresses and all(_is_local(a) for a in addresses):
        return source_address, family
    log.debug("probe target %s is not a local %s address; not binding %s", host, family.name, source_address)
    return None, socket.AF_UNSPEC


def _os_error_text(exc: BaseException) -> str:
    # asyncio replaces strerror with "Connect call failed (...)"; the errno still names the cause.
    if isinstance(exc, OSError) and not isinstance(exc, socket.gaierror) and exc.errno:
        text = os.strerror(exc.errno)
        return text[:1].lower() + text[1:]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def dial_error(host_port: str, exc: BaseException) -> str:
    """A dial failure in Go's words (``dial tcp 127.0.0.1:8080: connect: connection refused``)."""
    if isinstance(exc, TimeoutError):
        return f"dial tcp {host_port}: i/o timeout"
    if isinstance(exc, socket.gaierror):
        return f"dial tcp: lookup {host_port.rsplit(':', 1)[0].strip('[]')}: {_os_error_text(exc)}"
    return f"dial tcp {host_port}: connect: {_os_error_text(exc)}"


async def _open(host: str, port: int, source_address: str | None) -> asyncio.StreamWriter:
    source, family = await source_for(host, source_address)
    _, writer = await asyncio.open_connection(host, port, family=family, local_addr=(source, 0) if source else None)
    return writer


def _close_now(writer: asyncio.StreamWriter) -> None:
    # Linger 0 s would send RST; a plain close is the app-friendly FIN the kubelet sends too.
    writer.close()


# --- TCP ---------------------------------------------------------------------------------------------------


async def _probe_tcp(host: str, port: int, limit: float, source_address: str | None) -> tuple[bool, str]:
    host_port = join_host_port(host, port)
    try:
        async with asyncio.timeout(limit):
            writer = await _open(host, port, source_address)
    except (OSError, TimeoutError) as exc:
        return False, dial_error(host_port, exc)
    _close_now(writer)
    return True, ""


# --- HTTP --------------------------------------------------------------------------------------------------


def _path_error(path: str) -> str | None:
    """Why Go's url.Parse would reject ``path`` (Istio then fails the probe every round), or None."""
    if _CONTROL.search(path):
        return f"parse {path!r}: net/url: invalid control character in URL"
    bad = _BAD_ESCAPE.search(path)
    if bad:
        return f'parse "{path}": invalid URL escape "{bad.group(0)}"'
    return None


def _headers(action: HttpGetAction) -> tuple[list[tuple[str, str]], str | None]:
    """Request headers (repeated names kept as several values) and the Host override (first one wins)."""
    headers: list[tuple[str, str]] = []
    host: str | None = None
    for name, value in action.headers:
        if name.lower() == "host":
            if host is None:
                host = value
            continue
        headers.append((name, value))
    if not any(name.lower() == "user-agent" for name, _ in headers):
        headers.append(("User-Agent", USER_AGENT))
    return headers, host


async def _probe_http(
    action: HttpGetAction, default_host: str, limit: float, source_address: str | None
) -> tuple[bool, str]:
    bad_path = _path_error(action.path)
    if bad_path is not None:
        return False, bad_path
    target = join_host_port(action.host or default_host, action.port)
    url = f"{action.scheme}://{target}{action.path or '/'}"
    headers, host_header = _headers(action)
    try:
        async with asyncio.timeout(limit):
            status = await _get_following_redirects(url, headers, host_header, source_address)
    except TimeoutError:
        return False, f'Get "{url}": context deadline exceeded (Client.Timeout exceeded while awaiting headers)'
    except _HttpProbeError as exc:
        return False, str(exc)
    if 200 <= status < 400:
        return True, ""
    return False, f"status code was not from [200,400), bad code {status}"


class _HttpProbeError(Exception):
    pass


async def _get_following_redirects(
    url: str, headers: list[tuple[str, str]], host_header: str | None, source_address: str | None
) -> int:
    redirects = 0
    while True:
        status, location = await _get(url, headers, host_header, source_address)
        if status not in _REDIRECT_CODES or location is None:
            return status
        try:
            next_url = urljoin(url, location)
            absolute = bool(urlsplit(location).netloc)
        except ValueError as exc:
            raise _HttpProbeError(f'Get "{url}": failed to parse Location header {location!r}: {exc}') from exc
        if redirects >= MAX_REDIRECTS:
            raise _HttpProbeError(f'Get "{next_url}": stopped after {MAX_REDIRECTS} redirects')
        redirects += 1
        # Like Go: a custom Host survives a relative redirect only; an absolute one names its own host.
        if absolute:
            host_header = None
        url = next_url


_UNVERIFIED_TLS: ssl.SSLContext | None = None


def _unverified_tls() -> ssl.SSLContext:
    """HTTPS probes do not verify the application's certificate (the kubelet's behaviour)."""
    global _UNVERIFIED_TLS
    if _UNVERIFIED_TLS is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _UNVERIFIED_TLS = ctx
    return _UNVERIFIED_TLS


def _request_target(path: str, query: str) -> str:
    # Go sends the URL's escaped form; characters that are already legal (and %-escapes) pass unchanged.
    target = quote(path or "/", safe="/%:@!$&'()*+,;=~")
    return target + ("?" + quote(query, safe="/%:@!$&'()*+,;=~?") if query else "")


async def _get(
    url: str, headers: list[tuple[str, str]], host_header: str | None, source_address: str | None
) -> tuple[int, str | None]:
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise _HttpProbeError(f'Get "{url}": {exc}') from exc
    if parts.scheme not in ("http", "https"):
        raise _HttpProbeError(f'Get "{url}": unsupported protocol scheme "{parts.scheme}"')
    source, family = await source_for(host, source_address)
    request_headers = [*([("Host", host_header)] if host_header is not None else []), *headers]
    try:
        reply = await fetch(
            "GET",
            host,
            port,
            _request_target(parts.path, parts.query),
            headers=request_headers,
            tls=_unverified_tls() if parts.scheme == "https" else None,
            local_addr=(source, 0) if source else None,
            family=family,
            read_body_too=False,
        )
    except ConnectError as exc:
        raise _HttpProbeError(f'Get "{url}": {dial_error(join_host_port(host, port), exc.os_error)}') from exc
    except asyncio.IncompleteReadError as exc:
        raise _HttpProbeError(f'Get "{url}": EOF') from exc
    except HttpError as exc:
        raise _HttpProbeError(f'Get "{url}": {exc}') from exc
    except ssl.SSLError as exc:
        raise _HttpProbeError(f'Get "{url}": {exc.reason or exc}') from exc
    except OSError as exc:
        raise _HttpProbeError(f'Get "{url}": {_os_error_text(exc)}') from exc
    return reply.status, reply.headers.get("Location")


# --- exec --------------------------------------------------------------------------------------------------


def _exit_text(returncode: int) -> str:
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        name = signal.strsignal(-returncode) or f"signal {-returncode}"
    except ValueError:
        name = f"signal {-returncode}"
    return f"signal: {name[:1].lower() + name[1:]}"


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def _probe_exec(command: tuple[str, ...], limit: float) -> tuple[bool, str]:
    if not command:
        return False, "exec probe: expected a non-empty command"
    program = command[0]
    try:
        # Its own session (and so process group): a timeout kills the command and everything it started.
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    except FileNotFoundError:
        if "/" in program:
            return False, f"fork/exec {program}: no such file or directory"
        return False, f'exec: "{program}": executable file not found in $PATH'
    except OSError as exc:
        return False, f"fork/exec {program}: {_os_error_text(exc)}"
    try:
        async with asyncio.timeout(limit):
            returncode = await proc.wait()
    except TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        return False, "command timeout exceeded: signal: killed"
    except asyncio.CancelledError:
        _kill_group(proc.pid)
        await asyncio.shield(proc.wait())
        raise
    if returncode == 0:
        return True, ""
    return False, _exit_text(returncode)

"""The WorkloadGroup readiness probe (istio/api networking/v1alpha3 ReadinessProbe) as the agent runs it.

Defaults are the ones Istio's agent really applies (§9.1): failureThreshold 1 although the API comment says 3.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HttpGetAction:
    port: int
    path: str = "/"
    host: str = ""  # empty: the agent's default host (first instance IP)
    scheme: str = "http"  # lower-cased, "http" or "https"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TcpSocketAction:
    port: int
    host: str = ""


@dataclass(frozen=True)
class ExecAction:
    command: tuple[str, ...]


@dataclass(frozen=True)
class GrpcAction:
    port: int
    service: str = ""


ProbeAction = HttpGetAction | TcpSocketAction | ExecAction | GrpcAction


@dataclass(frozen=True)
class ReadinessProbe:
    action: ProbeAction
    initial_delay_seconds: int = 0
    timeout_seconds: int = 1
    period_seconds: int = 10
    success_threshold: int = 1
    failure_threshold: int = 1

    def to_json(self) -> dict[str, Any]:
        """ProxyConfig JSON form (camelCase), as sent in node metadata PROXY_CONFIG.readinessProbe."""
        doc: dict[str, Any] = {}
        for key, value, default in (
            ("initialDelaySeconds", self.initial_delay_seconds, 0),
            ("timeoutSeconds", self.timeout_seconds, 1),
            ("periodSeconds", self.period_seconds, 10),
            ("successThreshold", self.success_threshold, 1),
            ("failureThreshold", self.failure_threshold, 1),
        ):
            if value != default:
                doc[key] = value
        a = self.action
        if isinstance(a, HttpGetAction):
            http: dict[str, Any] = {"port": a.port}
            if a.path != "/":
                http["path"] = a.path
            if a.host:
                http["host"] = a.host
            if a.scheme != "http":
                http["scheme"] = a.scheme.upper()
            if a.headers:
                http["httpHeaders"] = [{"name": n, "value": v} for n, v in a.headers]
            doc["httpGet"] = http
        elif isinstance(a, TcpSocketAction):
            doc["tcpSocket"] = {"port": a.port, **({"host": a.host} if a.host else {})}
        elif isinstance(a, ExecAction):
            doc["exec"] = {"command": list(a.command)}
        else:
            doc["grpc"] = {"port": a.port, **({"service": a.service} if a.service else {})}
        return doc


_METHODS = ("httpGet", "tcpSocket", "exec", "grpc")
_HEADER_NAME = re.compile(r"^[-_A-Za-z0-9]+$")
_TIMINGS = {
    "initialDelaySeconds": ("initial_delay_seconds", 0, 0),
    "timeoutSeconds": ("timeout_seconds", 1, 1),
    "periodSeconds": ("period_seconds", 10, 1),
    "successThreshold": ("success_threshold", 1, 1),
    "failureThreshold": ("failure_threshold", 1, 1),
}

Report = Callable[[str, str], None]  # (key path, message)


def _int(value: Any, key: str, report: Report, *, minimum: int, maximum: int = 2**31 - 1) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        else:
            report(key, f"expected an integer {minimum}-{maximum}, got {value!r}")
            return None
    if not minimum <= value <= maximum:
        report(key, f"expected {minimum}-{maximum}, got {value}")
        return None
    return int(value)


def _str(value: Any, key: str, report: Report) -> str | None:
    if value is None:
        return ""
    if not isinstance(value, str):
        report(key, f"expected a string, got {value!r}")
        return None
    return value


def parse_probe(doc: Any, prefix: str, report: Report) -> ReadinessProbe | None:
    """Build a probe from its ProxyConfig/WorkloadGroup JSON form; every problem goes to ``report``.

    Accepts both camelCase (ProxyConfig JSON) and snake_case (proto field) names, like protojson does.
    Returns None when the probe is unusable.
    """
    if not isinstance(doc, Mapping):
        report(prefix, f"expected a mapping, got {type(doc).__name__}")
        return None
    doc = {_camel(k): v for k, v in doc.items()}
    known = set(_TIMINGS) | set(_METHODS)
    for k in doc:
        if k not in known:
            report(f"{prefix}.{k}", f"unknown field; expected one of {', '.join(sorted(known))}")
    methods = [m for m in _METHODS if doc.get(m) is not None]
    if not methods:
        report(prefix, "expected exactly one probe method (httpGet, tcpSocket, exec or grpc), found none")
        return None
    if len(methods) > 1:
        report(prefix, f"expected exactly one probe method, found {', '.join(methods)}")
        return None
    timings: dict[str, int] = {}
    ok = True
    for key, (attr, default, minimum) in _TIMINGS.items():
        raw = doc.get(key)
        if raw is None or raw == 0:
            timings[attr] = default  # 0 means "unset" in proto3: the agent applies its default
            continue
        value = _int(raw, f"{prefix}.{key}", report, minimum=minimum)
        if value is None:
            ok = False
        else:
            timings[attr] = value
    method = methods[0]
    action = _parse_action(method, doc[method], f"{prefix}.{method}", report)
    if action is None or not ok:
        return None
    return ReadinessProbe(action=action, **timings)


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _port(body: Mapping[str, Any], prefix: str, report: Report) -> int | None:
    if "port" not in body or body["port"] is None:
        report(f"{prefix}.port", "expected 1-65535, got nothing")
        return None
    return _int(body["port"], f"{prefix}.port", report, minimum=1, maximum=65535)


def _parse_action(method: str, body: Any, prefix: str, report: Report) -> ProbeAction | None:
    if not isinstance(body, Mapping):
        report(prefix, f"expected a mapping, got {body!r}")
        return None
    body = {_camel(k): v for k, v in body.items()}
    if method == "exec":
        command = body.get("command")
        if not isinstance(command, list) or not command or not all(isinstance(c, str) and c for c in command):
            report(f"{prefix}.command", f"expected a non-empty list of non-empty strings, got {command!r}")
            return None
        return ExecAction(command=tuple(command))
    port = _port(body, prefix, report)
    if method == "grpc":
        service = _str(body.get("service"), f"{prefix}.service", report)
        if port is None or service is None:
            return None
        return GrpcAction(port=port, service=service)
    host = _str(body.get("host"), f"{prefix}.host", report)
    if method == "tcpSocket":
        if port is None or host is None:
            return None
        return TcpSocketAction(port=port, host=host)
    ok = port is not None and host is not None
    path = _str(body.get("path"), f"{prefix}.path", report)
    if path is None:
        ok = False
    elif path and not path.startswith("/"):
        path = "/" + path
    scheme_raw = _str(body.get("scheme"), f"{prefix}.scheme", report)
    scheme = (scheme_raw or "http").lower()
    if scheme not in ("http", "https"):
        report(f"{prefix}.scheme", f"expected HTTP or HTTPS, got {scheme_raw!r}")
        ok = False
    headers: list[tuple[str, str]] = []
    raw_headers = body.get("httpHeaders") or []
    if not isinstance(raw_headers, list):
        report(f"{prefix}.httpHeaders", f"expected a list of {{name, value}}, got {raw_headers!r}")
        ok = False
        raw_headers = []
    for i, h in enumerate(raw_headers):
        key = f"{prefix}.httpHeaders[{i}]"
        if not isinstance(h, Mapping):
            report(key, f"expected {{name, value}}, got {h!r}")
            ok = False
            continue
        name, value = h.get("name"), h.get("value", "")
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            report(f"{key}.name", f"expected a header name matching [-_A-Za-z0-9]+, got {name!r}")
            ok = False
            continue
        if not isinstance(value, str):
            report(f"{key}.value", f"expected a string, got {value!r}")
            ok = False
            continue
        headers.append((name, value))
    if not ok or port is None or host is None or path is None:
        return None
    return HttpGetAction(port=port, path=path or "/", host=host, scheme=scheme, headers=tuple(headers))

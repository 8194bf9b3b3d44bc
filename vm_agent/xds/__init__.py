"""The ADS proxy between Envoy and istiod, with NDS and health injection (istio-agent.md §5)."""

from vm_agent.xds.proxy import NameTableHandler, Proxy, XdsSettings

__all__ = ["NameTableHandler", "Proxy", "XdsSettings"]

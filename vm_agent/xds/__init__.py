"""The ADS proxy between Envoy and istiod, with NDS and health injection (istio-agent.md §5)."""

from vm_agent.xds.downstream import Downstream
from vm_agent.xds.health_report import ReportPolicy
from vm_agent.xds.pacing import PacingSettings
from vm_agent.xds.proxy import NameTableHandler, Proxy, XdsSettings

__all__ = ["Downstream", "NameTableHandler", "PacingSettings", "Proxy", "ReportPolicy", "XdsSettings"]

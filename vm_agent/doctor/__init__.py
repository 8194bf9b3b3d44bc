"""`vm-agent doctor`: why this VM does not join the mesh, one check per line with a fix hint.

``run_checks(config)`` runs every check (docs/doctor.md lists them) and returns their results in a fixed
order; ``to_text``/``to_json`` render them. It works whether or not the agent is running, and never
prints the token, a key or a whole PEM.
"""

from __future__ import annotations

import asyncio
import json

from vm_agent.config import Config
from vm_agent.doctor.context import DoctorOptions
from vm_agent.doctor.render import SCHEMA_VERSION, to_json, to_text
from vm_agent.doctor.result import CheckResult, Status
from vm_agent.doctor.runner import CHECK_IDS, run_checks

__all__ = [
    "CHECK_IDS",
    "SCHEMA_VERSION",
    "CheckResult",
    "DoctorOptions",
    "Status",
    "doctor_command",
    "run_checks",
    "to_json",
    "to_text",
]


def doctor_command(config: Config, as_json: bool, options: DoctorOptions | None = None) -> int:
    """Print the results; exit status 1 if any check failed, else 0."""
    results = asyncio.run(run_checks(config, options))
    print(json.dumps(to_json(results), indent=2) if as_json else to_text(results))
    return 1 if any(r.failed for r in results) else 0

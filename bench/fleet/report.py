"""bench/results/fleet.md from the JSON each fleet run leaves in bench/results/fleet/."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(folder: Path, out: Path) -> None:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    out.write_text("# Fleet\n\n```\n" + json.dumps(runs, indent=1) + "\n```\n")

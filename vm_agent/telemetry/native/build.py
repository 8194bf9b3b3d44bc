"""Compile the native stats filter next to its source: ``python -m vm_agent.telemetry.native.build``.

Called by ``make`` (setup), by the wheel build (setup.py) and so by the packages. Without a C compiler nothing is
built and the agent uses the stock-filter path (``--require`` makes that an error, for CI and packaging).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
LIBRARY = "libvm_agent_istio_stats.so.1"  # the package's LIBRARY: setup.py runs this file without the package
SOURCES = (HERE / "istio_stats.c", HERE / "envoy_abi.h")
FLAGS = ("-O2", "-std=c11", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", "-fvisibility=hidden", "-pthread")


def build(*, require: bool = False) -> Path | None:
    """The module's path, compiled when missing or older than its sources; None when no compiler is found."""
    out = HERE / LIBRARY
    if out.is_file() and out.stat().st_mtime >= max(s.stat().st_mtime for s in SOURCES):
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        if require:
            raise SystemExit("vm_agent/telemetry/native: no C compiler (cc or gcc) to build the stats filter")
        print("vm_agent/telemetry/native: no C compiler; the agent will use stock Envoy filters", file=sys.stderr)
        return None
    tmp = out.with_name(out.name + ".tmp")
    subprocess.run([cc, *FLAGS, "-D_POSIX_C_SOURCE=200809L", "-o", str(tmp), str(SOURCES[0])], check=True)
    tmp.replace(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--require", action="store_true", help="fail when no C compiler is found")
    path = build(require=p.parse_args().require)
    if path is not None:
        print(path)


if __name__ == "__main__":
    main()

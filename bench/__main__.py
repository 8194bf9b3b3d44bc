"""Run every benchmark module under bench/ that defines ``main()``; each writes its table to bench/results/."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main() -> int:
    here = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    only = set(sys.argv[1:])
    status = 0
    for name in names:
        if only and name not in only:
            continue
        module = importlib.import_module(f"bench.{name}")
        print(f"== {name}", flush=True)
        rc = module.main()
        status = status or int(rc or 0)
    return status


if __name__ == "__main__":
    raise SystemExit(main())

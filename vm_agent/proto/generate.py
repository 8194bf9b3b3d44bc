"""Generate (or check) the Python modules for the Istio .proto files with grpcio-tools.

``python -m vm_agent.proto.generate`` writes ``*_pb2.py``/``*_pb2.pyi``/``*_pb2_grpc.py`` beside
the .proto files; ``--check`` regenerates into a temporary folder and fails when the modules in
the tree differ (stale generated code must never ship).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent.parent


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every .proto file; return the generated files (relative to out_root)."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).resolve().parent / "_proto")
    rel = [str(p.relative_to(REPO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *rel,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {', '.join(rel)}")
    return sorted(p.relative_to(out_root) for p in (out_root / "vm_agent" / "proto").glob("*_pb2*.py*"))


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        stale = [
            str(rel)
            for rel in generated
            if not (REPO_ROOT / rel).exists() or not filecmp.cmp(Path(tmp) / rel, REPO_ROOT / rel, shallow=False)
        ]
    if stale:
        print("generated code disagrees with the .proto files: " + ", ".join(stale), file=sys.stderr)
        print("run `make proto` (or reinstall the package) to regenerate", file=sys.stderr)
        return 1
    print(f"generated code matches {len(proto_files())} .proto files")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the generated modules are stale")
    ns = parser.parse_args()
    if ns.check:
        return check()
    for rel in generate(REPO_ROOT):
        print(rel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Stage /usr/lib/vm-agent for the deb and rpm: one private module tree per CPython ABI, shared files once.

Run by packaging/build.sh; usable alone::

    python packaging/stage.py --wheel dist/vm_agent-X-py3-none-any.whl --dest STAGING/usr/lib/vm-agent

For every supported interpreter version it downloads the binary wheels of the project's dependencies
(``project.dependencies`` in pyproject.toml, so a dependency added there is packaged without touching
this file) with ``pip download --only-binary=:all: --python-version X --abi cp3X --platform manylinux...``.
A wheel file chosen for every version (pure Python, ``abi3``, or ABI-independent like Envoy's) is
installed once into ``site-packages/``; the rest (``cp3X-cp3X`` builds) go into ``cp3X/``. The launcher
puts ``cp3X/`` then ``site-packages/`` on ``sys.path`` for the interpreter it picked.

Prints on stdout the versions it staged (``3.11 3.12 ...``, oldest first) and, on a second line, the
glibc the wheels need (``2.34``): build.sh turns them into the packages' dependencies.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Versions a package must carry, and those added only when every dependency has a wheel for them.
REQUIRED = ("3.11", "3.12", "3.13")
OPTIONAL = ("3.14",)
# The oldest glibc the package supports: RHEL 9 and Amazon Linux 2023 (2.34). Envoy's wheel needs
# 2.31 and cryptography's newest builds 2.34; any manylinux tag up to this one is accepted.
GLIBC_MINOR = 34
ARCH = "x86_64"


class StageError(Exception):
    """Staging cannot go on (the message says what is missing)."""


def platforms(glibc_minor: int = GLIBC_MINOR, arch: str = ARCH) -> list[str]:
    """Every manylinux tag a machine with glibc 2.<glibc_minor> accepts, best first.

    pip does not widen ``--platform manylinux_2_34`` to the older tags itself, so all are named.
    """
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc_minor, 4, -1)]
    return [*tags, f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]


def dependencies(pyproject: Path) -> list[str]:
    data = tomllib.loads(pyproject.read_text())
    deps = data.get("project", {}).get("dependencies")
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise StageError(f"{pyproject}: project.dependencies: expected a list of requirement strings")
    return deps


def abi_tag(version: str) -> str:
    major, minor = version.split(".")
    return f"cp{major}{minor}"


def _pip(python: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [python, "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _target_options(version: str, glibc_minor: int) -> list[str]:
    opts = ["--only-binary=:all:", "--python-version", version, "--implementation", "cp", "--abi", abi_tag(version)]
    for tag in platforms(glibc_minor):
        opts += ["--platform", tag]
    return opts


def download(
    python: str, version: str, deps: Sequence[str], into: Path, glibc_minor: int, pip_opts: Sequence[str]
) -> set[str] | str:
    """The wheel file names pip chose for ``version``, or pip's complaint when one has no wheel."""
    into.mkdir(parents=True, exist_ok=True)
    done = _pip(
        python, "download", "--quiet", *pip_opts, *_target_options(version, glibc_minor), "-d", str(into), *deps
    )
    if done.returncode != 0:
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("ERROR")]
        return "; ".join(lines) or (done.stdout + done.stderr).strip()[-500:]
    return {p.name for p in into.glob("*.whl")}


def install(python: str, version: str, wheels: Sequence[Path], target: Path, glibc_minor: int) -> None:
    if not wheels:
        target.mkdir(parents=True, exist_ok=True)
        return
    done = _pip(
        python,
        "install",
        "--quiet",
        "--no-deps",
        "--no-index",
        "--no-compile",
        *_target_options(version, glibc_minor),
        "--target",
        str(target),
        *map(str, wheels),
    )
    if done.returncode != 0:
        raise StageError(f"pip install into {target} failed:\n{done.stdout}{done.stderr}")
    # Console scripts point at the build interpreter; /usr/bin/vm-agent replaces them.
    shutil.rmtree(target / "bin", ignore_errors=True)


def strip_extensions(tree: Path) -> int:
    """Drop debug sections from the extension modules (uvloop's is 13 MB, 1.6 MB stripped).

    Returns the bytes saved; nothing happens without binutils' ``strip``."""
    strip = shutil.which("strip")
    if strip is None:
        print("stage.py: no `strip` (binutils): extension modules keep their debug sections", file=sys.stderr)
        return 0
    saved = 0
    for so in sorted(tree.rglob("*.so")):
        before = so.stat().st_size
        subprocess.run([strip, "--strip-unneeded", str(so)], check=True, capture_output=True)
        saved += before - so.stat().st_size
    return saved


def stage(
    python: str,
    wheel: Path,
    dest: Path,
    *,
    versions: Sequence[str] = REQUIRED,
    optional: Sequence[str] = OPTIONAL,
    glibc_minor: int = GLIBC_MINOR,
    pip_opts: Sequence[str] = (),
    pyproject: Path = REPO / "pyproject.toml",
) -> list[str]:
    deps = dependencies(pyproject)
    chosen: dict[str, set[str]] = {}
    with tempfile.TemporaryDirectory(prefix="vm-agent-wheels.") as tmp:
        wanted = (*versions, *optional)
        folders = {v: Path(tmp) / abi_tag(v) for v in wanted}
        # One pip per version at once: most of the time is spent waiting on the index.
        with ThreadPoolExecutor(max_workers=len(wanted)) as pool:
            results = pool.map(lambda v: download(python, v, deps, folders[v], glibc_minor, pip_opts), wanted)
            downloads = dict(zip(wanted, results, strict=True))
        for version, got in downloads.items():
            if isinstance(got, str):
                if version in optional:
                    print(
                        f"stage.py: Python {version} left out, a dependency has no wheel for it: {got}", file=sys.stderr
                    )
                    continue
                raise StageError(f"no wheels for Python {version}: {got}")
            chosen[version] = got
        staged = sorted(chosen, key=lambda v: tuple(map(int, v.split("."))))
        shared = set.intersection(*chosen.values())
        first = staged[0]
        install(
            python, first, [folders[first] / n for n in sorted(shared)] + [wheel], dest / "site-packages", glibc_minor
        )
        for version in staged:
            own = sorted(chosen[version] - shared)
            install(python, version, [folders[version] / n for n in own], dest / abi_tag(version), glibc_minor)
    saved = strip_extensions(dest)
    print(
        f"stage.py: Python {', '.join(staged)}; {len(shared)} shared wheels, "
        f"{', '.join(f'{abi_tag(v)}: {len(chosen[v] - shared)}' for v in staged)} per-ABI wheels; "
        f"stripping saved {saved / 2**20:.1f} MiB",
        file=sys.stderr,
    )
    return staged


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--wheel", type=Path, required=True, help="the vm-agent wheel (pure Python, shared)")
    p.add_argument("--dest", type=Path, required=True, help="the staged /usr/lib/vm-agent")
    p.add_argument("--pip-opts", default=os.environ.get("PIP_OPTS", ""), help="extra pip options (space-separated)")
    ns = p.parse_args(argv)
    try:
        staged = stage(sys.executable, ns.wheel, ns.dest, pip_opts=ns.pip_opts.split())
    except (StageError, OSError) as e:
        print(f"stage.py: {e}", file=sys.stderr)
        return 1
    print(" ".join(staged))
    print(f"2.{GLIBC_MINOR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

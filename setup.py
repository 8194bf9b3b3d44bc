"""Build hook: generate the Istio protobuf modules with grpcio-tools before packaging.

All metadata lives in pyproject.toml; this file only adds the code-generation step so that
``pip install .`` (wheel, sdist, editable) always ships modules that match the .proto files.
"""

from __future__ import annotations

import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    def run(self) -> None:
        generator = runpy.run_path(str(Path(__file__).parent / "vm_agent" / "proto" / "generate.py"))
        generator["generate"](Path(__file__).parent)
        # The native stats filter, shipped as package data when a C compiler is here (else the stock-filter path).
        native = runpy.run_path(str(Path(__file__).parent / "vm_agent" / "telemetry" / "native" / "build.py"))
        native["build"]()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})

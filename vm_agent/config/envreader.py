"""Typed reads of the merged environment (cluster.env < process environment < ``--set``).

Every bad value becomes one problem reported where the key came from (the file and line, the environment or
``--set``), and the caller gets the default, so one run reports every problem at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from vm_agent.config.formats import parse_bool, parse_duration

Report = Callable[[str, str, str, "int | None"], None]
"""(file, key, message, line) -> None: adds one problem."""


class EnvReader:
    def __init__(
        self,
        env: Mapping[str, str],
        *,
        environ: Mapping[str, str],
        extra: Mapping[str, str],
        lines: Mapping[str, tuple[Path, int]],
        report: Report,
    ) -> None:
        self.env = env
        self._environ = environ
        self._extra = extra
        self._lines = lines
        self._report = report

    def get(self, key: str, default: str = "") -> str:
        return self.env.get(key, default)

    def where(self, key: str) -> tuple[str, int | None]:
        """Where ``key``'s effective value came from: ``--set``, ``environment`` or a file and its line."""
        if key in self._extra:
            return "--set", None
        if key in self._environ:
            return "environment", None
        if key in self._lines:
            path, line = self._lines[key]
            return str(path), line
        return "environment", None

    def problem(self, key: str, message: str) -> None:
        where, line = self.where(key)
        self._report(where, key, message, line)

    def bool(self, key: str, default: bool) -> bool:
        value = self.env.get(key)
        if value is None or value == "":
            return default
        try:
            return parse_bool(value)
        except ValueError as err:
            self.problem(key, str(err))
            return default

    def duration(self, key: str, default: str) -> float:
        value = self.env.get(key) or default
        try:
            return parse_duration(value)
        except ValueError as err:
            self.problem(key, str(err))
            return parse_duration(default)

    def ports(self, key: str) -> tuple[int, ...]:
        value = self.env.get(key, "").strip()
        if not value or value == "*":
            return ()
        out: list[int] = []
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if not part.isdigit() or not 1 <= int(part) <= 65535:
                self.problem(key, f"expected a comma-separated list of ports 1-65535, got {part!r}")
                continue
            out.append(int(part))
        return tuple(out)

    def list(self, key: str) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.env.get(key, "").split(",") if p.strip())

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        text = self.env.get(key)
        if not text:
            return default
        try:
            value = float(text)
        except ValueError:
            self.problem(key, f"expected a number {lo}-{hi}, got {text!r}")
            return default
        if not lo <= value <= hi:
            self.problem(key, f"expected a number {lo}-{hi}, got {text!r}")
            return default
        return value

    def port(self, key: str, default: int) -> int:
        text = self.env.get(key, str(default))
        if not text.isdigit():
            self.problem(key, f"expected a port, got {text!r}")
            return default
        return int(text)

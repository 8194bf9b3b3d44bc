"""What one doctor check found: a status, one sentence, a fix hint and machine-readable details."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"  # works, or will fix itself, but an operator should know
    FAIL = "fail"  # the VM cannot join (or stay in) the mesh until this is fixed
    SKIP = "skip"  # not applicable here, or an earlier check it needs failed (the summary says which)


@dataclass(frozen=True)
class CheckResult:
    id: str
    status: Status
    summary: str
    hint: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status is Status.FAIL


def ok(check_id: str, summary: str, **details: Any) -> CheckResult:
    return CheckResult(check_id, Status.OK, summary, None, details)


def warn(check_id: str, summary: str, hint: str | None = None, **details: Any) -> CheckResult:
    return CheckResult(check_id, Status.WARN, summary, hint, details)


def fail(check_id: str, summary: str, hint: str, **details: Any) -> CheckResult:
    return CheckResult(check_id, Status.FAIL, summary, hint, details)


def skip(check_id: str, summary: str, **details: Any) -> CheckResult:
    return CheckResult(check_id, Status.SKIP, summary, None, details)

"""Doctor's two outputs: lines for a person, and the JSON document of docs/doctor.md (schema 1).

Both go through the log redaction as a last guard: no check puts a token, key or PEM in its text, but an
application's probe output or a command's error message could carry one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vm_agent.doctor.result import CheckResult, Status
from vm_agent.logs import redact

SCHEMA_VERSION = 1
_ID_WIDTH = 16
_INDENT = " " * (5 + 1 + _ID_WIDTH + 1)


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def counts(results: Sequence[CheckResult]) -> dict[str, int]:
    return {status.value: sum(1 for r in results if r.status is status) for status in Status}


def to_json(results: Sequence[CheckResult]) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "ok": not any(r.failed for r in results),
        "counts": counts(results),
        "checks": [
            {
                "id": r.id,
                "status": r.status.value,
                "summary": redact(r.summary),
                "hint": redact(r.hint) if r.hint else None,
                "details": _clean(r.details),
            }
            for r in results
        ],
    }


def to_text(results: Sequence[CheckResult]) -> str:
    lines: list[str] = []
    for r in results:
        lines.append(f"{r.status.value:<5} {r.id:<{_ID_WIDTH}} {redact(r.summary)}")
        if r.status is Status.FAIL:
            lines.extend(f"{_INDENT}{redact(str(p))}" for p in r.details.get("problems", ()))
        if r.hint and r.status in (Status.FAIL, Status.WARN):
            lines.append(f"{_INDENT}fix: {redact(r.hint)}")
    c = counts(results)
    verdict = "the VM can join the mesh" if not c["fail"] else "fix the failed lines above"
    lines.append("")
    lines.append(
        f"{len(results)} checks: {c['ok']} ok, {c['warn']} warning(s), {c['fail']} failed, {c['skip']} skipped; "
        f"{verdict}"
    )
    return "\n".join(lines)

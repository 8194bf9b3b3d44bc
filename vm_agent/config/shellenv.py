"""Parse ``cluster.env``/``sidecar.env`` the way ``set -a; . file`` would, without executing anything.

Supports what istioctl and operators write: ``KEY=value``, ``export KEY=value``, single quotes, double quotes
with backslash escapes, unquoted backslash escapes, ``#`` comments, blank lines, and ``$VAR``/``${VAR}``
expansion from earlier assignments and the process environment. Command substitution is refused: a
configuration file must never run code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Assignment:
    key: str
    value: str
    line: int


class ShellSyntaxError(ValueError):
    def __init__(self, line: int, message: str) -> None:
        self.line = line
        self.message = message
        super().__init__(f"line {line}: {message}")


def parse(text: str, environ: Mapping[str, str] | None = None) -> tuple[list[Assignment], list[ShellSyntaxError]]:
    """Return the assignments in file order and every syntax problem (the rest of the file is still read)."""
    scope: dict[str, str] = dict(environ or {})
    out: list[Assignment] = []
    errors: list[ShellSyntaxError] = []
    for lineno, logical in _logical_lines(text):
        try:
            words = _split_words(logical, lineno, scope)
        except ShellSyntaxError as err:
            errors.append(err)
            continue
        if not words:
            continue
        if words[0] == ("export", False) and len(words) > 1:
            words = words[1:]
        for word, _quoted in words:
            key, eq, value = word.partition("=")
            if not eq or not _NAME.fullmatch(key):
                errors.append(ShellSyntaxError(lineno, f"expected KEY=VALUE, got {word!r}"))
                break
            scope[key] = value
            out.append(Assignment(key, value, lineno))
    return out, errors


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash-newline continuations and newlines inside quotes; keep the starting line number."""
    lines: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 1
    lineno = 1
    quote: str | None = None
    i = 0
    while i < len(text):
        c = text[i]
        if quote is None and c == "\\" and i + 1 < len(text) and text[i + 1] == "\n":
            i += 2
            lineno += 1
            continue
        if quote is None and c == "#" and (not buf or buf[-1] in " \t"):
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        if c == "\\" and quote != "'" and i + 1 < len(text):
            buf.append(text[i : i + 2])
            if text[i + 1] == "\n":
                lineno += 1
            i += 2
            continue
        if c in "'\"":
            if quote is None:
                quote = c
            elif quote == c:
                quote = None
        if c == "\n":
            lineno += 1
            if quote is None:
                lines.append((start, "".join(buf)))
                buf = []
                start = lineno
                i += 1
                continue
        buf.append(c)
        i += 1
    if quote is not None:
        lines.append((start, "".join(buf) + "\0UNTERMINATED" + quote))
    elif buf:
        lines.append((start, "".join(buf)))
    return lines


def _expand(text: str, i: int, lineno: int, scope: Mapping[str, str]) -> tuple[str, int]:
    """Expand the parameter starting at text[i] == '$'; return (value, next index)."""
    if i + 1 >= len(text):
        return "$", i + 1
    nxt = text[i + 1]
    if nxt == "(":
        raise ShellSyntaxError(lineno, "command substitution $(...) is not allowed in an env file")
    if nxt == "{":
        end = text.find("}", i + 2)
        if end < 0:
            raise ShellSyntaxError(lineno, "unterminated ${...}")
        inner = text[i + 2 : end]
        name, sep, default = inner.partition(":-")
        if not _NAME.fullmatch(name):
            raise ShellSyntaxError(lineno, f"unsupported parameter expansion ${{{inner}}}")
        value = scope.get(name, "")
        if sep and not value:
            value = default
        return value, end + 1
    m = _NAME.match(text, i + 1)
    if m:
        return scope.get(m.group(0), ""), m.end()
    return "$", i + 1


def _split_words(line: str, lineno: int, scope: Mapping[str, str]) -> list[tuple[str, bool]]:
    if "\0UNTERMINATED" in line:
        q = line.rsplit("\0UNTERMINATED", 1)[1]
        raise ShellSyntaxError(lineno, f"unterminated {q} quote")
    words: list[tuple[str, bool]] = []
    cur: list[str] = []
    quoted = False
    in_word = False
    i = 0
    n = len(line)
    while i < n:
        c = line[i]
        if c in " \t\r":
            if in_word:
                words.append(("".join(cur), quoted))
                cur, quoted, in_word = [], False, False
            i += 1
            continue
        if c in ";&|<>(){}" and c != "{":
            raise ShellSyntaxError(lineno, f"unsupported shell syntax {c!r}: only assignments are allowed")
        if c == "`":
            raise ShellSyntaxError(lineno, "command substitution `...` is not allowed in an env file")
        in_word = True
        if c == "'":
            end = line.find("'", i + 1)
            cur.append(line[i + 1 : end])
            quoted = True
            i = end + 1
        elif c == '"':
            quoted = True
            i += 1
            while i < n and line[i] != '"':
                ch = line[i]
                if ch == "\\" and i + 1 < n and line[i + 1] in '"\\$`\n':
                    if line[i + 1] != "\n":
                        cur.append(line[i + 1])
                    i += 2
                elif ch == "$":
                    value, i = _expand(line, i, lineno, scope)
                    cur.append(value)
                elif ch == "`":
                    raise ShellSyntaxError(lineno, "command substitution `...` is not allowed in an env file")
                else:
                    cur.append(ch)
                    i += 1
            i += 1
        elif c == "\\":
            if i + 1 < n:
                cur.append(line[i + 1])
            i += 2
        elif c == "$":
            value, i = _expand(line, i, lineno, scope)
            cur.append(value)
        else:
            cur.append(c)
            i += 1
    if in_word:
        words.append(("".join(cur), quoted))
    return words


def render(values: Mapping[str, str]) -> str:
    """Write values the way istioctl does: sorted, single-quoted, one per line."""
    lines = []
    for key in sorted(values):
        v = values[key].replace("'", "'\\''")
        lines.append(f"{key}='{v}'")
    return "\n".join(lines) + "\n"

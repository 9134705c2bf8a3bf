"""os-release(5) files: written by the builder (/usr/lib/os-release), read by the agent (which
image and version it runs). One module, so that a value the builder writes reads back the same.

The format is a subset of shell assignments: KEY=value, one per line, a value in double quotes
with `\\`, `"`, `$` and a backquote escaped by a backslash, or in single quotes taken as it is.
A value cannot hold a newline, and a key is an upper-case shell variable name.

Standard library only: the agent runs on the image's own Python.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

KEY = re.compile(r"[A-Z_][A-Z0-9_]*")
_ESCAPED = '\\"$`'


def format_os_release(fields: Mapping[str, str]) -> str:
    """`fields` as os-release lines, every value double-quoted and escaped; ValueError naming the
    key for a key that is not a variable name or a value with a newline or control character."""
    lines = []
    for key, value in fields.items():
        if not KEY.fullmatch(key):
            raise ValueError(f"os-release key {key!r}: expected upper-case letters, digits and _")
        if not value.isprintable():
            raise ValueError(
                f"os-release {key}: expected one line without control characters, got {value!r}"
            )
        quoted = "".join("\\" + c if c in _ESCAPED else c for c in value)
        lines.append(f'{key}="{quoted}"\n')
    return "".join(lines)


def parse_os_release(text: str) -> dict[str, str]:
    """KEY=value pairs of an os-release file with quoting removed. Lines that are no assignment
    (comments, blank lines, junk) are skipped, as systemd skips them; an unterminated quote
    takes the rest of its line."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        key, equals, value = line.partition("=")
        if not equals or not KEY.fullmatch(key):
            continue
        fields[key] = _unquote(value)
    return fields


def _unquote(value: str) -> str:
    if value.startswith("'"):
        return value[1:].partition("'")[0]
    if not value.startswith('"'):
        return value.strip()
    out: list[str] = []
    chars = iter(value[1:])
    for c in chars:
        if c == '"':
            break
        if c == "\\":
            nxt = next(chars, "")
            # Inside double quotes only these are escapes; any other backslash stays.
            out.append(nxt if nxt in _ESCAPED else "\\" + nxt)
        else:
            out.append(c)
    return "".join(out)

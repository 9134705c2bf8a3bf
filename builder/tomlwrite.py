"""TOML written by the build (the image's /usr/lib/berth/update.toml): strings escaped per the
TOML 1.0 spec, never pasted into quotes with an f-string, so that any value reads back as itself.

Basic strings escape `"`, `\\` and every control character (DEL included, which TOML forbids
raw); everything else, non-ASCII included, is written as it is (a TOML file is UTF-8). Lone
surrogates cannot be written in UTF-8 at all and are refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}

Scalar = str | int | bool


def toml_string(value: str) -> str:
    """`value` as a TOML basic string, quotes included."""
    out = []
    for c in value:
        if c in _SHORT:
            out.append(_SHORT[c])
        elif c < " " or c == "\x7f":
            out.append(f"\\u{ord(c):04X}")
        elif "\ud800" <= c <= "\udfff":
            raise ValueError(f"{value!r} holds a lone surrogate, which UTF-8 cannot encode")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return toml_string(value)


def toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def toml_table(name: str, items: Mapping[str, Scalar]) -> str:
    """`[name]` and one `key = value` line per item."""
    lines = [f"[{toml_key(name)}]", *(f"{toml_key(k)} = {toml_value(v)}" for k, v in items.items())]
    return "\n".join(lines) + "\n"

"""JSON documents that must be one object: the release manifest, the channel manifest, the agent's
own state files. One parser, so that every reader refuses the same malformed input the same way.

`json.loads` raises RecursionError, not a ValueError, on deeply nested arrays (a few thousand `[`
are enough): a reader that catches only ValueError would crash on a hostile manifest. A number
of more than 4300 digits raises a plain ValueError (not a JSONDecodeError), and NaN, Infinity and
-Infinity are no JSON at all (RFC 8259) though `json.loads` takes them.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

E = TypeVar("E", bound=Exception)


def json_object(text: str | bytes, source: str, error: type[E]) -> dict[str, Any]:
    """`text` parsed as a JSON object, or `error` naming `source` and what was wrong."""
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise error(f"{source}: not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise error(f"{source}: not UTF-8 text: {e}") from None
    except RecursionError:
        raise error(f"{source}: not valid JSON: nested too deeply") from None
    except ValueError as e:  # int() of too many digits (the advice after ";" is Python's), NaN
        raise error(f"{source}: not valid JSON: {str(e).split(';')[0]}") from None
    if not isinstance(doc, dict):
        raise error(f"{source}: expected a JSON object at the top level")
    return doc


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")

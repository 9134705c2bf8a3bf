"""JSON documents that must be one object: the release manifest, the channel manifest, the agent's
own state files. One parser, so that every reader refuses the same malformed input the same way.

`json.loads` raises RecursionError, not a ValueError, on deeply nested arrays (a few thousand `[`
are enough): a reader that catches only ValueError would crash on a hostile manifest. And an
integer of more than 4300 digits is a plain ValueError (int()'s limit), not a JSONDecodeError.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

E = TypeVar("E", bound=Exception)


def json_object(text: str | bytes, source: str, error: type[E]) -> dict[str, Any]:
    """`text` parsed as a JSON object, or `error` naming `source` and what was wrong."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{source}: not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise error(f"{source}: not UTF-8 text: {e}") from None
    except RecursionError:
        raise error(f"{source}: not valid JSON: nested too deeply") from None
    except ValueError as e:
        raise error(f"{source}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise error(f"{source}: expected a JSON object at the top level")
    return doc

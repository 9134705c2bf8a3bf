"""Fuzzing every parser of outside input with Hypothesis: the shared profile, time bound,
strategies and the one property.

The property (`refuses_cleanly`): a parser given anything returns a value or raises its documented
error type with a message that names the file or field; never another exception, never a hang.

Inputs are structured but wrong: a valid document with one part replaced by a value of the wrong
type, a huge integer, deep nesting, a surrogate, a control character, a huge string, or its bytes
cut short or spoiled with non-UTF-8. Random bytes alone stop at the first line of a parser;
these reach its last check.

The profile runs a fixed number of examples (`BERTH_FUZZ_EXAMPLES`, 40 unless set), derandomized
when `CI=true` so that a CI run is reproducible. Examples that failed once are kept in the
repository's `.hypothesis/` (git-ignored) and tried first next time.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

EXAMPLES = int(os.environ.get("BERTH_FUZZ_EXAMPLES", "40"))
# A parser of a few kilobytes that needs a second has a quadratic (or worse) path: that is a hang.
EXAMPLE_SECONDS = 2.0
_ROOT = Path(__file__).resolve().parents[2]

_CI = os.environ.get("CI") == "true"

settings.register_profile(
    "berth-fuzz",
    max_examples=EXAMPLES,
    # Derandomized, CI runs the same examples every time, and keeps no database of failures.
    derandomize=_CI,
    deadline=timedelta(seconds=EXAMPLE_SECONDS),
    database=None if _CI else DirectoryBasedExampleDatabase(_ROOT / ".hypothesis" / "examples"),
    # Generated documents are large on purpose; the fuzzers' fixtures are shared on purpose.
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
    print_blob=True,
)
settings.load_profile("berth-fuzz")

fuzz = pytest.mark.fuzz

E = TypeVar("E", bound=BaseException)
T = TypeVar("T")


class Hang(Exception):
    """An example ran past its time bound.

    An Exception (Hypothesis reports only those as a test's failure), so a parser's broad
    `except` could catch it: `refuses_cleanly` checks whether the bound expired all the same.
    """


@dataclass
class _Bound:
    expired: bool = False


@contextmanager
def time_bound(seconds: float = 2 * EXAMPLE_SECONDS) -> Iterator[_Bound]:
    """Interrupt the block with `Hang` after `seconds`: a deadline only notices a slow example
    once it has ended, an alarm also ends one that never would."""
    bound = _Bound()

    def expire(signum: int, frame: object) -> None:
        bound.expired = True
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    caught = Hang(f"no answer within {seconds} s (the parser caught the interruption)")
    try:
        yield bound
    except Hang:
        raise
    except BaseException:
        if bound.expired:
            raise caught from None
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if bound.expired:
        raise caught


def refuses_cleanly(parse: Callable[[], T], error: type[E], names: tuple[str, ...]) -> T | E:
    """`parse()`'s value, or the `error` it raised, which must name one of `names`.

    Any other exception propagates and fails the example; so does a hang (see `time_bound`).
    """
    try:
        with time_bound():
            return parse()
    except Hang:
        raise
    except error as e:
        message = str(e)
        assert any(name in message for name in names), (
            f"{type(e).__name__} names none of {names}: {message!r}"
        )
        return e


# The leaves that break parsers: wrong types, boundaries, what int()/float()/str() refuse.
weird_text = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "\ud800",  # a lone surrogate: not encodable as UTF-8
            "\udcff",
            "\u202e",
            "\n",
            "\r\n",
            "\x1b[2J",
            "..",
            "/",
            "-1",
            "0",
            "1e999",
            "NaN",
            "²",  # str.isdigit() says yes, int() says no
            "٣",  # int() says yes
            "9" * 5000,
            "a" * 70000,
            "[" * 5000,
            "{" * 5000,
        ]
    ),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec=None, categories=["Cc", "Cs", "Zs", "Nd"]), max_size=8),
)
weird_number = st.one_of(
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**400, 0.5, -0.0]),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308]),
    st.integers(),
    st.floats(),
)
weird_scalar = st.one_of(st.none(), st.booleans(), weird_number, weird_text)


# Leaves the renderers replace by text no Python object could be written as (and Hypothesis
# could not show): brackets nested 50000 deep, an integer over int()'s 4300-digit limit.
DEEP = "@@deep@@"
HUGE = "@@huge@@"
_MARKS = {DEEP: "[" * 50000 + "]" * 50000, HUGE: "1" + "0" * 5000}


def _unmark(text: str) -> str:
    for mark, replacement in _MARKS.items():
        text = text.replace(f'"{mark}"', replacement)
    return text


def _deep(depth: int, kind: str) -> object:
    value: object = "x"
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


weird_value: st.SearchStrategy[object] = st.one_of(
    weird_scalar,
    st.sampled_from([[], {}, DEEP, HUGE, HUGE, _deep(200, "list"), _deep(200, "dict")]),
    st.recursive(
        weird_scalar,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(weird_text, inner, max_size=3),
        max_leaves=8,
    ),
)


def _paths(doc: object, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON-like document, the document itself first."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _paths(value, (*prefix, index))


def _replace(doc: object, path: tuple[Any, ...], change: Callable[[object], object]) -> object:
    if not path:
        return change(doc)
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        return {**doc, head: _replace(doc[head], rest, change)}
    assert isinstance(doc, list)
    return [_replace(v, rest, change) if i == head else v for i, v in enumerate(doc)]


_DELETE = object()


def _drop_deleted(doc: object) -> object:
    if isinstance(doc, dict):
        return {k: _drop_deleted(v) for k, v in doc.items() if v is not _DELETE}
    if isinstance(doc, list):
        return [_drop_deleted(v) for v in doc if v is not _DELETE]
    return doc


@st.composite
def mutated(
    draw: st.DrawFn, document: object, leaves: st.SearchStrategy[object] = weird_value
) -> Any:
    """`document` with one to three places changed: replaced by a weird value, deleted, a string
    given a weird prefix or suffix, or (in an object) given an extra key. Sometimes the document
    is left as it was, to reach the end."""
    doc = document
    for _ in range(draw(st.integers(0, 3))):
        places = list(_paths(doc))
        place = draw(st.sampled_from(places))
        how = draw(st.sampled_from(["replace", "replace", "delete", "add", "affix"]))
        if how == "affix":
            # A valid string with something stuck on: "2G" becomes "99…92G", "root" "root\x00".
            extra, before = draw(weird_text), draw(st.booleans())

            def affix(old: object, extra: str = extra, before: bool = before) -> object:
                if not isinstance(old, str):
                    return old
                return extra + old if before else old + extra

            doc = _replace(doc, place, affix)
        elif how == "replace" or (not place and how == "delete"):
            value = draw(leaves)

            def put(_old: object, value: object = value) -> object:
                return value

            doc = _replace(doc, place, put)
        elif how == "delete":
            doc = _drop_deleted(_replace(doc, place, lambda _old: _DELETE))
        else:
            key, value = draw(weird_text), draw(leaves)

            def add(old: object, key: str = key, value: object = value) -> object:
                if isinstance(old, dict):
                    return {**old, key: value}
                if isinstance(old, list):
                    return [*old, value]
                return value

            doc = _replace(doc, place, add)
    return doc


def to_json(doc: object) -> str:
    """`doc` as JSON text: ASCII (a lone surrogate stays a \\u escape), NaN and huge ints as
    Python's json writes them."""
    return _unmark(json.dumps(doc, ensure_ascii=True))


def _toml_key(key: object) -> str:
    return json.dumps(str(key), ensure_ascii=True)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    # TOML has no null: a string says as much and is still a value of the wrong type.
    return '"null"'


def to_toml(doc: object) -> str:
    """`doc` as TOML: tables as [name], arrays of tables as [[name]], the rest inline. A `doc`
    that is no table (a mutation replaced the whole document) is written as a bare value."""
    if not isinstance(doc, dict):
        return _unmark(_toml_value(doc) + "\n")
    lines: list[str] = []
    for key, value in doc.items():
        if not isinstance(value, dict | list) or (
            isinstance(value, list) and not all(isinstance(v, dict) for v in value)
        ):
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in doc.items():
        if isinstance(value, dict):
            lines.append(f"[{_toml_key(key)}]")
            lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for entry in value:
                lines.append(f"[[{_toml_key(key)}]]")
                lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in entry.items())
    return _unmark("\n".join(lines) + "\n")


@st.composite
def spoiled(draw: st.DrawFn, text: str, encoding: str = "utf-8") -> bytes:
    """`text` as bytes, sometimes spoiled: cut short, a non-UTF-8 byte or a NUL put in, a BOM in
    front, a line doubled."""
    data = text.encode(encoding, "surrogatepass")
    how = draw(st.sampled_from(["as is", "as is", "cut", "byte", "bom", "double", "crlf"]))
    if how == "cut":
        return data[: draw(st.integers(0, len(data)))]
    if how == "byte":
        at = draw(st.integers(0, len(data)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\x80", b"\x00", b"\xed\xa0\x80", b"\r"]))
        return data[:at] + bad + data[at:]
    if how == "bom":
        return b"\xef\xbb\xbf" + data
    if how == "double":
        return data + data
    if how == "crlf":
        return data.replace(b"\n", b"\r\n")
    return data


def documents(
    valid: object, render: Callable[[Any], str], leaves: st.SearchStrategy[object] = weird_value
) -> st.SearchStrategy[bytes]:
    """Bytes of `valid` mutated and rendered, or spoiled, or (one time in ten) random bytes."""
    structured = mutated(valid, leaves).map(render).flatmap(spoiled)
    return st.integers(0, 9).flatmap(lambda n: st.binary(max_size=64) if n == 0 else structured)

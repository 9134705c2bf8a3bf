"""HTTP at first boot, shared by the config sources, Ignition's remote contents and Azure's report.

At first boot the network may still be coming up (no address yet, DNS not answering, a metadata
service starting), so every request is retried with a growing pause until a deadline; what counts
as "not yet" is the caller's decision (it raises `NotYet`). Answers are read with a size cap, so a
runaway server cannot fill memory. requests is imported only where a request is made, so that
importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from updater.provision.plan import ProvisionError

T = TypeVar("T")

CONNECT_TIMEOUT = 5.0
FIRST_DELAY = 0.25
MAX_DELAY = 5.0

# urllib3's messages start with reprs of its pool or connection ("HTTPConnectionPool(host=...,
# port=...): ", "<HTTPConnection object at 0x...>: "); the reason after them is what matters.
_REPR_PREFIX = re.compile(r"^(?:\w+\([^)]*\)|<[^>]*>): ")
_WITH_URL = re.compile(r"with url: \S+")


class NotYet(Exception):
    """A failure that waiting may cure (no connection, a timeout, a 5xx); the message says which."""


def retry_until(
    deadline: float,
    attempt: Callable[[], T],
    give_up: Callable[[str, int], ProvisionError],
    *,
    on_retry: Callable[[str], None] | None = None,
) -> T:
    """`attempt()` until it returns, pausing 0.25 s, doubling to 5 s, after each `NotYet`.

    Past `deadline` (time.monotonic), raises `give_up(last reason, attempts)`. Any other
    exception from `attempt` ends the retries at once.
    """
    delay = FIRST_DELAY
    attempts = 0
    while True:
        attempts += 1
        try:
            return attempt()
        except NotYet as e:
            last = str(e)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise give_up(last, attempts)
        if on_retry is not None:
            on_retry(last)
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, MAX_DELAY)


def read_capped(response: Any, limit: int) -> bytes | None:
    """A streamed requests response's body, or None as soon as it passes `limit` bytes."""
    body = bytearray()
    for chunk in response.iter_content(64 * 1024):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def failure_reason(error: Exception) -> str:
    """A requests exception as one short reason, without urllib3's object reprs and without the
    URL it sometimes repeats (query and token included)."""
    inner: Any = error.args[0] if error.args else error
    inner = getattr(inner, "reason", None) or inner
    text = str(inner)
    while (shorter := _REPR_PREFIX.sub("", text, count=1)) != text:
        text = shorter
    return _WITH_URL.sub("for this URL", text)


@contextlib.contextmanager
def request_errors(request: str, service: str | None = None) -> Iterator[None]:
    """Around one request, called `request` in messages ("GET http://169.254.169.254/..."): a
    requests failure that waiting may cure (no connection, a timeout, a torn body) becomes NotYet;
    any other, a refused TLS handshake included (waiting does not fix a certificate), becomes a
    ProvisionError, naming `service` first when given."""
    import requests

    named = f"{service}: {request}" if service else request
    try:
        yield
    except requests.exceptions.SSLError as e:  # before ConnectionError, its base class
        raise ProvisionError(f"{named}: TLS failed: {failure_reason(e)}") from None
    except (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.ChunkedEncodingError,
    ) as e:
        raise NotYet(f"{request}: {failure_reason(e)}") from None
    except requests.RequestException as e:
        raise ProvisionError(f"{named}: {failure_reason(e)}") from None

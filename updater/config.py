"""The agent's configuration: image defaults, then the operator's overrides.

    /usr/lib/berth/update.toml   written by the image build (url, channel); verity-protected
    /etc/berth/update.toml       the operator's overrides; any subset of the keys

    [update]
    url = "https://updates.example/berth/"
    channel = "stable"
    strategy = "immediate"      # or "off"
    interval = "1h"             # "30m", "90s", "3600" or 3600: seconds between checks

Both files share one schema (`_SCHEMA`): a table name maps to its keys, each with a parser and the
`UpdateConfig` field it sets. A later feature adds its table there and its fields to
`UpdateConfig`, nothing else. Unknown tables and keys are errors naming the file and the key: a
typo must not silently fall back to a default.

A malformed override raises ConfigError. The daemon keeps running with its last good
configuration: that decision lives in `reload_config`, which the daemon calls on every reload
instead of `load_config`.

Standard library only: this runs on the device's own Python.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from updater.channel import CHANNEL_NAME
from updater.errors import UpdateError

DEFAULT_PATH = Path("/usr/lib/berth/update.toml")
OVERRIDE_PATH = Path("/etc/berth/update.toml")
MIN_INTERVAL = 60.0
DEFAULT_INTERVAL = 3600.0

_DURATION = re.compile(r"([0-9]+)\s*(s|m|h|d)?")
_UNIT_SECONDS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class ConfigError(UpdateError):
    """A configuration file is unreadable or malformed; the message names file, key, expectation."""


class Strategy(StrEnum):
    """When the machine reboots into an installed update."""

    IMMEDIATE = "immediate"  # as soon as the update is installed
    OFF = "off"  # never by itself: an operator or kured (via /run/reboot-required) reboots


@dataclass(frozen=True)
class UpdateConfig:
    url: str
    channel: str
    strategy: Strategy = Strategy.IMMEDIATE
    interval: float = DEFAULT_INTERVAL  # seconds between checks

    @property
    def metadata_url(self) -> str:
        return self.url + "metadata/"

    @property
    def targets_url(self) -> str:
        return self.url + "targets/"


# A parser gets the raw TOML value and the minimum interval; it returns the field's value or
# raises ValueError with what was expected (ConfigError adds file and key).
_Parser = Callable[[object, float], object]


def _url(value: object, _min: float) -> str:
    # "" is an image built without a repository: it boots and reports, and updates once an
    # operator sets one in /etc/berth/update.toml.
    if value == "":
        return ""
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    # The repository's files are resolved relative to it: metadata/… and targets/….
    return value if value.endswith("/") else value + "/"


def _channel(value: object, _min: float) -> str:
    if not isinstance(value, str) or not CHANNEL_NAME.fullmatch(value):
        raise ValueError(
            f"expected a channel name of lowercase letters, digits, '.', '_' or '-', got {value!r}"
        )
    return value


def _strategy(value: object, _min: float) -> Strategy:
    choices = ", ".join(s.value for s in Strategy)
    if not isinstance(value, str):
        raise ValueError(f"expected one of {choices}, got {value!r}")
    try:
        return Strategy(value)
    except ValueError:
        raise ValueError(f"expected one of {choices}, got {value!r}") from None


def parse_interval(value: object, minimum: float = MIN_INTERVAL) -> float:
    """Seconds from 3600, "3600", "90s", "30m", "1h" or "1d"; at least `minimum`."""
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        seconds = float(int(match[1]) * _UNIT_SECONDS[match[2]])
    else:
        raise ValueError(f'expected a duration like "1h", "30m", "90s" or seconds, got {value!r}')
    if seconds < minimum:
        raise ValueError(
            f"expected at least {minimum:.0f} seconds (checking more often only loads the "
            f"repository), got {value!r}"
        )
    return seconds


# table -> key -> (UpdateConfig field, parser). The one place a new table or key is added.
_SCHEMA: Mapping[str, Mapping[str, tuple[str, _Parser]]] = MappingProxyType(
    {
        "update": MappingProxyType(
            {
                "url": ("url", _url),
                "channel": ("channel", _channel),
                "strategy": ("strategy", _strategy),
                "interval": ("interval", parse_interval),
            }
        ),
    }
)
_REQUIRED = ("url", "channel")


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None


def _fields(path: Path, doc: Mapping[str, Any], min_interval: float) -> dict[str, object]:
    values: dict[str, object] = {}
    for table, content in doc.items():
        keys = _SCHEMA.get(table)
        if keys is None:
            known = ", ".join(f"[{t}]" for t in _SCHEMA)
            raise ConfigError(f"{path}: unknown table or key '{table}' (known tables: {known})")
        if not isinstance(content, dict):
            raise ConfigError(f"{path}: '{table}' must be a table ([{table}])")
        for key, raw in content.items():
            spec = keys.get(key)
            if spec is None:
                known = ", ".join(keys)
                raise ConfigError(f"{path}: unknown key '{table}.{key}' (known: {known})")
            field_name, parse = spec
            try:
                values[field_name] = parse(raw, min_interval)
            except ValueError as e:
                raise ConfigError(f"{path}: key '{table}.{key}': {e}") from None
    return values


def load_config(
    default_path: Path = DEFAULT_PATH,
    override_path: Path = OVERRIDE_PATH,
    *,
    min_interval: float = MIN_INTERVAL,
) -> UpdateConfig:
    """The image's defaults with the operator's overrides applied key by key.

    The defaults file must exist (the image build writes it); a missing override file means no
    overrides. `min_interval` exists for tests that poll fast; the device always uses 60 s.
    """
    values = _fields(default_path, _read(default_path), min_interval)
    if override_path.exists():
        values.update(_fields(override_path, _read(override_path), min_interval))
    for key in _REQUIRED:
        if key not in values:
            raise ConfigError(
                f"{default_path}: key 'update.{key}' is missing and {override_path} does not set it"
            )
    base = UpdateConfig(url=str(values.pop("url")), channel=str(values.pop("channel")))
    return replace(base, **values)  # type: ignore[arg-type]


def reload_config(
    previous: UpdateConfig,
    default_path: Path = DEFAULT_PATH,
    override_path: Path = OVERRIDE_PATH,
    *,
    min_interval: float = MIN_INTERVAL,
) -> tuple[UpdateConfig, ConfigError | None]:
    """For the daemon: the new configuration, or the previous one and the error that kept it.

    An operator's typo in /etc/berth/update.toml must not stop updates: the daemon logs the
    error (it names the file and key) and carries on with what worked before.
    """
    try:
        return load_config(default_path, override_path, min_interval=min_interval), None
    except ConfigError as e:
        return previous, e

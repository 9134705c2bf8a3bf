"""The agent's configuration: image defaults, then the operator's overrides.

    /usr/lib/berth/update.toml   written by the image build (url, channel); verity-protected
    /etc/berth/update.toml       the operator's overrides; any subset of the keys

    [update]
    url = "https://updates.example/berth/"
    channel = "stable"
    strategy = "immediate"      # "window", "fleet-lock", "etcd-lock" or "off"
    interval = "1h"             # "30m", "90s", "3600" or 3600: seconds between checks
    reboot_delay = "10m"        # logged-in users are warned this long before a reboot

    [[window]]                  # strategy "window": see updater/reboot/windows.py
    [fleet_lock]                # strategy "fleet-lock": base_url, group
    [etcd_lock]                 # strategy "etcd-lock": endpoints, group, slots, TLS files

Both files share one schema (`_SCHEMA`): a table name maps to its keys, each with a parser and the
`UpdateConfig` field it sets. A later feature adds its table there and its fields to
`UpdateConfig`, nothing else. Unknown tables and keys are errors naming the file and the key: a
typo must not silently fall back to a default. `[[window]]` is an array of tables
(`_ARRAY_TABLES`); an override that has any replaces the image's list as a whole. A strategy
that needs a table it does not find is an error naming the file that chose the strategy.

A malformed override raises ConfigError. The daemon keeps running with its last good
configuration: that decision lives in `reload_config`, which the daemon calls on every reload
instead of `load_config`.

Standard library only: this runs on the device's own Python.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from updater.errors import UpdateError
from updater.files import read_utf8, toml_document
from updater.limits import MAX_DIGITS, MAX_DURATION_SECONDS, MAX_SLOTS
from updater.reboot.semaphore import GROUP_NAME
from updater.reboot.windows import Window, parse_window
from updater.release.channel import CHANNEL_NAME

DEFAULT_PATH = Path("/usr/lib/berth/update.toml")
OVERRIDE_PATH = Path("/etc/berth/update.toml")
MIN_INTERVAL = 60.0
MAX_INTERVAL = 3650 * 86400
DEFAULT_INTERVAL = 3600.0
DEFAULT_REBOOT_DELAY = 600.0
DEFAULT_GROUP = "default"

_DURATION = re.compile(rf"([0-9]{{1,{MAX_DIGITS}}})\s*(s|m|h|d)?")
# RFC 3986's characters: no quote, backslash, space, control or non-ASCII character, each of
# which some writer or reader of the URL (a TOML file, a log line, an HTTP request) takes apart.
_URL_CHARS = r"[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]"
_AUTHORITY = r"[A-Za-z0-9._~!$&'()*+,;=:@%\[\]-]+"  # user:password@host:port, host an IPv6 [..]
_URL = re.compile(rf"https?://{_AUTHORITY}(/{_URL_CHARS}*)?")
_ENDPOINT = re.compile(rf"https?://{_AUTHORITY}/?")
MAX_URL = 2048
_UNIT_SECONDS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class ConfigError(UpdateError):
    """A configuration file is unreadable or malformed; the message names file, key, expectation."""


class Strategy(StrEnum):
    """When the machine reboots into an installed update."""

    IMMEDIATE = "immediate"  # as soon as the update is installed
    OFF = "off"  # never by itself: an operator or kured (via /run/reboot-required) reboots
    WINDOW = "window"  # only inside a maintenance window ([[window]])
    FLEET_LOCK = "fleet-lock"  # holding a slot from a FleetLock server ([fleet_lock])
    ETCD_LOCK = "etcd-lock"  # holding a slot of airlock's semaphore in etcd ([etcd_lock])


@dataclass(frozen=True)
class UpdateConfig:
    url: str
    channel: str
    strategy: Strategy = Strategy.IMMEDIATE
    interval: float = DEFAULT_INTERVAL  # seconds between checks
    # Reboot coordination (docs/updates.md, "Reboot coordination").
    reboot_delay: float = DEFAULT_REBOOT_DELAY  # seconds logged-in users are warned ahead
    windows: tuple[Window, ...] = ()
    fleet_lock_url: str = ""
    fleet_lock_group: str = DEFAULT_GROUP
    etcd_endpoints: tuple[str, ...] = ()
    etcd_group: str = DEFAULT_GROUP
    etcd_slots: int = 1  # the slot count when this machine creates the group's semaphore
    etcd_ca_file: Path | None = None
    etcd_cert_file: Path | None = None
    etcd_key_file: Path | None = None

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
    if not isinstance(value, str) or len(value) > MAX_URL or not _URL.fullmatch(value):
        raise ValueError(
            f"expected an http:// or https:// URL of at most {MAX_URL} characters, without "
            f"quotes, backslashes, spaces or non-ASCII characters (percent-encode them), "
            f"got {_shown(value)}"
        )
    # The repository's files are resolved relative to it: metadata/… and targets/….
    return value if value.endswith("/") else value + "/"


def _channel(value: object, _min: float) -> str:
    if not isinstance(value, str) or not CHANNEL_NAME.fullmatch(value):
        raise ValueError(
            "expected a channel name of lowercase letters, digits, '.', '_' or '-', "
            f"got {_shown(value)}"
        )
    return value


def _strategy(value: object, _min: float) -> Strategy:
    choices = ", ".join(s.value for s in Strategy)
    if not isinstance(value, str):
        raise ValueError(f"expected one of {choices}, got {_shown(value)}")
    try:
        return Strategy(value)
    except ValueError:
        raise ValueError(f"expected one of {choices}, got {_shown(value)}") from None


def parse_interval(value: object, minimum: float = MIN_INTERVAL) -> float:
    """Seconds from 3600, "3600", "90s", "30m", "1h" or "1d"; at least `minimum`, at most 31
    days (limits.MAX_DURATION_SECONDS: the daemon sleeps this long, and time.sleep() and the
    clock arithmetic around it overflow long before an integer does)."""
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        seconds = int(match[1]) * _UNIT_SECONDS[match[2]]
    else:
        raise ValueError(
            'expected a duration like "1h", "30m", "90s" or a whole number of seconds, '
            f"got {_shown(value)}"
        )
    if seconds < minimum:
        raise ValueError(
            f"expected at least {minimum:.0f} seconds (checking more often only loads the "
            f"repository), got {_shown(value)}"
        )
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(
            f"expected at most 31 days ({MAX_DURATION_SECONDS} seconds), got {_shown(value)}"
        )
    return float(seconds)


def _delay(value: object, _min: float) -> float:
    return parse_interval(value, 0.0)


def _group(value: object, _min: float) -> str:
    if not isinstance(value, str) or not GROUP_NAME.fullmatch(value):
        raise ValueError(
            f"expected a group name of letters, digits, '.' or '-', got {_shown(value)}"
        )
    return value


def _endpoints(value: object, _min: float) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(
            f'expected a list of etcd URLs like ["https://etcd1:2379"], got {_shown(value)}'
        )
    endpoints = []
    for item in items:
        if not isinstance(item, str) or not _ENDPOINT.fullmatch(item):
            raise ValueError(f"expected http:// or https:// host:port URLs, got {_shown(item)}")
        endpoints.append(item.rstrip("/"))
    return tuple(endpoints)


def _slots(value: object, _min: float) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SLOTS:
        raise ValueError(
            f"expected a whole number of slots from 1 to {MAX_SLOTS}, got {_shown(value)}"
        )
    return value


def _file(value: object, _min: float) -> Path:
    # A NUL makes open() raise ValueError; other control characters are a typo, never a path.
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or not value.isprintable()
        or len(value) > 4096
    ):
        raise ValueError(
            f"expected an absolute file path without control characters, got {_shown(value)}"
        )
    return Path(value)


def _shown(value: object) -> str:
    """`value` for a message: repr (which escapes quotes, newlines and control characters), cut
    short so that a megabyte of junk does not become a megabyte of log."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# table -> key -> (UpdateConfig field, parser). The one place a new table or key is added.
_SCHEMA: Mapping[str, Mapping[str, tuple[str, _Parser]]] = MappingProxyType(
    {
        "update": MappingProxyType(
            {
                "url": ("url", _url),
                "channel": ("channel", _channel),
                "strategy": ("strategy", _strategy),
                "interval": ("interval", parse_interval),
                "reboot_delay": ("reboot_delay", _delay),
            }
        ),
        "fleet_lock": MappingProxyType(
            {"base_url": ("fleet_lock_url", _url), "group": ("fleet_lock_group", _group)}
        ),
        "etcd_lock": MappingProxyType(
            {
                "endpoints": ("etcd_endpoints", _endpoints),
                "group": ("etcd_group", _group),
                "slots": ("etcd_slots", _slots),
                "ca_file": ("etcd_ca_file", _file),
                "cert_file": ("etcd_cert_file", _file),
                "key_file": ("etcd_key_file", _file),
            }
        ),
    }
)
# Arrays of tables ([[name]]): table -> (UpdateConfig field, parser of one entry).
_ARRAY_TABLES: Mapping[str, tuple[str, Callable[[object], object]]] = MappingProxyType(
    {"window": ("windows", parse_window)}
)
_REQUIRED = ("url", "channel")
# What a strategy cannot work without: (field, how the operator sets it).
_STRATEGY_NEEDS: Mapping[Strategy, tuple[str, str]] = MappingProxyType(
    {
        Strategy.WINDOW: ("windows", "at least one [[window]] table"),
        Strategy.FLEET_LOCK: ("fleet_lock_url", "key 'fleet_lock.base_url'"),
        Strategy.ETCD_LOCK: ("etcd_endpoints", "key 'etcd_lock.endpoints'"),
    }
)


def _read(path: Path) -> dict[str, Any]:
    return toml_document(read_utf8(path, ConfigError), str(path), ConfigError)


def _fields(path: Path | str, doc: Mapping[str, Any], min_interval: float) -> dict[str, object]:
    values: dict[str, object] = {}
    for table, content in doc.items():
        if table in _ARRAY_TABLES:
            values.update(_array(path, table, content))
            continue
        keys = _SCHEMA.get(table)
        if keys is None:
            known = ", ".join([*(f"[{t}]" for t in _SCHEMA), *(f"[[{t}]]" for t in _ARRAY_TABLES)])
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


def _array(path: Path | str, table: str, content: object) -> dict[str, object]:
    field_name, parse = _ARRAY_TABLES[table]
    if not isinstance(content, list):
        raise ConfigError(f"{path}: '{table}' must be an array of tables ([[{table}]])")
    entries = []
    for number, entry in enumerate(content, 1):
        try:
            entries.append(parse(entry))
        except ValueError as e:
            raise ConfigError(f"{path}: [[{table}]] number {number}: {e}") from None
    return {field_name: tuple(entries)}


def _check_strategy(values: Mapping[str, object], origin: Mapping[str, Path | str]) -> None:
    """A strategy's own table must be there; TLS client certificate and key come together."""
    strategy = values.get("strategy", Strategy.IMMEDIATE)
    need = _STRATEGY_NEEDS.get(strategy)  # type: ignore[call-overload]
    if need is not None and not values.get(need[0]):
        raise ConfigError(f'{origin["strategy"]}: strategy "{strategy}" needs {need[1]}')
    cert, key = values.get("etcd_cert_file"), values.get("etcd_key_file")
    if (cert is None) != (key is None):
        given = "etcd_cert_file" if cert is not None else "etcd_key_file"
        raise ConfigError(
            f"{origin[given]}: keys 'etcd_lock.cert_file' and 'etcd_lock.key_file' go together "
            "(a client certificate needs its key)"
        )


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
    origin: dict[str, Path | str] = dict.fromkeys(values, default_path)
    if override_path.exists():
        overrides = _fields(override_path, _read(override_path), min_interval)
        values.update(overrides)
        origin.update(dict.fromkeys(overrides, override_path))
    missing = f"is missing and {override_path} does not set it"
    return _config(values, origin, default_path, missing)


def parse_defaults(text: str, source: str) -> UpdateConfig:
    """`text` as the image's defaults file alone (no override), or ConfigError naming `source`.

    The builder checks the update.toml it writes with this, so that an image never carries a
    file its own agent refuses.
    """
    values = _fields(source, toml_document(text, source, ConfigError), MIN_INTERVAL)
    return _config(values, dict.fromkeys(values, source), source, "is missing")


def _config(
    values: dict[str, object],
    origin: Mapping[str, Path | str],
    default_path: Path | str,
    missing: str,
) -> UpdateConfig:
    for key in _REQUIRED:
        if key not in values:
            raise ConfigError(f"{default_path}: key 'update.{key}' {missing}")
    _check_strategy(values, origin)
    base = UpdateConfig(url=str(values.pop("url")), channel=str(values.pop("channel")))
    return replace(base, **values)  # type: ignore[arg-type]


def parse_key(table: str, key: str, value: object) -> object:
    """One key's value as the agent takes it, or ValueError saying what was expected (the
    builder's check of an image definition's [update] table)."""
    return _SCHEMA[table][key][1](value, MIN_INTERVAL)


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

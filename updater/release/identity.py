"""Identifiers derived from /etc/machine-id, in the manner of sd_id128_get_machine_app_specific().

The machine id must not leak to the network (machine-id(5)): every use outside the machine gets
its own application-specific id, HMAC-SHA256 keyed with the machine id over a fixed application
key, so two applications' ids for the same machine do not correlate. Zincati identifies itself to
FleetLock servers the same way with its own application key; Berth uses its own, so a machine
running both would not collide.

Standard library only: this runs on the device's own Python.
"""

from __future__ import annotations

import hashlib
import hmac
import re

MACHINE_ID = re.compile(r"[0-9a-f]{32}")

# Berth's application key for the reboot-lock identity (FleetLock id, etcd semaphore holder).
LOCK_APP_KEY = bytes.fromhex("8f3a2b6c0d4e4f1a9b7c5d3e1f2a4b6c")


def app_specific_id(machine_id: str, app_key: bytes) -> bytes:
    """16 bytes derived from `machine_id` (32 hex digits) and `app_key`, as a v4 UUID.

    The version and variant bits are set like systemd's id128_make_v4_uuid(), so the result reads
    as a random UUID; the first bytes are untouched HMAC output.
    """
    text = machine_id.strip()
    if not MACHINE_ID.fullmatch(text):
        raise ValueError(f"machine id {machine_id!r} is not 32 lowercase hex digits")
    digest = bytearray(hmac.new(bytes.fromhex(text), app_key, hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x40
    digest[8] = (digest[8] & 0x3F) | 0x80
    return bytes(digest)


def lock_id(machine_id: str) -> str:
    """This machine's name as a reboot-lock holder: 32 lowercase hex digits."""
    return app_specific_id(machine_id, LOCK_APP_KEY).hex()

"""airlock's semaphore in etcd v3, through etcd's own HTTP/JSON gateway.

etcd serves its v3 API as JSON on the client port (grpc-gateway): `POST /v3/kv/range` reads a key,
`POST /v3/kv/txn` is a transaction. Keys and values are base64, 64-bit integers are strings, and
fields with their zero value are left out (a failed transaction has no "succeeded"). That gateway
is part of every etcd release since 3.3 (the `/v3/` prefix since 3.4), so the agent needs no gRPC
stack, only python3-requests, which the image has.

The compare-and-swap is one transaction: if the key's mod_revision is still the one read, put the
new value; otherwise read the key, so a lost race costs one round trip, not two. mod_revision
(not airlock's `version`) because it never repeats: a key deleted and created again starts its
version at 1 again, while mod_revision keeps counting. Both change on every write, so Berth and
airlock still exclude each other.

Endpoints are tried in order; a connection error moves on to the next one. TLS: a CA file to
verify the server, and a client certificate and key when etcd requires them (--client-cert-auth).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from updater.reboot.semaphore import LockError, Versioned

TIMEOUT = (5.0, 10.0)


def _b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class TLSFiles:
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def check(self) -> None:
        for name, path in (
            ("ca_file", self.ca_file),
            ("cert_file", self.cert_file),
            ("key_file", self.key_file),
        ):
            if path is not None and not path.is_file():
                raise LockError(f"etcd_lock.{name}: {path} does not exist or is not a file")


class EtcdStore:
    """`semaphore.Store` on etcd v3's JSON gateway."""

    def __init__(
        self,
        endpoints: Sequence[str],
        tls: TLSFiles | None = None,
        *,
        session: requests.Session | None = None,
        timeout: tuple[float, float] = TIMEOUT,
    ) -> None:
        if not endpoints:
            raise LockError("no etcd endpoints given")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.tls = tls or TLSFiles()
        self.tls.check()
        self.session = session or requests.Session()
        if self.tls.ca_file is not None:
            self.session.verify = str(self.tls.ca_file)
        if self.tls.cert_file is not None and self.tls.key_file is not None:
            self.session.cert = (str(self.tls.cert_file), str(self.tls.key_file))
        self.timeout = timeout

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors: list[str] = []
        for endpoint in self.endpoints:
            url = endpoint + path
            try:
                response = self.session.post(url, json=body, timeout=self.timeout)
            except requests.RequestException as e:
                errors.append(f"{url}: {e}")
                continue
            if response.status_code != 200:
                # A cluster answered and refused: another member would refuse alike.
                raise LockError(f"{url}: HTTP {response.status_code}: {response.text[:300]}")
            try:
                doc = response.json()
            except ValueError:
                raise LockError(f"{url}: not JSON: {response.text[:200]!r}") from None
            if not isinstance(doc, dict):
                raise LockError(f"{url}: expected a JSON object, got {response.text[:200]!r}")
            return doc
        raise LockError("no etcd endpoint answered: " + "; ".join(errors))

    @staticmethod
    def _versioned(doc: dict[str, Any]) -> Versioned:
        kvs = doc.get("kvs") or []
        if not kvs:
            return Versioned(None, 0)
        kv = kvs[0]
        try:
            return Versioned(base64.b64decode(kv.get("value", "")), int(kv["mod_revision"]))
        except (KeyError, ValueError, TypeError) as e:
            raise LockError(f"etcd answered a malformed key-value: {kv!r} ({e})") from None

    def get(self, key: str) -> Versioned:
        return self._versioned(self._post("/v3/kv/range", {"key": _b64(key)}))

    def compare_and_swap(self, key: str, revision: int, value: bytes) -> Versioned | None:
        k = _b64(key)
        doc = self._post(
            "/v3/kv/txn",
            {
                "compare": [
                    {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}
                ],
                "success": [{"request_put": {"key": k, "value": _b64(value)}}],
                "failure": [{"request_range": {"key": k}}],
            },
        )
        if doc.get("succeeded"):
            return None
        responses = doc.get("responses") or [{}]
        return self._versioned(responses[0].get("response_range") or {})

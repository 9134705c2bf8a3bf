"""berth-lockd: a FleetLock server backed by airlock's semaphore in etcd.

    python3 -m updater.reboot.lockd --etcd URL[,URL...] --listen HOST:PORT [--slots N]
                             [--ca-file F] [--cert-file F --key-file F]

For sites that want FleetLock (Berth's `fleet-lock` strategy, Zincati's `fleet_lock`) without
running Go's airlock. It keeps no state of its own: every request reads and compare-and-swaps the
group's semaphore in etcd (reboot.semaphore), so any number of replicas can serve the same fleet
behind one name, and it shares the semaphore with airlock and with `etcd-lock` machines.

    POST /v1/pre-reboot     200: the id holds a slot (now or already);
                            409 {"kind": "failed_lock_semaphore_full", ...}: all slots are held
    POST /v1/steady-state   200: the id holds no slot (released now or never held)

Errors are JSON {"kind": ..., "value": ...} as the protocol recommends: 400 for a malformed request
(missing `fleet-lock-protocol: true` header, bad JSON, empty id, bad group), 502 when etcd cannot
be reached. `--slots` is the slot count of a group whose semaphore does not exist yet; an existing
semaphore keeps its own (`berth-update lock slots N` changes it).

Runs on any host with Python 3.11+ and python3-requests; on Berth as berth-lockd.service.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from updater.reboot.etcdlock import EtcdStore, TLSFiles
from updater.reboot.semaphore import GROUP_NAME, LockError, SemaphoreClient, Store

log = logging.getLogger("berth-lockd")
MAX_BODY = 64 * 1024
PRE_REBOOT = "/v1/pre-reboot"
STEADY_STATE = "/v1/steady-state"


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, kind: str, value: str) -> None:
        super().__init__(value)
        self.status, self.kind, self.value = status, kind, value


def parse_request(header: str | None, body: bytes) -> tuple[str, str]:
    """(id, group) from a FleetLock request, or RequestError saying what is wrong."""
    if header != "true":
        raise RequestError(
            HTTPStatus.BAD_REQUEST, "missing_header", "header 'fleet-lock-protocol: true' missing"
        )
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(HTTPStatus.BAD_REQUEST, "bad_body", f"body is not JSON: {e}") from None
    params = doc.get("client_params") if isinstance(doc, dict) else None
    if not isinstance(params, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "bad_body", "field 'client_params' missing")
    # "node_uuid" is what the first airlock releases called the id.
    holder = params.get("id", params.get("node_uuid"))
    group = params.get("group")
    if not isinstance(holder, str) or not holder:
        raise RequestError(HTTPStatus.BAD_REQUEST, "bad_id", "field 'client_params.id' is empty")
    if not isinstance(group, str) or not GROUP_NAME.fullmatch(group):
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            "bad_group",
            f"field 'client_params.group' must match ^[a-zA-Z0-9.-]+$, got {group!r}",
        )
    return holder, group


class LockServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: Store, default_slots: int) -> None:
        self.store = store
        self.default_slots = default_slots
        self._thread: threading.Thread | None = None
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/"

    def handle_lock(self, path: str, holder: str, group: str) -> tuple[HTTPStatus, dict[str, Any]]:
        semaphore = SemaphoreClient(self.store, group, self.default_slots)
        if path == PRE_REBOOT:
            outcome = semaphore.acquire(holder)
            s = outcome.semaphore
            if not outcome.ok:
                return HTTPStatus.CONFLICT, {
                    "kind": "failed_lock_semaphore_full",
                    "value": f"semaphore of group {group} full: {len(s.holders)} of "
                    f"{s.total_slots} slots held",
                }
            if outcome.changed:
                log.info("%s: %s took a slot (%d/%d)", group, holder, len(s.holders), s.total_slots)
        else:
            outcome = semaphore.release(holder)
            s = outcome.semaphore
            if outcome.changed and holder not in s.holders:
                log.info(
                    "%s: %s released its slot (%d/%d)", group, holder, len(s.holders), s.total_slots
                )
        return HTTPStatus.OK, {}

    def start(self) -> LockServer:
        """Serve in a background thread (tests, embedding); `stop()` ends it."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    server: LockServer
    protocol_version = "HTTP/1.1"

    def _reply(self, status: HTTPStatus, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 <= length <= MAX_BODY:
                raise RequestError(HTTPStatus.BAD_REQUEST, "bad_body", "body too large")
            body = self.rfile.read(length)
            if path not in (PRE_REBOOT, STEADY_STATE):
                raise RequestError(HTTPStatus.NOT_FOUND, "not_found", f"no endpoint {path}")
            holder, group = parse_request(self.headers.get("fleet-lock-protocol"), body)
            status, doc = self.server.handle_lock(path, holder, group)
        except RequestError as e:
            status, doc = e.status, {"kind": e.kind, "value": e.value}
        except ValueError:
            status, doc = (
                HTTPStatus.BAD_REQUEST,
                {"kind": "bad_body", "value": "bad Content-Length"},
            )
        except LockError as e:
            log.error("%s", e)
            status, doc = HTTPStatus.BAD_GATEWAY, {"kind": "failed_etcd", "value": str(e)}
        self._reply(status, doc)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT like 0.0.0.0:8080, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _endpoints(text: str) -> list[str]:
    return [e for e in text.split(",") if e]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="berth-lockd", description=__doc__.splitlines()[0])
    p.add_argument(
        "--etcd",
        type=_endpoints,
        required=True,
        action="extend",
        help="etcd client URL(s), comma-separated or repeated",
    )
    p.add_argument("--listen", type=_listen, required=True, help="HOST:PORT to serve on")
    p.add_argument(
        "--slots",
        type=int,
        default=1,
        help="slot count of a group whose semaphore does not exist yet (default 1)",
    )
    p.add_argument("--ca-file", type=Path, help="CA to verify etcd's certificate")
    p.add_argument("--cert-file", type=Path, help="client certificate for etcd")
    p.add_argument("--key-file", type=Path, help="key of the client certificate")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="berth-lockd: %(message)s",
        stream=sys.stderr,
    )
    if args.slots < 1:
        print("berth-lockd: --slots must be at least 1", file=sys.stderr)
        return 2
    if (args.cert_file is None) != (args.key_file is None):
        print("berth-lockd: --cert-file and --key-file go together", file=sys.stderr)
        return 2
    try:
        store = EtcdStore(args.etcd, TLSFiles(args.ca_file, args.cert_file, args.key_file))
        server = LockServer(args.listen, store, args.slots)
    except (LockError, OSError) as e:
        print(f"berth-lockd: {e}", file=sys.stderr)
        return 1
    log.info("serving FleetLock on %s with etcd %s", server.url, ",".join(args.etcd))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Carry one TCP connection between this process's stdin/stdout and HOST:PORT, then exit.

QEMU's user-mode network runs this for every connection a guest opens to a `guestfwd=...-cmd:`
address (see `VMConfig.guest_forwards`): the guest's connection is stdin and stdout (and stderr,
which is why nothing is ever printed). Each direction is closed on its own, so a client that
sends a request and then shuts down its sending side still gets the whole answer.

    python3 relay.py HOST PORT

Standard library only; exit status 0 when both directions ended, 1 when HOST:PORT refused.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import sys

CHUNK = 64 * 1024
CONNECT_TIMEOUT = 10.0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _close_sending(fd: int) -> None:
    """End the data towards the client: a FIN if `fd` is a socket (QEMU's case), else close it.

    Under QEMU stdin, stdout and stderr are one socket; closing fd 1 alone would not end the
    connection while fds 0 and 2 still hold it, so shut the socket's sending side instead.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # not a socket: a pipe or a file
        os.close(fd)
        return
    try:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
    finally:
        sock.detach()


def relay(reader: int, writer: int, conn: socket.socket) -> None:
    """Copy reader→conn and conn→writer until both sides have closed their sending halves."""
    selector = selectors.DefaultSelector()
    selector.register(reader, selectors.EVENT_READ, "client")
    selector.register(conn, selectors.EVENT_READ, "server")
    open_directions = 2
    # Writes block: a peer that neither reads nor closes stalls its direction, which is fine for
    # one request/answer exchange at a time (HTTP to a metadata server).
    while open_directions:
        for key, _ in selector.select():
            if key.data == "client":
                try:
                    data = os.read(reader, CHUNK)
                except OSError:
                    data = b""
                if data:
                    conn.sendall(data)
                else:
                    selector.unregister(reader)
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_WR)
                    open_directions -= 1
            else:
                try:
                    data = conn.recv(CHUNK)
                except ConnectionError:
                    data = b""
                if data:
                    _write_all(writer, data)
                else:
                    selector.unregister(conn)
                    _close_sending(writer)
                    open_directions -= 1
    selector.close()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        return 2
    host, port = argv[1], int(argv[2])
    try:
        conn = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError:
        # The guest sees its connection closed, as if refused.
        return 1
    conn.settimeout(None)
    with conn:
        try:
            relay(sys.stdin.fileno(), sys.stdout.fileno(), conn)
        except (BrokenPipeError, ConnectionError):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

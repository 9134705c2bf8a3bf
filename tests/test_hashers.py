"""updater.disk.hashers: verity block digests from child processes, in order, or a clear error."""

from __future__ import annotations

import hashlib
import os
import signal
from collections import deque

import pytest

from updater.disk import hashers
from updater.errors import VerificationError

BLOCK = 4096


def reference(salt: bytes, data: bytes) -> bytes:
    return b"".join(
        hashlib.sha256(salt + data[i : i + BLOCK]).digest() for i in range(0, len(data), BLOCK)
    )


@pytest.mark.parametrize("count", [1, 2, 3])
def test_digests_come_back_in_the_order_of_the_data(count: int) -> None:
    # Pieces of every size up to past a slot (split over several), more of them in flight than
    # there are slots: the order must hold across children, slots and splits.
    salt = os.urandom(32)
    sizes = [1, 7, 256, 300, 1, 513, 64, 2]
    data = os.urandom(sum(sizes) * BLOCK)
    with hashers.HashProcesses(salt, count) as processes:
        jobs = []
        at = 0
        for size in sizes:
            jobs.append(processes.submit(memoryview(data)[at : at + size * BLOCK]))
            at += size * BLOCK
        # collected in any order: each child's answers are read in the order it gave them
        digests = [bytes(job.result()) for job in reversed(jobs)]
    assert b"".join(reversed(digests)) == reference(salt, data)


def test_a_bounded_queue_of_jobs_streams_through() -> None:
    # The agent's way: at most a few jobs waiting, the oldest collected first.
    salt = b"salt"
    piece = os.urandom(1 << 20)
    waiting: deque[hashers.Job] = deque()
    out = bytearray()
    with hashers.HashProcesses(salt) as processes:
        for _ in range(40):
            if len(waiting) >= 8:
                out += waiting.popleft().result()
            waiting.append(processes.submit(piece))
        while waiting:
            out += waiting.popleft().result()
    assert bytes(out) == reference(salt, piece) * 40


def test_a_piece_of_part_of_a_block_is_refused() -> None:
    with (
        hashers.HashProcesses(b"") as processes,
        pytest.raises(ValueError, match="not a whole number of blocks"),
    ):
        processes.submit(b"x" * (BLOCK + 1))


def test_a_child_that_dies_is_a_clear_refusal_not_a_hang() -> None:
    data = os.urandom(BLOCK)
    with hashers.HashProcesses(b"salt", 1) as processes:
        assert processes.submit(data).result() == reference(b"salt", data)
        child = processes._children[0].process
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        with pytest.raises(VerificationError, match=r"block hashing process .* stopped answering"):
            processes.submit(data).result()


def test_leaving_with_digests_not_collected_stops_the_children() -> None:
    # More digests than a pipe holds, never read: the children must still end.
    processes = hashers.HashProcesses(b"salt", 1)
    child = processes._children[0].process
    for _ in range(11):
        processes.submit(os.urandom(1 << 20))
    processes.close()
    assert child.returncode is not None


def test_without_an_interpreter_to_start_the_error_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("updater.disk.hashers.sys.executable", "/nonexistent/python3")
    with pytest.raises(VerificationError, match="cannot start a block hashing process"):
        hashers.HashProcesses(b"salt")

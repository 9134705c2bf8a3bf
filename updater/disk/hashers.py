"""Verity block digests computed in child processes, beside the download instead of inside it.

A root image's check is one salted sha256 per 4 KiB block. hashlib hands the GIL back during each
block, but the Python around it (a copy of the salted state, the digest, the append) holds it for
about a third of the time, so a hashing thread and the thread receiving the download take turns
instead of running on two cores: measured, the agent streamed root.erofs at half of what it
streams without hashing. A child process has a GIL of its own. Each child here is
`python -I -S -c <_CHILD>`: the standard library only, no site packages, nothing from the agent
to import, so it starts in milliseconds on a 512 MB machine and holds a few MB while it runs.

Protocol: the parent copies whole blocks into a slot of a shared memory file and writes the slot's
offset and length (two little-endian u32) to a child's stdin; the child answers on its stdout
with their digests, 32 bytes per block, in order. Each child answers in the order it was asked;
the parent hands slots round robin and reads answers in the same order, so the digests come back
in the order of the data.

Runs on the device: standard library only.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import IO

from updater.errors import VerificationError

BLOCK = 4096
_DIGEST = 32
_REQUEST = struct.Struct("<II")  # a slot's offset in the shared memory, the bytes it holds
_SLOT = 1 << 20
_SLOTS = 12  # the agent keeps 8 jobs of at most 1 MiB in flight: a slot is never waited for

# The child. Kept to the standard library and free of the parent's modules (-I -S).
_CHILD = r"""
import hashlib, mmap, os, sys
salted = hashlib.sha256(bytes.fromhex(sys.argv[2]))
shared = memoryview(mmap.mmap(int(sys.argv[1]), 0, prot=mmap.PROT_READ))
head = bytearray(8)
def job():
    got = 0
    while got < 8:
        n = os.readv(0, [memoryview(head)[got:]])
        if n == 0:
            if got:
                sys.exit(3)
            return False
        got += n
    at, size = int.from_bytes(head[:4], "little"), int.from_bytes(head[4:], "little")
    data = shared[at : at + size]
    out = bytearray()
    for start in range(0, size, 4096):
        digest = salted.copy()
        digest.update(data[start : start + 4096])
        out += digest.digest()
    view = memoryview(out)
    while view:
        view = view[os.write(1, view) :]
    return True
try:
    while job():
        pass
except BrokenPipeError:  # the parent stopped listening: it no longer wants these digests
    sys.exit(0)
"""


def process_count() -> int:
    """Children worth starting: two where there are two cores (measured here: two children
    hash twice as fast as one, alone, and the download and the writes run in the gaps), one on
    a single core, where a child still keeps the hashing out of the receiving thread's GIL."""
    return min(2, os.cpu_count() or 1)


@dataclass
class _Child:
    process: subprocess.Popen[bytes]
    stdin: IO[bytes]
    stdout: IO[bytes]
    waiting: deque[_Part] = field(default_factory=deque)  # asked for, not read yet, in order


class _Part:
    """One slot's worth of a job: its digests, read from its child when first asked for (with
    those of every part the child was given before it, which its answers come after)."""

    def __init__(self, owner: HashProcesses, child: _Child, size: int) -> None:
        self.owner = owner
        self.child = child
        self.size = size  # digest bytes
        self.digests: bytes | bytearray | None = None

    def read(self) -> bytes | bytearray:
        while self.digests is None:
            head = self.child.waiting.popleft()
            head.digests = self.owner._read(self.child, head.size)
        return self.digests


class Job:
    """Digests still being computed: `result()` waits for them, `exception()` is its error or
    None. Jobs may be collected in any order."""

    def __init__(self, parts: list[_Part]) -> None:
        self._parts = parts
        self._error: VerificationError | None = None

    def result(self) -> bytearray:
        if self._error is None:
            try:
                return bytearray().join(part.read() for part in self._parts)
            except VerificationError as e:
                self._error = e
        raise self._error

    def exception(self) -> VerificationError | None:
        try:
            self.result()
        except VerificationError as e:
            return e
        return None


class HashProcesses:
    """`count` children hashing blocks salted with `salt`. Use as a context manager: leaving
    stops the children (they exit on the end of their input).

    The data reaches them through shared memory, `_SLOTS` slots of `_SLOT` bytes used in turn
    (measured: a pipe costs as much CPU as the hashing it feeds); a pipe to each child carries
    only a slot's place and length, and its digests back. A slot is reused once the digests of
    what it last held have been read, which is after its child was done with it."""

    def __init__(self, salt: bytes, count: int | None = None) -> None:
        self._children: list[_Child] = []
        self._parts: list[_Part | None] = [None] * _SLOTS  # what each slot holds
        self._turn = 0  # jobs' slots, counted; the next goes to slot _turn % _SLOTS
        self._memory: mmap.mmap | None = None
        try:
            fd = os.memfd_create("berth-verity-blocks", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, _SLOTS * _SLOT)
                self._memory = mmap.mmap(fd, _SLOTS * _SLOT)
                for _ in range(count or process_count()):
                    self._children.append(self._start(fd, salt))
            finally:
                os.close(fd)
        except OSError as e:
            self.close()
            raise VerificationError(f"cannot start a block hashing process: {e}") from e

    @staticmethod
    def _start(fd: int, salt: bytes) -> _Child:
        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _CHILD, str(fd), salt.hex()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            pass_fds=(fd,),
        )
        assert process.stdin is not None and process.stdout is not None
        return _Child(process, process.stdin, process.stdout)

    def submit(self, piece: bytes | bytearray | memoryview) -> Job:
        """Hash the whole blocks `piece` is made of, a slot at a time, on the children in turn."""
        view = memoryview(piece).cast("B")
        if len(view) % BLOCK:
            raise ValueError(f"a piece of {len(view)} bytes is not a whole number of blocks")
        assert self._memory is not None
        parts = []
        for start in range(0, len(view), _SLOT):
            data = view[start : start + _SLOT]
            slot = self._turn % _SLOTS
            previous = self._parts[slot]
            if previous is not None:
                previous.read()  # the child is done with the slot; the digests wait in `previous`
            at = slot * _SLOT
            self._memory[at : at + len(data)] = data
            child = self._children[self._turn % len(self._children)]
            self._turn += 1
            self._write(child, _REQUEST.pack(at, len(data)))
            part = _Part(self, child, len(data) // BLOCK * _DIGEST)
            child.waiting.append(part)
            self._parts[slot] = part
            parts.append(part)
        return Job(parts)

    def _write(self, child: _Child, request: bytes) -> None:
        try:
            os.write(child.stdin.fileno(), request)  # 8 bytes into an empty-enough pipe: whole
        except OSError as e:
            raise self._failed(child, e) from e

    def _read(self, child: _Child, size: int) -> bytearray:
        out = bytearray(size)
        view = memoryview(out)
        got = 0
        try:
            while got < size:
                n = os.readv(child.stdout.fileno(), [view[got:]])
                if not n:
                    raise self._failed(child, "it closed its output")
                got += n
        except OSError as e:
            raise self._failed(child, e) from e
        return out

    def _failed(self, child: _Child, why: object) -> VerificationError:
        code = child.process.poll()
        status = "still running" if code is None else f"exit status {code}"
        return VerificationError(
            f"refused: the block hashing process {child.process.pid} stopped answering "
            f"({why}; {status}): the digests of the bytes it was given are lost"
        )

    def close(self) -> None:
        """Stop the children; digests not collected yet are dropped."""
        for child in self._children:
            for pipe in (child.stdin, child.stdout):  # a child blocked writing digests: EPIPE
                with contextlib.suppress(OSError):
                    pipe.close()
        for child in self._children:
            try:
                child.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        self._children.clear()
        self._parts = [None] * _SLOTS
        if self._memory is not None:
            self._memory.close()
            self._memory = None

    def __enter__(self) -> HashProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

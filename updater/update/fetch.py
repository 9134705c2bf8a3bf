"""Stream one payload file over HTTP into a slot partition (or any file) while hashing it.

The body goes from the socket straight to its place on the destination, a few MiB at a time: a
2 GB root image never sits in memory or on /var. Received bytes are staged in page-aligned
buffers that a helper thread writes out (with O_DIRECT on a slot partition, so the payload does
not crowd the page cache), while other helper threads hash them: the file's SHA-256 and, for a
root image, the verity digest of each block (pwrite and hashlib release the GIL). The receive,
the write and the hashes overlap instead of taking turns. Nothing is trusted until the very end,
when the SHA-256 of all `length` bytes (including any written by an earlier, interrupted
attempt, which are read back and hashed again) matches the trusted metadata. Refusals follow
python-tuf's downloader: endless data, short data, wrong hash, HTTP errors and slow retrieval.

Runs on the device: standard library and python3-requests (with its urllib3) only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import logging
import mmap
import os
import re
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import requests
import urllib3.exceptions

from updater.disk.hashers import HashProcesses, Job
from updater.disk.verity import BlockHashes
from updater.errors import (
    DownloadError,
    LengthMismatchError,
    SlowRetrievalError,
    StorageError,
    VerificationError,
)
from updater.files import write_file_atomic
from updater.release.document import json_object
from updater.update.machine import FetchOptions

log = logging.getLogger(__name__)

MiB = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
# Statuses worth another attempt: the server or a proxy is overloaded or restarting. Anything else
# (404, 403, 410, ...) will not change by asking again within one run.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_STATE_FORMAT = 1


class _Transient(Exception):
    """Internal: this attempt failed in a way a later attempt (resuming) may get past."""

    def __init__(self, error: DownloadError) -> None:
        super().__init__(str(error))
        self.error = error


# Hash jobs (a received chunk each) queued but not yet done: enough to keep the hash threads
# busy, little memory.
_IN_FLIGHT = 8
# O_DIRECT wants the position, the length and the memory of each write aligned to the device's
# logical block size; 4 KiB covers 512-byte and 4Kn disks and is the page size.
_BLOCK = 4096
_STAGE = 4 * MiB  # bytes per staged write: large enough that the syscall cost vanishes
_STAGES = 3  # one filling while two wait for (or are in) the write thread


# Verity digests on their way: a child process's job, or a thread's future.
_Digesting = Job | Future[bytearray]


def _round_down(n: int) -> int:
    return n - n % _BLOCK


def _round_up(n: int) -> int:
    return _round_down(n + _BLOCK - 1)


@dataclass
class _Progress:
    """What one `stream_to` call has received so far, across its attempts. Outside a
    `_Writer` (or after its `drain`), every byte counted in `done` is written and hashed."""

    hasher: Any  # hashlib's type is private; a sha256 object, None when the file's sha256 is not
    # checked (a root image: its verity tree is the check, see stream_to)
    blocks: BlockHashes | None = None  # the caller's verity digests of the same bytes
    done: int = 0
    saved: int = 0  # `done` as last recorded in the state file
    saved_at: float = field(default_factory=time.monotonic)  # when

    def restart(self) -> None:
        if self.hasher is not None:
            self.hasher = hashlib.sha256()
        if self.blocks is not None:
            self.blocks.reset()
        self.done = 0
        self.saved = 0

    def hash(self, data: bytes) -> None:
        if self.hasher is not None:
            self.hasher.update(data)
        if self.blocks is not None:
            self.blocks.update(data)


@dataclass(frozen=True)
class _Knobs:
    """What one `stream_to` call was asked for, passed down to each attempt."""

    timeout: tuple[float, float]  # (connect, read) seconds
    min_rate: int
    rate_window: float
    chunk: int
    state_interval: int
    state_seconds: float
    save: Callable[[], None]  # record progress (after the writes are drained)
    report: Callable[[int], None] | None


class _Stage:
    """A page-aligned buffer of received bytes on their way to the destination.

    The bytes sit from index `lead` (their first position modulo the block size) on, so a block
    boundary on disk is a page boundary in memory: everything between the first and the last
    boundary goes out in one O_DIRECT write straight from here. Only a stage that starts or
    ends between boundaries (after a resume, or when the writes are drained before a state
    record) has a head or tail of less than a block to write through the page cache.
    """

    def __init__(self) -> None:
        self.memory = mmap.mmap(-1, _STAGE + _BLOCK)
        self.view = memoryview(self.memory)
        self.reset(0)

    def reset(self, start: int) -> None:
        self.start = start
        self.lead = start % _BLOCK
        self.end = self.lead  # index after the last byte staged

    def position(self, index: int) -> int:
        return self.start - self.lead + index

    def take(self, data: memoryview) -> int:
        """Stage as much of `data` as fits; return how much that was."""
        n = min(len(data), len(self.memory) - self.end)
        self.view[self.end : self.end + n] = data[:n]
        self.end += n
        return n

    @property
    def full(self) -> bool:
        return self.end == len(self.memory)


@dataclass
class _Destination:
    """Where the bytes go: `fd` through the page cache, and `direct` (the same file opened with
    O_DIRECT) for whole aligned blocks when the caller asked for it and the file allows it."""

    url: str
    fd: int
    direct: int | None = None

    @classmethod
    def open(cls, url: str, fd: int, direct: bool) -> _Destination:
        dest = cls(url, fd)
        if direct:
            try:
                dest.direct = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT)
            except OSError as e:
                log.debug("%s: no O_DIRECT here (%s), writing through the page cache", url, e)
        return dest

    def close(self) -> None:
        if self.direct is not None:
            os.close(self.direct)
            self.direct = None

    def write(self, stage: _Stage, stop: int) -> None:
        """Write stage bytes [lead, stop): a head up to the first block boundary and a tail after
        the last one through the page cache, the aligned middle with O_DIRECT."""
        head = min(stop, _round_up(stage.lead))
        body = max(head, _round_down(stop))
        self._pwrite(self.fd, stage.view[stage.lead : head], stage.position(stage.lead))
        self._pwrite(self.direct, stage.view[head:body], stage.position(head))
        self._pwrite(self.fd, stage.view[body:stop], stage.position(body))

    def _pwrite(self, fd: int | None, view: memoryview, position: int) -> None:
        try:
            while view:
                if fd is None:
                    fd = self.fd
                try:
                    written = os.pwrite(fd, view, position)
                except OSError as e:
                    if fd != self.direct or e.errno != errno.EINVAL:
                        raise
                    # A file system or device that refuses this alignment: the page cache
                    # it is, for the rest of the download.
                    log.debug("%s: O_DIRECT write refused (%s), using the page cache", self.url, e)
                    self.close()
                    fd = None
                    continue
                if written == 0:  # the end of a device: nothing more fits
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view, position = view[written:], position + written
        except OSError as e:
            raise StorageError(
                f"refused {self.url}: writing at offset {position} failed: {e}"
            ) from e


@dataclass(frozen=True)
class _Pools:
    """One thread writes, one computes the file's sha256 (when it is checked); the verity
    digests of its blocks (when asked for) are computed by child processes (hashers.py says
    why), or by one more thread where none can start. Each keeps the order of the work it is
    given; the verity digests come back as results, added in order by the `_Writer`. (A second
    verity thread was slower: 4 KiB hashes hand the GIL back and forth between the two.) The
    staging buffers live as long as the threads, across attempts (and are unmapped when the
    last reference goes: a traceback may still hold a view of one)."""

    write: ThreadPoolExecutor
    hash: ThreadPoolExecutor
    blocks: ThreadPoolExecutor
    stages: list[_Stage]
    processes: HashProcesses | None

    @classmethod
    def start(cls, blocks: BlockHashes | None) -> _Pools:
        processes = None
        if blocks is not None:
            try:
                processes = HashProcesses(blocks.salt)
            except VerificationError as e:
                log.warning("%s; hashing on a thread instead", e)
        return cls(
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="berth-write"),
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="berth-hash"),
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="berth-verity"),
            [_Stage() for _ in range(_STAGES)],
            processes,
        )

    def digest(self, blocks: BlockHashes, piece: bytes | memoryview) -> _Digesting:
        if self.processes is None:
            return self.blocks.submit(blocks.hash_blocks, piece)
        if len(piece) > _BLOCK:
            return self.processes.submit(piece)
        # The block a read's end cut in two, completed by the next read: hashed here, in
        # microseconds, rather than sent to a child as a job of its own (half of all jobs).
        done: Future[bytearray] = Future()
        done.set_result(blocks.hash_blocks(piece))
        return done

    def shutdown(self) -> None:
        self.write.shutdown()
        self.hash.shutdown()
        self.blocks.shutdown()
        if self.processes is not None:
            self.processes.close()


class _Writer:
    """Stages chunks, writes them at their place on the destination and hashes them, in order,
    on helper threads; the caller goes on receiving. `drain` waits until all are written and
    hashed and raises a write error; leaving the block drains too, so no write outlives an
    attempt."""

    def __init__(self, pools: _Pools, dest: _Destination, offset: int, progress: _Progress):
        self.pools = pools
        self.dest = dest
        self.progress = progress
        self.hashing: deque[Future[None]] = deque()
        self.digesting: deque[_Digesting] = deque()  # verity digests, in order
        self.writing: deque[tuple[Future[None], _Stage]] = deque()
        self.free = list(pools.stages)
        self.stage = self.free.pop()
        self.stage.reset(offset + progress.done)

    def submit(self, data: bytes) -> None:
        """Write `data` next (after `progress.done`), hash it after everything before, count it."""
        while len(self.hashing) >= _IN_FLIGHT:
            self.hashing.popleft().result()
        if self.progress.hasher is not None:
            self.hashing.append(self.pools.hash.submit(self.progress.hasher.update, data))
        blocks = self.progress.blocks
        if blocks is not None:
            while len(self.digesting) >= _IN_FLIGHT:
                blocks.add(self.digesting.popleft().result())
            for piece in blocks.pieces(data):
                self.digesting.append(self.pools.digest(blocks, piece))
        view = memoryview(data)
        while view:
            view = view[self.stage.take(view) :]
            if self.stage.full:
                self._flush()
        self.progress.done += len(data)

    def _flush(self) -> None:
        """Hand the current stage to the write thread and start the next one after it."""
        stage = self.stage
        if stage.end == stage.lead:
            return
        self.writing.append((self.pools.write.submit(self.dest.write, stage, stage.end), stage))
        if not self.free:
            done, spare = self.writing.popleft()
            done.result()
            self.free.append(spare)
        self.stage = self.free.pop()
        self.stage.reset(stage.position(stage.end))

    def drain(self) -> None:
        self._flush()
        while self.writing:
            done, stage = self.writing.popleft()
            done.result()
            self.free.append(stage)
        while self.hashing:
            self.hashing.popleft().result()
        blocks = self.progress.blocks
        while self.digesting:
            digests = self.digesting.popleft().result()
            if blocks is not None:
                blocks.add(digests)

    def __enter__(self) -> _Writer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if error is None:
            self.drain()
            return
        # Leaving on an error: still write what was counted (a later attempt goes on after it)
        # and wait for every write, so that none lands after the caller saved its state or
        # started over. A failed write is the error worth reporting: the disk, not the
        # network, is what the operator has to look at.
        try:
            self._flush()
        except StorageError as e:
            failures: list[BaseException | None] = [e]
        else:
            failures = []
        futures: list[Future[Any]] = [f for f, _ in self.writing]
        futures += self.hashing
        failures += [f.exception() for f in futures]  # exception() waits for each
        # The bytes handed over are counted in `progress.done`, and a retry goes on after them:
        # their digests must be in `blocks`, in order, or the tree would miss them.
        blocks = self.progress.blocks
        for job in self.digesting:
            failure = job.exception()
            failures.append(failure)
            if failure is None and blocks is not None:
                blocks.add(job.result())
        self.writing.clear()
        self.hashing.clear()
        self.digesting.clear()
        failure = next((f for f in failures if f is not None), None)
        if failure is not None and not isinstance(error, StorageError):
            raise failure from error


def _load_state(path: Path, sha256: str, length: int, offset: int) -> int:
    """Bytes a previous attempt recorded as written for this very target, or 0.

    Anything unexpected restarts from 0: the state file only saves time, it is never trusted
    (the bytes it points at are hashed again).
    """
    try:
        doc = json_object(path.read_bytes(), str(path), ValueError)
    except (OSError, ValueError):
        return 0
    if (
        doc.get("format") != _STATE_FORMAT
        or doc.get("sha256") != sha256
        or doc.get("length") != length
        or doc.get("offset") != offset
    ):
        return 0
    done = doc.get("done")
    if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= length:
        return 0
    return done


def _save_state(
    path: Path, url: str, sha256: str, length: int, offset: int, fd: int, done: int
) -> None:
    # The data must be on disk before the record that points past it: otherwise a crash leaves a
    # state file claiming bytes that were lost, and the resumed download fails its hash at the end.
    os.fsync(fd)
    doc = {
        "format": _STATE_FORMAT,
        "url": url,
        "sha256": sha256,
        "length": length,
        "offset": offset,
        "done": done,
    }
    write_file_atomic(path, (json.dumps(doc, indent=2) + "\n").encode())


def _clear_state(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _rehash(fd: int, offset: int, done: int, chunk: int, progress: _Progress) -> None:
    """Hash again what an earlier attempt wrote, reading it back from the destination."""
    position = 0
    while position < done:
        try:
            data = os.pread(fd, min(chunk, done - position), offset + position)
        except OSError as e:
            raise StorageError(
                f"refused to resume: reading back {done} bytes already written at offset "
                f"{offset} failed: {e}"
            ) from e
        if not data:
            # The destination is shorter than the state file says (a file was truncated).
            progress.restart()
            return
        progress.hash(data)
        position += len(data)
    progress.done = done
    progress.saved = done


def _parse_content_range(url: str, value: str | None, start: int, length: int) -> None:
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if match is None:
        raise DownloadError(
            f"refused {url}: a 206 answer to 'Range: bytes={start}-' carries no usable "
            f"Content-Range (got {value!r})",
            url=url,
            status=206,
        )
    first, last, total = int(match[1]), int(match[2]), match[3]
    if total != "*" and int(total) != length:
        raise LengthMismatchError(
            f"refused {url}: the server says the file is {total} bytes, "
            f"the trusted metadata says {length}"
        )
    if first != start or last != length - 1:
        raise DownloadError(
            f"refused {url}: asked for bytes {start}-{length - 1}, the server sent {first}-{last}",
            url=url,
            status=206,
        )


def _check_status(url: str, response: requests.Response, progress: _Progress) -> None:
    """Accept 200/206, restart on an ignored Range, else raise (transient or not)."""
    status = response.status_code
    asked_range = progress.done > 0
    if status == 200:
        if asked_range:
            # The server ignored Range and sends the whole file: take it from byte 0.
            log.info("%s: server ignored Range, restarting from byte 0", url)
            progress.restart()
        return
    if status == 206 and asked_range:
        return
    reason = response.reason or http.client.responses.get(status, "")
    if status == 416 and asked_range:
        # The server's file is shorter than what we already have: start over (the hash decides).
        error = DownloadError(
            f"refused {url}: HTTP 416 {reason} for 'Range: bytes={progress.done}-'",
            url=url,
            status=status,
        )
        progress.restart()
        raise _Transient(error)
    error = DownloadError(f"refused {url}: HTTP {status} {reason}".rstrip(), url=url, status=status)
    if status in _TRANSIENT_STATUS:
        raise _Transient(error)
    raise error


def _attempt(
    url: str,
    session: requests.Session,
    pools: _Pools,
    dest: _Destination,
    offset: int,
    length: int,
    progress: _Progress,
    knobs: _Knobs,
) -> None:
    """One HTTP request: write from `progress.done` on, until `length` or an error."""
    # identity: a compressed body would not line up with Range offsets or the trusted hash.
    headers = {"Accept-Encoding": "identity"}
    if progress.done:
        headers["Range"] = f"bytes={progress.done}-"
    try:
        response = session.get(url, headers=headers, stream=True, timeout=knobs.timeout)
    except requests.RequestException as e:
        raise _Transient(DownloadError(f"refused {url}: request failed: {e}", url=url)) from e
    with response:
        start = progress.done
        _check_status(url, response, progress)
        if response.status_code == 206:
            _parse_content_range(url, response.headers.get("Content-Range"), start, length)
        expected = length - progress.done
        declared = response.headers.get("Content-Length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise DownloadError(
                    f"refused {url}: invalid Content-Length {declared!r}",
                    url=url,
                    status=response.status_code,
                )
            if int(declared) != expected:
                raise LengthMismatchError(
                    f"refused {url}: the server offers {declared} bytes from byte "
                    f"{progress.done}, the trusted metadata leaves {expected}"
                )
        with _Writer(pools, dest, offset, progress) as writer:
            _receive(url, response, writer, length, progress, knobs)
        if progress.done < length:
            if declared is None:
                # A clean end without a declared length (the last chunk, or a close-delimited
                # body): the server says this is all. A torn chunked body raises in read1 above.
                raise LengthMismatchError(
                    f"refused {url}: the server sent {progress.done} bytes, "
                    f"the trusted metadata says {length} (short data)"
                )
            raise _Transient(
                DownloadError(
                    f"refused {url}: the connection closed after {progress.done} of {length} bytes",
                    url=url,
                    status=response.status_code,
                )
            )


def _receive(
    url: str,
    response: requests.Response,
    writer: _Writer,
    length: int,
    progress: _Progress,
    knobs: _Knobs,
) -> None:
    """Read the body into `writer` until it ends, `length` is passed, or the rate is too low."""
    raw = response.raw
    window_start = time.monotonic()
    window_bytes = 0
    while True:
        # Once `length` bytes are in, one more read of a single byte must find the end: a
        # server that keeps sending is caught at byte length + 1, and no further.
        want = min(knobs.chunk, length - progress.done) or 1
        try:
            # read1 returns whatever has arrived (at least one byte), so the rate check below
            # runs even when a hostile server trickles one byte per read timeout.
            data: bytes = raw.read1(want, decode_content=False)
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as e:
            raise _Transient(
                DownloadError(
                    f"refused {url}: connection failed after {progress.done} of {length} "
                    f"bytes: {e}",
                    url=url,
                    status=response.status_code,
                )
            ) from e
        if not data:
            break
        if progress.done + len(data) > length:
            raise LengthMismatchError(
                f"refused {url}: the server sent more than the trusted length of "
                f"{length} bytes (endless data)"
            )
        writer.submit(data)
        window_bytes += len(data)
        if knobs.report is not None:
            knobs.report(progress.done)
        if (
            progress.done - progress.saved >= knobs.state_interval
            and time.monotonic() - progress.saved_at >= knobs.state_seconds
        ):
            writer.drain()  # the state file may only point past bytes that are written
            knobs.save()
        now = time.monotonic()
        if knobs.min_rate and now - window_start >= knobs.rate_window:
            rate = window_bytes / (now - window_start)
            if rate < knobs.min_rate:
                raise _Transient(
                    SlowRetrievalError(
                        f"refused {url}: {rate:.0f} bytes/s over the last "
                        f"{now - window_start:.1f} s is below the minimum of {knobs.min_rate} "
                        "bytes/s (slow retrieval)",
                        url=url,
                        status=response.status_code,
                    )
                )
            window_start, window_bytes = now, 0


def stream_to(
    url: str,
    dest: BinaryIO,
    offset: int,
    length: int,
    sha256: str,
    *,
    options: FetchOptions | None = None,
    session: requests.Session | None = None,
    state_path: Path | None = None,
    resume: bool = True,
    chunk: int = MiB,
    progress: Callable[[int], None] | None = None,
    direct: bool = False,
    blocks: BlockHashes | None = None,
    check_sha256: bool = True,
) -> None:
    """Download `url` into `dest` at `offset`; its `length` bytes must hash to `sha256`.

    Without `check_sha256` (a root image, whose `blocks` and hash tree are its check: see
    install.py), the bytes are hashed once, into `blocks`, and `sha256` only names the download
    in the state file.

    `options` are the limits (FetchOptions, whose defaults are the device's). `dest` is an open
    block device or file (read-write, for resuming). With `state_path`, the bytes written so far
    are recorded there (at most every `options.state_interval` bytes and `options.state_seconds`,
    after an fsync of `dest`),
    and a later call with `resume` reads them back, hashes them again and asks the server only
    for the rest (HTTP Range). Transient failures (connection reset, timeout, 5xx, slow
    retrieval) are retried within this call up to `options.attempts` times, resuming each time,
    with exponential backoff from `options.backoff` seconds. `options.timeout` is (connect, read)
    in seconds; `options.min_rate` bytes/s averaged over `options.rate_window` seconds defends
    against slow retrieval (0 turns the check off). `chunk` is the most read from the socket at
    once. `progress` is called with the number of bytes done. With `direct`, whole aligned blocks
    are written with O_DIRECT where the destination allows it (a slot partition): no copy of the
    payload passes through the page cache, where it would push out the running containers'
    files. `blocks` (fresh, or reset) is fed the same bytes in order, including any read back to
    resume, on threads of their own.

    Raises DownloadError (or SlowRetrievalError) when the transfer fails, LengthMismatchError
    for endless or short data, VerificationError when the bytes written do not hash to `sha256`:
    then the destination holds garbage and the state file is removed, so the next call starts over.
    """
    opts = options or FetchOptions()
    attempts = opts.attempts
    sha256 = sha256.lower()
    if not _HEX64.fullmatch(sha256):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    if not check_sha256 and blocks is None:
        raise ValueError("a download whose sha256 is not checked needs its block digests")
    if length < 0 or offset < 0 or chunk <= 0 or attempts < 1:
        raise ValueError(
            f"invalid length {length}, offset {offset}, chunk {chunk} or attempts {attempts}"
        )
    dest.flush()
    fd = dest.fileno()
    state = _Progress(hashlib.sha256() if check_sha256 else None, blocks)
    if blocks is not None:
        blocks.reset()
    if state_path is not None and resume:
        done = _load_state(state_path, sha256, length, offset)
        if done:
            _rehash(fd, offset, done, chunk, state)
            log.info("%s: resuming after %d of %d bytes", url, state.done, length)

    def save() -> None:
        if state_path is not None:
            try:
                _save_state(state_path, url, sha256, length, offset, fd, state.done)
            except OSError as e:
                raise StorageError(f"cannot record download progress in {state_path}: {e}") from e
        state.saved = state.done
        state.saved_at = time.monotonic()

    own_session = session is None
    client = requests.Session() if session is None else session
    knobs = _Knobs(
        opts.timeout,
        opts.min_rate,
        opts.rate_window,
        chunk,
        opts.state_interval,
        opts.state_seconds,
        save,
        progress,
    )
    pools = _Pools.start(blocks)
    target = _Destination.open(url, fd, direct)
    try:
        attempt = 0
        while state.done < length:
            attempt += 1
            try:
                _attempt(url, client, pools, target, offset, length, state, knobs)
            except _Transient as transient:
                save()
                if attempt >= attempts:
                    raise transient.error from transient.__cause__
                delay = min(opts.backoff * 2 ** (attempt - 1), 60.0)
                log.warning(
                    "%s (attempt %d of %d); retrying in %.1f s",
                    transient.error,
                    attempt,
                    attempts,
                    delay,
                )
                time.sleep(delay)
    except VerificationError:
        # Endless or short data: what is on disk is not trustworthy, do not resume from it.
        _clear_state(state_path)
        raise
    finally:
        pools.shutdown()
        target.close()
        if own_session:
            client.close()

    try:
        os.fsync(fd)
    except OSError as e:
        raise StorageError(f"flushing {length} bytes from {url} to disk failed: {e}") from e
    digest = sha256 if state.hasher is None else state.hasher.hexdigest()
    if digest != sha256:
        _clear_state(state_path)
        raise VerificationError(
            f"refused {url}: its {length} bytes hash to sha256 {digest}, "
            f"the trusted metadata says {sha256}"
        )
    _clear_state(state_path)

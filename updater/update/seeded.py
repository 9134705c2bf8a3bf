"""Seeded writes: a release file put together from the blocks this machine already has, the rest
fetched by HTTP range requests from the same static repository.

The new file's block digests come from a trusted source: for root.erofs the bottom level of its
dm-verity tree (root.verity, checked against its signed sha256 before this runs), for the UKI and
for root.verity itself their block index targets (updater/release/blockindex.py). A seed (the
booted slot's root or tree, the booted UKI, or the half-written destination itself after an
interrupted apply) is never trusted: a block is copied from it only after its bytes, read here,
hash to the digest the new file wants. The same holds for a block fetched from the server. So
every block written is one the release names, whatever a seed or a server holds; a seed block
that does not match (corrupted on disk) is fetched instead, and a server block that does not
match is asked for again.

The booted root is read from its partition, never through its dm-verity device: a corrupted
block there would make dm-verity restart the machine (restart-on-corruption); read raw, it is
only a block that does not match.

Range requests ask for each missing run as it is, as long as there are at most `MAX_RANGES` runs;
beyond that the runs with the smallest gaps between them are merged (the blocks in those gaps are
fetched although the machine has them) until they fit. A part of a multipart answer costs about
100 bytes of headers and a block 4096, so merging only pays when the bound forces it. Up to
`PER_REQUEST` ranges go in one request (multipart/byteranges). Whatever a server does, the result
is a correct file or an exception:

- it ignores a multi-range request (200, or 416: object stores and some CDNs answer only single
  ranges): the rest goes one range per request;
- it ignores Range altogether (200 to one range), or answers 416 to one: `Unseedable`, and the
  caller streams the whole file;
- its multipart answer is malformed, or a part lies outside what was asked: the rest goes one
  range per request;
- its bytes are not the ones asked for: those blocks are asked for again, in a later round;
- rounds are bounded by the download attempts; what is still missing then is `Unseedable`.

Runs on the device: standard library and python3-requests only.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import struct
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import compress, repeat
from operator import eq, itemgetter, mul
from typing import Any

import requests
import urllib3.exceptions

from updater.errors import DownloadError, StorageError, VerificationError
from updater.release.blockindex import BLOCK, DIGEST, block_count
from updater.update.machine import FetchOptions

log = logging.getLogger(__name__)

MAX_RANGES = 1024  # ranges per file, before the closest runs are merged
# Ranges per multipart request: a Range header of about 1.3 KB (servers take 8 KB), and a file
# of MAX_RANGES runs in 16 requests.
PER_REQUEST = 64
# Below this share of the file found on the machine, streaming it whole (O_DIRECT, resumable
# by offset, no per-block bookkeeping) costs about the same bytes and less time.
MIN_REUSE = 0.1
_RUN = 256  # blocks read from a seed, or from a part of a response, at once (1 MiB)
_LINE = 1024  # the longest header line of a multipart part accepted
_LINES = 16  # the most header lines of one part
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))')

# What fills each block of the new file (`_Plan.source`): a seed block's number plus the seed's
# index times `_SEED`, or one of these.
_FETCH = -1  # still to be fetched
_KEPT = -2  # already in the destination (an interrupted apply wrote it)
_DONE = -3  # written here, from a seed or the server
# 32-bit entries (a 2 GiB root's plan is 2 MiB, not 4, at the apply's peak): a file of up to
# 2^28 blocks (1 TiB) from up to 7 seeds.
_SEED = 1 << 28
_MAX_SEEDS = 7
_SOURCE = "i"


class Unseedable(Exception):
    """The file cannot be completed from ranges: the caller streams it whole."""


class _Botched(Exception):
    """A response that is not the ranges asked for, in its framing: ask one range at a time."""


class _Transient(Exception):
    """A request failed in a way a later round may get past (connection, timeout, 5xx)."""


@dataclass(frozen=True)
class BlockHash:
    """How the digests of a file's blocks are made: dm-verity's sha256(salt || block), or a block
    index's plain sha256 (`salt` None)."""

    salt: bytes | None

    def start(self) -> Any:
        return None if self.salt is None else hashlib.sha256(self.salt)

    def digest(self, salted: Any, block: bytes | memoryview) -> bytes:
        if salted is None:
            return hashlib.sha256(block).digest()
        h = salted.copy()
        h.update(block)
        digest: bytes = h.digest()
        return digest


@dataclass(frozen=True)
class Wanted:
    """The file to write: where it is served, its signed length, and its trusted block digests."""

    name: str
    url: str
    length: int
    digests: bytes | bytearray | memoryview
    hash: BlockHash


# (first, end) -> the digests of a seed's blocks first..end-1, 32 bytes each
DigestReader = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Seed:
    """Bytes on this machine that may hold blocks of the new file, at `offset` of `fd`.
    `digests` reads its blocks' digests made the same way, when they are stored (the booted
    tree's bottom level); None computes them by reading the seed. Either way they are read a
    chunk at a time, never held whole: a 2 GiB root has 16 MiB of them."""

    name: str
    fd: int
    offset: int
    length: int
    digests: DigestReader | None = None


@dataclass
class Transfer:
    """What one seeded write cost: bytes received, bytes taken from this machine."""

    fetched: int = 0  # response body bytes of range requests (gap blocks and refetches included)
    reused: int = 0  # bytes of the file copied from a seed or found already in place
    requests: int = 0
    rejected: int = 0  # blocks whose bytes did not match their digest (a seed's or a server's)

    def add(self, other: Transfer) -> None:
        self.fetched += other.fetched
        self.reused += other.reused
        self.requests += other.requests
        self.rejected += other.rejected


@dataclass
class _Plan:
    wanted: Wanted
    fd: int  # the destination
    offset: int
    source: array[int]
    transfer: Transfer
    report: Callable[[int, int], None] | None  # (bytes of the file done, of them reused)
    done: int = 0

    @property
    def blocks(self) -> int:
        return len(self.source)

    def size(self, i: int) -> int:
        return min(BLOCK, self.wanted.length - i * BLOCK)

    def want(self, i: int) -> bytes | bytearray | memoryview:
        return self.wanted.digests[i * DIGEST : (i + 1) * DIGEST]

    def progress(self, count: int, reused: bool) -> None:
        self.done += count
        if reused:
            self.transfer.reused += count
        if self.report is not None:
            self.report(self.done, self.transfer.reused)

    def write(self, i: int, data: bytes | memoryview) -> None:
        position = self.offset + i * BLOCK
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self.fd, view, position)
                if written == 0:
                    raise OSError("no space left on the device")
                view, position = view[written:], position + written
        except OSError as e:
            raise StorageError(
                f"writing {self.wanted.name} at offset {self.offset + i * BLOCK} failed: {e}"
            ) from e


def _accept(plan: _Plan, first: int, data: memoryview, reused: bool, salted: Any) -> None:
    """Blocks first, first + 1, ... of the new file in `data` (the last maybe short): write the
    ones still missing whose bytes hash to their digests, each run of them in one write; a
    missing block that does not match stays missing."""
    run_start = None  # the first block of the run being gathered
    count = -(-len(data) // BLOCK)
    for k in range(count + 1):
        ok = False
        if k < count:
            i = first + k
            block = data[k * BLOCK : k * BLOCK + BLOCK]
            if plan.source[i] == _FETCH and len(block) == plan.size(i):
                ok = plan.wanted.hash.digest(salted, block) == plan.want(i)
                if ok:
                    plan.source[i] = _DONE
                else:
                    plan.transfer.rejected += 1
        if ok and run_start is None:
            run_start = k
        elif not ok and run_start is not None:
            piece = data[run_start * BLOCK : k * BLOCK]
            plan.write(first + run_start, piece)
            plan.progress(len(piece), reused)
            run_start = None


def _pread(fd: int, size: int, position: int, what: str) -> bytes:
    try:
        return os.pread(fd, size, position)
    except OSError as e:
        raise StorageError(f"reading {what} at offset {position} failed: {e}") from e


def _drop_cache(fd: int, offset: int, length: int) -> None:
    """Bytes read or written once and never again this boot: out of the page cache, so that an
    update does not push out the running containers' files."""
    with contextlib.suppress(OSError):  # advice only
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _computed(seed: Seed, hash: BlockHash) -> DigestReader:
    """A reader of `seed`'s digests that hashes its blocks, read a MiB at a time."""
    salted = hash.start()

    def read(first: int, end: int) -> bytes:
        out = bytearray()
        stop = min(end * BLOCK, seed.length)
        for at in range(first * BLOCK, stop, _RUN * BLOCK):
            size = min(_RUN * BLOCK, stop - at)
            data = memoryview(_pread(seed.fd, size, seed.offset + at, seed.name))
            _drop_cache(seed.fd, seed.offset + at, size)
            for start in range(0, len(data), BLOCK):
                out += hash.digest(salted, data[start : start + BLOCK])
        return bytes(out)

    return read


def _keep_in_place(plan: _Plan) -> None:
    """Blocks an interrupted apply of the same file already wrote (and that survived): kept."""
    salted = plan.wanted.hash.start()
    for first in range(0, plan.blocks, _RUN):
        count = min(_RUN, plan.blocks - first)
        size = sum(plan.size(i) for i in range(first, first + count))
        data = memoryview(
            _pread(plan.fd, size, plan.offset + first * BLOCK, f"the new {plan.wanted.name}")
        )
        for k in range(count):
            block = data[k * BLOCK : k * BLOCK + plan.size(first + k)]
            if plan.wanted.hash.digest(salted, block) == plan.want(first + k):
                plan.source[first + k] = _KEPT
                plan.progress(len(block), True)


_CHUNK = 32768  # digests read from a seed at once (1 MiB)


def _match(plan: _Plan, index: int, seed: Seed) -> None:
    """Which blocks still missing `seed` holds; a seed that cannot be read holds none more."""
    try:
        _match_digests(plan, index, seed)
    except (StorageError, VerificationError) as e:
        log.warning("%s cannot seed %s any further: %s", seed.name, plan.wanted.name, e)


_KEY = struct.Struct("<Q")  # a digest's first 8 bytes as a number: the key it is looked up by
_KEYS = struct.Struct(f"<Q{DIGEST - 8}x")  # the same, digest after digest
_DIGESTS = struct.Struct(f"{DIGEST}s")


def _match_digests(plan: _Plan, index: int, seed: Seed) -> None:
    """Which blocks still missing `seed` holds, by digest: at the same position first (a
    layout-stable build keeps most blocks there), then anywhere, by a set of the keys of the
    blocks not found in place (small when the layout is stable).

    The loops over every block run inside C (map, compress, struct.iter_unpack): a 2 GiB root
    has half a million blocks, and a Python statement for each cost a quarter of a second of a
    full apply's time. Python code runs only for the blocks that match."""
    read = seed.digests or _computed(seed, plan.wanted.hash)
    have = block_count(seed.length)
    source = plan.source
    wanted = plan.wanted.digests
    base = index * _SEED
    for first in range(0, min(plan.blocks, have), _CHUNK):
        end = min(plan.blocks, have, first + _CHUNK)
        digests = read(first, end)
        mine = wanted[first * DIGEST : end * DIGEST]
        if len(digests) != len(mine):  # a reader that came up short: no position matches
            continue
        same = map(eq, _DIGESTS.iter_unpack(mine), _DIGESTS.iter_unpack(digests))
        for i in compress(range(first, end), same):
            if source[i] == _FETCH:
                source[i] = base + i
    missing = array(_SOURCE, compress(range(plan.blocks), map(_FETCH.__eq__, source)))
    if not missing or not have:
        return

    def keys(blocks: Iterable[int]) -> Iterator[int]:
        offsets = map(mul, blocks, repeat(DIGEST))
        return map(itemgetter(0), map(partial(_KEY.unpack_from, wanted), offsets))

    need = set(keys(missing))
    found: dict[int, tuple[int, bytes]] = {}  # key: the first seed block with it, its digest
    for first in range(0, have, _CHUNK):
        digests = read(first, min(have, first + _CHUNK))
        seen = map(itemgetter(0), _KEYS.iter_unpack(digests[: len(digests) // DIGEST * DIGEST]))
        for j in compress(
            range(first, first + len(digests) // DIGEST), map(need.__contains__, seen)
        ):
            key = _KEY.unpack_from(digests, (j - first) * DIGEST)[0]
            at = (j - first) * DIGEST
            found.setdefault(key, (j, bytes(digests[at : at + DIGEST])))
        if len(found) == len(need):
            break
    del need
    if not found:
        return
    for i in compress(missing, map(found.__contains__, keys(missing))):
        j, digest = found[_KEY.unpack_from(wanted, i * DIGEST)[0]]
        if plan.want(i) == digest:  # the whole digest, not just its key
            source[i] = base + j


def _missing_runs(source: array[int]) -> list[tuple[int, int]]:
    """[start, end) runs of blocks still to be fetched."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, value in enumerate(source):
        if value == _FETCH and start is None:
            start = i
        elif value != _FETCH and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(source)))
    return runs


def _seed_runs(source: array[int]) -> list[tuple[int, int]]:
    """[start, end) runs of blocks found in one seed at consecutive positions there."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, value in enumerate(source):
        if (
            start is not None
            and value == source[i - 1] + 1
            and value // _SEED == source[start] // _SEED
        ):
            continue
        if start is not None:
            runs.append((start, i))
            start = None
        if value >= 0:
            start = i
    if start is not None:
        runs.append((start, len(source)))
    return runs


def _copy(plan: _Plan, seeds: list[Seed]) -> None:
    """Copy each block found in a seed, a MiB at a time, once its bytes match the digest the new
    file wants; a block that does not is left to be fetched."""
    source = plan.source
    salted = plan.wanted.hash.start()
    for start, end in _seed_runs(source):
        for first in range(start, end, _RUN):
            last = min(end, first + _RUN)
            seed = seeds[source[first] // _SEED]
            j = source[first] % _SEED
            size = sum(plan.size(i) for i in range(first, last))
            position = seed.offset + j * BLOCK
            for i in range(first, last):
                source[i] = _FETCH  # missing until its bytes are checked
            try:
                data = memoryview(_pread(seed.fd, size, position, seed.name))
            except StorageError as e:
                log.warning("%s; fetching those blocks", e)
                continue
            _drop_cache(seed.fd, position, size)
            rejected = plan.transfer.rejected
            _accept(plan, first, data, True, salted)
            if plan.transfer.rejected > rejected:
                log.info(
                    "%s: %d blocks do not match what %s wants, fetching them",
                    seed.name,
                    plan.transfer.rejected - rejected,
                    plan.wanted.name,
                )


def _ranges(source: array[int]) -> list[tuple[int, int]]:
    """The missing blocks as [start, end) ranges: each missing run, or, when there are more than
    MAX_RANGES, the runs with the smallest gaps between them merged until MAX_RANGES remain."""
    runs = _missing_runs(source)
    if len(runs) <= MAX_RANGES:
        return runs
    gaps = sorted(range(1, len(runs)), key=lambda k: (runs[k][0] - runs[k - 1][1], k))
    joined = set(gaps[: len(runs) - MAX_RANGES])  # run k merges into the run before it
    merged: list[tuple[int, int]] = []
    for k, (start, end) in enumerate(runs):
        if k in joined:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


class _Body:
    """A response body read in pieces of bounded size: lines for multipart framing, exact
    lengths for data."""

    def __init__(self, raw: Any, url: str, transfer: Transfer) -> None:
        self.raw = raw
        self.url = url
        self.transfer = transfer  # counts every body byte received
        self.buffer = bytearray()

    def _receive(self) -> bytes:
        try:
            data: bytes = self.raw.read1(64 * 1024, decode_content=False)
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as e:
            raise _Transient(f"{self.url}: connection failed: {e}") from e
        self.transfer.fetched += len(data)
        return data

    def _fill(self) -> None:
        data = self._receive()
        if not data:
            raise _Botched(f"{self.url}: the response ended before the ranges it announced")
        self.buffer += data

    def finish(self) -> None:
        """Read the little that follows the last part (the closing boundary), and no more."""
        left = _LINE - len(self.buffer)
        while left >= 0 and (data := self._receive()):
            left -= len(data)
        if left < 0:
            raise _Botched(f"{self.url}: more data after the ranges asked for")

    def readline(self) -> bytes:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[: end + 1])
                del self.buffer[: end + 1]
                return line.rstrip(b"\r\n")
            if len(self.buffer) > _LINE:
                raise _Botched(f"{self.url}: a multipart line longer than {_LINE} bytes")
            self._fill()

    def read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data


def _content_range(value: str | None, length: int, url: str) -> tuple[int, int]:
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if match is None:
        raise _Botched(f"{url}: a part without a usable Content-Range ({value!r})")
    first, last, total = int(match[1]), int(match[2]), match[3]
    if total != "*" and int(total) != length:
        raise _Botched(f"{url}: the server says the file is {total} bytes, the signed {length}")
    if not first <= last < length:
        raise _Botched(f"{url}: a part for bytes {first}-{last} of a {length}-byte file")
    return first, last


def _take(plan: _Plan, body: _Body, first: int, last: int, asked: list[tuple[int, int]]) -> None:
    """Read bytes first..last of a part; write each whole block in them that is still missing
    and matches its digest."""
    if not any(a * BLOCK <= first and last < min(b * BLOCK, plan.wanted.length) for a, b in asked):
        raise _Botched(f"{plan.wanted.url}: the server sent bytes {first}-{last}, not asked for")
    salted = plan.wanted.hash.start()
    # A part starting inside a block: its head is no whole block, read past it.
    head = min(-first % BLOCK, last + 1 - first)
    body.read(head)
    position = first + head
    while position <= last:
        i = position // BLOCK
        size = min(_RUN * BLOCK, last + 1 - position)
        data = memoryview(body.read(size))
        _accept(plan, i, data, False, salted)
        position += size


def _parts(plan: _Plan, response: requests.Response, asked: list[tuple[int, int]]) -> None:
    url = plan.wanted.url
    body = _Body(response.raw, url, plan.transfer)
    kind = response.headers.get("Content-Type", "")
    if not kind.lower().startswith("multipart/byteranges"):
        first, last = _content_range(response.headers.get("Content-Range"), plan.wanted.length, url)
        _take(plan, body, first, last, asked)
        body.finish()
        return
    match = _BOUNDARY.search(kind)
    if match is None:
        raise _Botched(f"{url}: a multipart answer without a boundary")
    delimiter = b"--" + (match[1] or match[2]).encode()
    for _ in range(len(asked)):
        line = body.readline()
        for _ in range(_LINES):
            if line:
                break
            line = body.readline()
        if line.rstrip() == delimiter + b"--":
            break
        if line.rstrip() != delimiter:
            raise _Botched(f"{url}: expected the multipart boundary, got {line[:80]!r}")
        headers: dict[str, str] = {}
        for _ in range(_LINES):
            line = body.readline()
            if not line:
                break
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        else:
            raise _Botched(f"{url}: a part with more than {_LINES} header lines")
        first, last = _content_range(headers.get("content-range"), plan.wanted.length, url)
        _take(plan, body, first, last, asked)
    body.finish()


def _request(
    plan: _Plan,
    session: requests.Session,
    options: FetchOptions,
    asked: list[tuple[int, int]],
) -> None:
    url, length = plan.wanted.url, plan.wanted.length
    spec = ",".join(f"{a * BLOCK}-{min(b * BLOCK, length) - 1}" for a, b in asked)
    headers = {"Accept-Encoding": "identity", "Range": f"bytes={spec}"}
    plan.transfer.requests += 1
    try:
        response = session.get(url, headers=headers, stream=True, timeout=options.timeout)
    except requests.RequestException as e:
        raise _Transient(f"{url}: request failed: {e}") from e
    with response:
        status = response.status_code
        if status in (200, 416) and len(asked) > 1:
            raise _Botched(f"{url}: the server answers {len(asked)} ranges with HTTP {status}")
        if status == 200:
            raise Unseedable(f"{url}: the server ignores Range requests (200 to 'Range')")
        if status == 416:
            raise Unseedable(f"{url}: the server calls the ranges unsatisfiable (416)")
        if status in _TRANSIENT_STATUS:
            raise _Transient(f"{url}: HTTP {status}")
        if status != 206:
            reason = response.reason or http.client.responses.get(status, "")
            raise DownloadError(
                f"refused {url}: HTTP {status} {reason}".rstrip(), url=url, status=status
            )
        _parts(plan, response, asked)


def _fetch(plan: _Plan, session: requests.Session, options: FetchOptions) -> None:
    """Fetch every missing block, in bounded rounds (see the module docstring)."""
    per_request = PER_REQUEST
    for attempt in range(1, options.attempts + 1):
        ranges = _ranges(plan.source)
        if not ranges:
            return
        transient = False
        for at in range(0, len(ranges), per_request):
            asked = ranges[at : at + per_request]
            try:
                _request(plan, session, options, asked)
            except _Botched as e:
                if per_request > 1:
                    log.info("%s; asking for one range at a time", e)
                    per_request = 1
                else:
                    log.info("%s", e)
            except _Transient as e:
                log.info("%s (round %d of %d)", e, attempt, options.attempts)
                transient = True
        if transient and attempt < options.attempts:
            time.sleep(min(options.backoff * 2 ** (attempt - 1), 60.0))
    missing = sum(1 for value in plan.source if value == _FETCH)
    if missing:
        raise Unseedable(
            f"{plan.wanted.url}: {missing} blocks still missing or wrong after "
            f"{options.attempts} rounds of range requests"
        )


def write(
    wanted: Wanted,
    fd: int,
    offset: int,
    seeds: list[Seed],
    *,
    session: requests.Session,
    options: FetchOptions,
    in_place: bool = False,
    report: Callable[[int, int], None] | None = None,
) -> Transfer:
    """Write `wanted` at `offset` of `fd` from `seeds` and range requests; every block written
    hashes to its digest in `wanted`. With `in_place`, blocks the destination already holds
    (an interrupted write of the same file) are kept. `report(done, reused)` follows the bytes.

    Raises Unseedable when the seeds hold less than MIN_REUSE of the file (before anything is
    written) or ranges cannot complete it (the destination then holds a mix of right blocks and
    old bytes: the caller streams the whole file over it), DownloadError for a
    refusal by the server, StorageError for a disk that fails."""
    blocks = block_count(wanted.length)
    if len(wanted.digests) != blocks * DIGEST:
        raise ValueError(
            f"{wanted.name}: {len(wanted.digests)} bytes of digests for {blocks} blocks"
        )
    if blocks >= _SEED or len(seeds) > _MAX_SEEDS:
        raise Unseedable(
            f"{wanted.name}: {blocks} blocks from {len(seeds)} seeds is past what a plan holds "
            f"({_SEED - 1} blocks, {_MAX_SEEDS} seeds)"
        )
    plan = _Plan(wanted, fd, offset, array(_SOURCE, [_FETCH]) * blocks, Transfer(), report)
    if in_place:
        _keep_in_place(plan)
    for index, seed in enumerate(seeds):
        _match(plan, index, seed)
    found = sum(1 for value in plan.source if value != _FETCH)
    if found < MIN_REUSE * blocks:
        raise Unseedable(
            f"only {found} of the {blocks} blocks of {wanted.name} are on this machine"
        )
    _copy(plan, seeds)
    _fetch(plan, session, options)
    try:
        os.fsync(fd)
    except OSError as e:
        raise StorageError(f"flushing {wanted.name} to disk failed: {e}") from e
    _drop_cache(fd, offset, wanted.length)
    return plan.transfer

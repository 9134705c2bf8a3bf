"""Seeded updates (updater/update/seeded.py): the new root and UKI from the blocks the booted
slot and UKI already hold, the rest by HTTP range from a real nginx, and from servers that
ignore, botch or falsify ranges. Every outcome is the release's bytes or a refusal."""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.support.machine import FakeMachine, Site, make_agent, make_verity_release
from tests.support.misbehaving_server import MisbehavingServer, Misbehaviour
from tests.support.servers import NginxServer
from updater.disk.slots import SlotState
from updater.errors import VerificationError
from updater.release.blockindex import digest_blocks
from updater.update import seeded
from updater.update.machine import FetchOptions
from updater.update.state import load_state, state_path

BLOCK = 4096
BLOCKS = 512  # a 2 MiB root
OPTIONS = FetchOptions(timeout=(5.0, 5.0), attempts=3, backoff=0.0)


def _changed(data: bytes, blocks: list[int]) -> bytes:
    out = bytearray(data)
    for i in blocks:
        out[i * BLOCK : (i + 1) * BLOCK] = os.urandom(BLOCK)
    return bytes(out)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """Release 1.0.0 and a 1.1.0 that differs in three blocks of its root and one of its UKI."""
    root = os.urandom(BLOCKS * BLOCK)
    uki = b"MZ" + os.urandom(40_000)
    old = make_verity_release(tmp_path / "out-old", "1.0.0", data=root, uki=uki)
    new = make_verity_release(
        tmp_path / "out-new",
        "1.1.0",
        data=_changed(root, [7, 8, 300]),
        uki=uki[:5000] + os.urandom(100) + uki[5100:],
    )
    return old, new


@pytest.fixture
def machine(tmp_path: Path, pair: tuple[Path, Path]) -> FakeMachine:
    return FakeMachine(tmp_path / "machine", pair[0])


def _installed(fake: FakeMachine, release: Path) -> None:
    """Slot B holds `release`'s root and tree, and its UKI is the newest entry."""
    _a, b = fake.slots()
    assert b.state is SlotState.INSTALLED
    erofs, tree = (release / "root.erofs").read_bytes(), (release / "root.verity").read_bytes()
    assert fake.region(b.data_offset, len(erofs)) == erofs
    assert fake.region(b.verity_offset, len(tree)) == tree
    entry = fake.entry_dir / "berth_1.1.0+3.efi"
    assert entry.read_bytes() == (release / "uki.efi").read_bytes()
    assert not list((fake.var / "lib/berth").glob("seed-*.json"))


def _shared(old: Path, new: Path) -> int:
    """The bytes of `new` in blocks that `old` has somewhere."""
    a, b = digest_blocks(old.read_bytes()), digest_blocks(new.read_bytes())
    have = {a[i : i + 32] for i in range(0, len(a), 32)}
    size = new.stat().st_size
    return sum(
        min(BLOCK, size - i // 32 * BLOCK) for i in range(0, len(b), 32) if b[i : i + 32] in have
    )


def _payload_requests(server: NginxServer) -> list[tuple[int, int, str, str | None]]:
    return [
        (r.status, r.body_bytes, r.request, r.range)
        for r in server.requests()
        if r.request.startswith("GET ") and r.path.endswith((".root.erofs", ".uki.efi"))
    ]


def test_a_seeded_apply_fetches_only_the_changed_blocks(
    site: Site, machine: FakeMachine, pair: tuple[Path, Path]
) -> None:
    site.publish(pair[1])
    seen: list[tuple[str, int, int, int]] = []
    applied = make_agent(machine, site).apply(progress=lambda *a: seen.append(a))
    _installed(machine, pair[1])
    # nginx served range requests only, for the payload files seeded: three changed root blocks
    # in two ranges (7-8, 300) in one multipart request, the UKI's changed block(s) in another.
    served = _payload_requests(site.server)
    assert served and all(status == 206 and rng for status, _, _, rng in served)
    assert [rng for _, _, request, rng in served if "root.erofs" in request] == [
        f"bytes={7 * BLOCK}-{9 * BLOCK - 1},{300 * BLOCK}-{301 * BLOCK - 1}"
    ]
    # the tree too: its changed blocks by range, the rest from the booted slot's tree
    trees = [
        r
        for r in site.server.requests()
        if r.request.startswith("GET ") and r.path.endswith(".root.verity")
    ]
    assert trees and all(r.status == 206 and r.range for r in trees)
    body = sum(sent for _, sent, _, _ in served)
    assert body < 6 * BLOCK + 1000  # the blocks and the multipart framing
    # What the agent says it fetched is what nginx sent (payload, tree, manifest, index).
    everything = sum(
        r.body_bytes
        for r in site.server.requests()
        if r.request.startswith("GET ")
        and "/targets/" in r.request
        and "channels/" not in r.request
    )
    record = applied.transfer
    assert record is not None
    assert record.fetched == everything
    # every block the old release has, in the root, its tree and the UKI
    assert record.reused == sum(
        _shared(pair[0] / name, pair[1] / name) for name in ("root.erofs", "root.verity", "uki.efi")
    )
    assert record.reused > (BLOCKS - 3) * BLOCK + 40_002 - BLOCK
    state = load_state(state_path(machine.var))
    assert state.transfers[-1] == record
    status = make_agent(machine, site).status()
    assert status.transfers == (record.describe(),)
    assert "reused" in record.describe()
    # Progress told reused and fetched bytes apart, and reached the end of both seeded files.
    last = {name: (done, total, *reused) for name, done, total, *reused in seen}
    assert last["root.erofs"] == (BLOCKS * BLOCK, BLOCKS * BLOCK, (BLOCKS - 3) * BLOCK)
    assert last["uki.efi"][0] == last["uki.efi"][1] and last["uki.efi"][2] > 0


def test_corrupted_seed_blocks_are_fetched_instead(
    site: Site, machine: FakeMachine, pair: tuple[Path, Path]
) -> None:
    site.publish(pair[1])
    booted, _ = machine.slots()
    with machine.disk.open("r+b") as disk:  # bit rot in the booted root, under dm-verity
        for i in (100, 101, 400):
            disk.seek(booted.data_offset + i * BLOCK + 100)
            disk.write(b"\0rot\0")
    applied = make_agent(machine, site).apply()
    _installed(machine, pair[1])
    erofs = [r for r in _payload_requests(site.server) if "root.erofs" in r[2]]
    assert erofs[0][3] == (
        f"bytes={7 * BLOCK}-{9 * BLOCK - 1},{100 * BLOCK}-{102 * BLOCK - 1},"
        f"{300 * BLOCK}-{301 * BLOCK - 1},{400 * BLOCK}-{401 * BLOCK - 1}"
    )
    assert applied.transfer is not None
    names = ("root.erofs", "root.verity", "uki.efi")
    # all the old release has, but the three rotten blocks
    shared = sum(_shared(pair[0] / name, pair[1] / name) for name in names)
    assert applied.transfer.reused == shared - 3 * BLOCK


def test_an_interrupted_seeded_apply_resumes_without_fetching_again(
    site: Site, machine: FakeMachine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(seeded, "_RUN", 16)  # progress every 64 KiB: a cut inside the range
    # The first half of the new root differs: the first apply dies (a power cut) after
    # fetching a quarter of the file.
    root = (machine.installed / "root.erofs").read_bytes()
    new = make_verity_release(
        tmp_path / "out-half",
        "1.1.0",
        data=_changed(root, list(range(BLOCKS // 2))),
        uki=(machine.installed / "uki.efi").read_bytes(),
    )
    site.publish(new)

    class Killed(Exception):
        pass

    def kill(name: str, done: int, total: int, reused: int = 0) -> None:
        if name == "root.erofs" and done - reused > total // 4:
            raise Killed

    with pytest.raises(Killed):
        make_agent(machine, site).apply(progress=kill)
    assert machine.slots()[1].state is SlotState.WRITING
    assert list((machine.var / "lib/berth").glob("seed-root.erofs.json"))
    site.server.access_log.write_text("")
    applied = make_agent(machine, site).apply()
    again = sum(r[1] for r in _payload_requests(site.server) if "root.erofs" in r[2])
    # The second apply fetched what was left, not what the first wrote: at most the changed
    # half less the quarter of the file written before the cut.
    assert 0 < again <= (BLOCKS // 4 + 16) * BLOCK
    assert applied.transfer is not None and applied.transfer.reused >= (3 * BLOCKS // 4) * BLOCK
    erofs = (new / "root.erofs").read_bytes()
    _a, b = machine.slots()
    assert machine.region(b.data_offset, len(erofs)) == erofs
    assert applied.version.minor == 1


@pytest.mark.parametrize(
    ("rule", "whole"),
    [
        (Misbehaviour("root.erofs", ranged=True, ignore_range=True), True),  # 200 to a Range
        (Misbehaviour("root.erofs", 1, True, botch_multipart=True), False),  # then single ranges
        (Misbehaviour("root.erofs", ranged=True, single_ranges=True), False),  # as object stores
        (Misbehaviour("root.erofs", 1, True, garble_ranges=True), False),  # then asked again
        (Misbehaviour("root.erofs", ranged=True, garble_ranges=True), True),  # never right
        (Misbehaviour("root.erofs", 1, True, status=503), False),  # a retried round
        (Misbehaviour("root.erofs", 1, True, cut_at=300), False),  # a torn answer
    ],
    ids=[
        "ignores-range",
        "botched-multipart",
        "single-ranges-only",
        "wrong-bytes-once",
        "wrong-bytes-always",
        "503",
        "cut",
    ],
)
def test_a_misbehaving_server_ends_in_the_right_slot(
    site: Site,
    machine: FakeMachine,
    pair: tuple[Path, Path],
    misbehaving: Callable[..., MisbehavingServer],
    rule: Misbehaviour,
    whole: bool,
) -> None:
    site.publish(pair[1])
    server = misbehaving(site.repo)
    server.rules.append(rule)
    applied = make_agent(machine, site, url=server.url + "/", options=OPTIONS).apply()
    _installed(machine, pair[1])
    gets = [s for s in server.requests("GET") if "root.erofs" in s.path]
    full = [s for s in gets if s.range is None]
    assert bool(full) == whole  # streamed whole only when ranges could not finish it
    assert applied.transfer is not None


def test_a_server_whose_whole_file_is_wrong_too_is_refused(
    site: Site,
    machine: FakeMachine,
    pair: tuple[Path, Path],
    misbehaving: Callable[..., MisbehavingServer],
) -> None:
    site.publish(pair[1])
    served = site.payload(pair[1], "root.erofs")
    served.write_bytes(os.urandom(served.stat().st_size))
    booted, _ = machine.slots()
    before = machine.region(booted.data_offset, booted.data_size)
    order = machine.boot_order()
    with pytest.raises(VerificationError, match="verity root hash"):
        make_agent(machine, site, options=OPTIONS).apply()
    assert machine.slots()[1].state is SlotState.WRITING  # scratch, never named
    assert machine.region(booted.data_offset, booted.data_size) == before
    assert machine.boot_order() == order


# seeded.write on its own: plain files, nginx


def _wanted(url: str, data: bytes) -> seeded.Wanted:
    return seeded.Wanted("file", url, len(data), digest_blocks(data), seeded.BlockHash(None))


def _serve(tmp_path: Path, data: bytes) -> NginxServer:
    (tmp_path / "www").mkdir(exist_ok=True)
    (tmp_path / "www/file").write_bytes(data)
    return NginxServer(tmp_path / "www", tmp_path / "nginx").start()


def _write(
    tmp_path: Path, old: bytes, new: bytes, url: str, **options: object
) -> tuple[bytes, seeded.Transfer]:
    (tmp_path / "seed").write_bytes(old)
    dest = tmp_path / "dest"
    dest.write_bytes(b"")
    with (
        (tmp_path / "seed").open("rb") as seed,
        dest.open("r+b") as out,
        requests.Session() as session,
    ):
        out.truncate(len(new))
        transfer = seeded.write(
            _wanted(url, new),
            out.fileno(),
            0,
            [seeded.Seed("seed", seed.fileno(), 0, len(old))],
            session=session,
            options=OPTIONS,
            **options,  # type: ignore[arg-type]
        )
    return dest.read_bytes(), transfer


def test_blocks_that_moved_are_found_anywhere_in_the_seed(tmp_path: Path) -> None:
    old = os.urandom(300 * BLOCK + 123)
    # 10 blocks inserted at the front shift everything else: no block is in place any more
    new = os.urandom(10 * BLOCK) + old
    server = _serve(tmp_path, new)
    try:
        got, transfer = _write(tmp_path, old, new, server.url + "file")
    finally:
        server.stop()
    assert got == new
    assert transfer.reused == len(old) and transfer.requests == 1
    assert transfer.fetched == 10 * BLOCK


def test_ranges_are_bounded_in_number_and_per_request(tmp_path: Path) -> None:
    blocks = 3 * 2 * seeded.MAX_RANGES
    old = os.urandom(blocks * BLOCK)
    # a changed block every third one: twice as many runs as MAX_RANGES
    new = _changed(old, list(range(0, blocks, 3)))
    server = _serve(tmp_path, new)
    try:
        got, transfer = _write(tmp_path, old, new, server.url + "file")
        ranges = [r.range for r in server.requests() if r.range]
    finally:
        server.stop()
    assert got == new
    assert transfer.requests <= -(-seeded.MAX_RANGES // seeded.PER_REQUEST)
    assert all(len(r.split(",")) <= seeded.PER_REQUEST for r in ranges if r)
    assert sum(len(r.split(",")) for r in ranges if r) <= seeded.MAX_RANGES
    # half the gaps merged, each of two blocks: the changed blocks and those, and the framing
    # of each part (about 120 bytes)
    data = (blocks // 3 + seeded.MAX_RANGES * 2) * BLOCK
    assert data <= transfer.fetched < data + seeded.MAX_RANGES * 200


def test_ranges_merge_the_closest_runs_first() -> None:
    # 2 * MAX_RANGES missing single blocks; gaps alternate between 1 and 50 blocks
    source = array("q", [0]) * (seeded.MAX_RANGES * 54)
    at = 0
    for k in range(2 * seeded.MAX_RANGES):
        source[at] = seeded._FETCH
        at += 2 if k % 2 == 0 else 51
    ranges = seeded._ranges(source)
    assert len(ranges) == seeded.MAX_RANGES
    # only the one-block gaps were merged: each range is 3 blocks, no block fetched in vain
    # beyond those gaps
    assert all(end - start == 3 for start, end in ranges)
    assert seeded._ranges(array("q", [seeded._FETCH, 0, seeded._FETCH])) == [(0, 1), (2, 3)]


def test_a_seed_with_too_little_in_common_is_not_used(tmp_path: Path) -> None:
    old = os.urandom(100 * BLOCK)
    new = os.urandom(100 * BLOCK)
    with pytest.raises(seeded.Unseedable, match="only 0 of the 100 blocks"):
        _write(tmp_path, old, new, "http://127.0.0.1:9/never-asked")
    assert (tmp_path / "dest").read_bytes() == b"\0" * len(new)  # nothing written


def test_a_short_last_block_and_a_shorter_seed(tmp_path: Path) -> None:
    old = os.urandom(40 * BLOCK + 7)
    new = old[: 30 * BLOCK] + os.urandom(9 * BLOCK + 5)
    server = _serve(tmp_path, new)
    try:
        got, transfer = _write(tmp_path, old, new, server.url + "file")
    finally:
        server.stop()
    assert got == new and transfer.reused == 30 * BLOCK
    assert hashlib.sha256(got).digest() == hashlib.sha256(new).digest()

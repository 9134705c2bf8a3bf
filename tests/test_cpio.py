"""The newc cpio writer: round trip, reproducible bytes, alignment, symlinks and directories."""

from __future__ import annotations

import io
import random
import stat

import pytest

from builder.cpio import Entry, read_cpio, write_cpio

ENTRIES = [
    Entry("usr", stat.S_IFDIR | 0o755),
    Entry("usr/bin", stat.S_IFDIR | 0o755),
    Entry("usr/bin/tool", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
    Entry("usr/lib", stat.S_IFDIR | 0o755),
    Entry("usr/lib/a", stat.S_IFREG | 0o644, b"x"),  # 1 byte: needs 3 bytes of padding
    Entry("usr/lib/ab", stat.S_IFREG | 0o600, b"xy", uid=7, gid=9),
    Entry("usr/lib/abc", stat.S_IFREG | 0o644, b"xyz"),
    Entry("usr/lib/abcd", stat.S_IFREG | 0o644, b"wxyz"),
    Entry("usr/lib/empty", stat.S_IFREG | 0o644, b""),
    Entry("bin", stat.S_IFLNK | 0o777, b"usr/bin"),
    Entry("init", stat.S_IFLNK | 0o777, b"usr/lib/systemd/systemd"),
    Entry("tmp", stat.S_IFDIR | 0o1777),
]


def archive(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    write_cpio(out, entries)
    return out.getvalue()


def headers(data: bytes) -> list[tuple[int, list[int], str]]:
    """(offset, the 13 numeric fields, name) of every header, trailer included."""
    found: list[tuple[int, list[int], str]] = []
    offset = 0
    while True:
        assert offset % 4 == 0, f"header at unaligned offset {offset}"
        assert data[offset : offset + 6] == b"070701"
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_end = offset + 110 + namesize
        assert data[name_end - 1] == 0, "name is not NUL-terminated"
        name = data[offset + 110 : name_end - 1].decode()
        found.append((offset, fields, name))
        if name == "TRAILER!!!":
            assert len(data) == name_end + (-name_end % 4)
            return found
        body = name_end + (-name_end % 4)
        assert data[name_end:body] == bytes(body - name_end), "name padding is not zeros"
        end = body + filesize
        assert data[end : end + (-end % 4)] == bytes(-end % 4), "data padding is not zeros"
        offset = end + (-end % 4)


def test_round_trip_keeps_every_field() -> None:
    back = read_cpio(archive(ENTRIES))
    assert back == sorted(ENTRIES, key=lambda e: e.path)


def test_same_entries_in_any_order_give_the_same_bytes() -> None:
    reference = archive(ENTRIES)
    rng = random.Random(1234)
    for _ in range(5):
        shuffled = list(ENTRIES)
        rng.shuffle(shuffled)
        assert archive(shuffled) == reference


def test_entries_are_sorted_so_parents_come_first() -> None:
    names = [name for _, _, name in headers(archive(ENTRIES))]
    assert names[-1] == "TRAILER!!!"
    assert names[:-1] == sorted(e.path for e in ENTRIES)
    assert names.index("usr") < names.index("usr/bin") < names.index("usr/bin/tool")


def test_newc_layout_alignment_and_fixed_metadata() -> None:
    data = archive(ENTRIES)
    found = headers(data)
    by_name = {name: fields for _, fields, name in found}
    inodes = [fields[0] for _, fields, name in found if name != "TRAILER!!!"]
    assert inodes == list(range(1, len(ENTRIES) + 1))
    for _, fields, _ in found:
        assert fields[5] == 0, "mtime must be fixed at 0"
        assert fields[7:11] == [0, 0, 0, 0], "device numbers must be zero"
        assert fields[12] == 0, "newc has no checksum"
    ab = by_name["usr/lib/ab"]
    assert (ab[1], ab[2], ab[3], ab[4], ab[6]) == (stat.S_IFREG | 0o600, 7, 9, 1, 2)
    assert by_name["usr/lib/empty"][6] == 0
    trailer = by_name["TRAILER!!!"]
    assert trailer[0] == 0 and trailer[1] == 0 and trailer[6] == 0
    assert trailer[11] == len("TRAILER!!!") + 1


def test_padding_for_every_data_length_mod_4() -> None:
    for length in range(9):
        for name_length in range(1, 6):
            entry = Entry("n" * name_length, stat.S_IFREG | 0o644, bytes(range(1, length + 1)))
            data = archive([entry])
            assert len(data) % 4 == 0
            assert read_cpio(data) == [entry]


def test_symlink_stores_its_target_as_data() -> None:
    data = archive([Entry("bin", stat.S_IFLNK | 0o777, b"usr/bin")])
    (_, fields, name), _trailer = headers(data)
    assert name == "bin"
    assert stat.S_ISLNK(fields[1])
    assert fields[6] == len(b"usr/bin")
    assert fields[4] == 1
    assert read_cpio(data)[0].data == b"usr/bin"


def test_directory_has_no_data_and_two_links() -> None:
    # Data given for a directory is ignored rather than written.
    data = archive([Entry("etc", stat.S_IFDIR | 0o755, b"ignored")])
    (_, fields, _), _trailer = headers(data)
    assert stat.S_ISDIR(fields[1])
    assert fields[6] == 0
    assert fields[4] == 2
    assert b"ignored" not in data
    assert read_cpio(data) == [Entry("etc", stat.S_IFDIR | 0o755)]


def test_empty_archive_is_only_a_trailer() -> None:
    data = archive([])
    assert [name for _, _, name in headers(data)] == ["TRAILER!!!"]
    assert read_cpio(data) == []


def test_read_rejects_bad_magic() -> None:
    data = bytearray(archive(ENTRIES))
    second = headers(bytes(data))[1][0]
    data[second : second + 6] = b"070707"  # the old binary-ish "odc" magic
    with pytest.raises(ValueError, match=f"bad cpio magic at offset {second}"):
        read_cpio(bytes(data))


def test_non_ascii_names_and_binary_data() -> None:
    entry = Entry("usr/share/café", stat.S_IFREG | 0o644, bytes(range(256)))
    back = read_cpio(archive([entry]))
    assert back == [entry]

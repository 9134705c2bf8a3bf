"""ELF analysis of an image tree: the lint that fails a build, and the initrd's library closure.

Everything is resolved inside the tree the way the image's own ld.so will see it at run time:
symlinks (absolute ones included) are chased relative to the tree root, exactly as under chroot,
so nothing on the build host can make a broken image look healthy. Libraries are searched in
glibc's order (DT_RPATH unless DT_RUNPATH, DT_RUNPATH, the tree's ld.so.conf, the default
directories) and a candidate of the wrong class or machine is skipped as ld.so skips it.

Parsing reads only the ELF header, the program headers, the dynamic segment, its string table and
the note segments, with pyelftools' structure definitions built once per class and machine rather
than through `ELFFile`, whose set-up alone costs more than the whole read; a Debian tree of some
1,000 ELFs among 14,000 files takes about a second warm and two seconds from a cold page cache.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import io
import json
import os
import posixpath
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.common.utils import struct_parse
from elftools.construct import Struct
from elftools.elf.structs import ELFStructs

from builder.errors import BuildError
from builder.log import complete_step
from updater.files import host_readlink, resolve_in_root

ELF_MAGIC = b"\x7fELF"

# Pseudo-filesystems are mount points in a running system; in a tree they are empty or host
# leftovers and never part of the image.
SKIPPED_TOP_DIRS = frozenset({"proc", "sys", "dev"})

# Systemd >= 256 lists the libraries it dlopen()s in notes of this owner and type
# (https://systemd.io/ELF_DLOPEN_METADATA/).
DLOPEN_NOTE_OWNER = b"FDO"
DLOPEN_NOTE_TYPE = 0x407C0C0A

# Debian multiarch triplet and $PLATFORM value per machine the builder can target.
MULTIARCH: dict[str, tuple[str, str]] = {
    "EM_X86_64": ("x86_64-linux-gnu", "x86_64"),
    "EM_AARCH64": ("aarch64-linux-gnu", "aarch64"),
}

PT_LOAD = "PT_LOAD"
PT_DYNAMIC = "PT_DYNAMIC"
PT_INTERP = "PT_INTERP"
PT_NOTE = "PT_NOTE"


class DlopenPriority(enum.StrEnum):
    REQUIRED = "required"
    RECOMMENDED = "recommended"
    SUGGESTED = "suggested"


@dataclasses.dataclass(frozen=True)
class DlopenDependency:
    """One entry of a `.note.dlopen` note: a feature and the sonames that provide it, best first."""

    feature: str
    description: str
    priority: DlopenPriority
    sonames: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ElfInfo:
    """What loading an ELF file needs; `machine` and `type` are pyelftools names (EM_X86_64)."""

    machine: str
    elf_class: int
    little_endian: bool
    type: str
    interpreter: str | None
    needed: tuple[str, ...]
    runpath: tuple[str, ...]
    rpath: tuple[str, ...]
    soname: str | None
    dlopen: tuple[DlopenDependency, ...]

    def compatible(self, other: ElfInfo) -> bool:
        """Whether ld.so would accept `other` as a library for this object."""
        return (
            self.elf_class == other.elf_class
            and self.little_endian == other.little_endian
            and self.machine == other.machine
        )

    @property
    def describe(self) -> str:
        return f"{self.machine} ELF{self.elf_class}"


@dataclasses.dataclass(frozen=True)
class LintProblem:
    """One offender found by the ELF lint; `path` is relative to the tree root."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class MalformedElf(BuildError):
    """A file starts with the ELF magic but its headers cannot be parsed."""


@dataclasses.dataclass(frozen=True)
class _Structs:
    elf: ELFStructs
    nhdr: Struct


_basic_structs: dict[tuple[bool, int], ELFStructs] = {}
_advanced_structs: dict[tuple[bool, int, str, str, str], _Structs] = {}


def _basic(little_endian: bool, elf_class: int) -> ELFStructs:
    key = (little_endian, elf_class)
    structs = _basic_structs.get(key)
    if structs is None:
        structs = ELFStructs(little_endian=little_endian, elfclass=elf_class)
        structs.create_basic_structs()
        _basic_structs[key] = structs
    return structs


def _advanced(little_endian: bool, elf_class: int, header: Any) -> _Structs:
    e_type, e_machine, osabi = header.e_type, header.e_machine, header.e_ident.EI_OSABI
    key = (little_endian, elf_class, str(e_type), str(e_machine), str(osabi))
    structs = _advanced_structs.get(key)
    if structs is None:
        elf = ELFStructs(little_endian=little_endian, elfclass=elf_class)
        elf.create_basic_structs()
        elf.create_advanced_structs(e_type, e_machine, osabi)
        # pyelftools' Elf_Nhdr maps n_type to names; the dlopen type is matched by number.
        nhdr = Struct(
            "Nhdr", elf.Elf_word("n_namesz"), elf.Elf_word("n_descsz"), elf.Elf_word("n_type")
        )
        structs = _Structs(elf, nhdr)
        _advanced_structs[key] = structs
    return structs


def _cstring(table: bytes, offset: int) -> str:
    end = table.find(b"\0", offset)
    if offset >= len(table) or end < 0:
        raise MalformedElf(f"string offset {offset} outside the dynamic string table")
    return table[offset:end].decode("utf-8", "surrogateescape")


def _parse_dlopen(desc: bytes) -> list[DlopenDependency]:
    try:
        entries = json.loads(desc.rstrip(b"\0").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedElf(f".note.dlopen is not valid JSON: {e}") from e
    if not isinstance(entries, list):
        raise MalformedElf(".note.dlopen is not a JSON array")
    result = []
    for entry in entries:
        sonames = entry.get("soname") if isinstance(entry, dict) else None
        if not isinstance(sonames, list) or not all(isinstance(s, str) for s in sonames):
            raise MalformedElf(f".note.dlopen entry without a soname list: {entry!r}")
        try:
            priority = DlopenPriority(entry.get("priority", DlopenPriority.RECOMMENDED))
        except ValueError as e:
            raise MalformedElf(f".note.dlopen entry with unknown priority: {entry!r}") from e
        result.append(
            DlopenDependency(
                feature=str(entry.get("feature", "")),
                description=str(entry.get("description", "")),
                priority=priority,
                sonames=tuple(sonames),
            )
        )
    return result


def _parse_notes(data: bytes, structs: _Structs, align: int) -> list[DlopenDependency]:
    result: list[DlopenDependency] = []
    stream = io.BytesIO(data)
    size = structs.nhdr.sizeof()
    pos = 0
    while pos + size <= len(data):
        nhdr = struct_parse(structs.nhdr, stream, pos)
        name_at = pos + size
        desc_at = name_at + (nhdr.n_namesz + 3) // 4 * 4
        end = desc_at + nhdr.n_descsz
        if end > len(data):
            raise MalformedElf("note runs past the end of its segment")
        name = data[name_at : name_at + nhdr.n_namesz].rstrip(b"\0")
        if nhdr.n_type == DLOPEN_NOTE_TYPE and name == DLOPEN_NOTE_OWNER:
            result.extend(_parse_dlopen(data[desc_at:end]))
        pos = (end + align - 1) // align * align
    return result


def read_elf(path: Path | str) -> ElfInfo | None:
    """Parse one file on disk; None if it is not an ELF file at all (by its magic)."""
    with open(path, "rb") as f:
        ident = f.read(16)
        if len(ident) < 16 or not ident.startswith(ELF_MAGIC):
            return None
        try:
            return _read_elf(f, ident)
        except ELFError as e:
            raise MalformedElf(f"{path}: {e}") from e
        except MalformedElf as e:
            raise MalformedElf(f"{path}: {e}") from e


def _read_elf(f: io.BufferedReader, ident: bytes) -> ElfInfo:
    elf_class = {1: 32, 2: 64}.get(ident[4])
    little_endian = {1: True, 2: False}.get(ident[5])
    if elf_class is None or little_endian is None:
        raise MalformedElf(f"unknown ELF class {ident[4]} or data encoding {ident[5]}")
    header = struct_parse(_basic(little_endian, elf_class).Elf_Ehdr, f, 0)
    structs = _advanced(little_endian, elf_class, header)

    phentsize, phnum = header.e_phentsize, header.e_phnum
    f.seek(header.e_phoff)
    table = f.read(phentsize * phnum)
    if len(table) < phentsize * phnum:
        raise MalformedElf("program header table is truncated")
    phdrs = io.BytesIO(table)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    notes: list[tuple[int, int, int]] = []
    interpreter = None
    for i in range(phnum):
        phdr = struct_parse(structs.elf.Elf_Phdr, phdrs, i * phentsize)
        kind = phdr.p_type
        if kind == PT_LOAD:
            loads.append((phdr.p_vaddr, phdr.p_offset, phdr.p_filesz))
        elif kind == PT_DYNAMIC:
            dynamic = (phdr.p_offset, phdr.p_filesz)
        elif kind == PT_NOTE:
            notes.append((phdr.p_offset, phdr.p_filesz, 8 if phdr.p_align == 8 else 4))
        elif kind == PT_INTERP:
            f.seek(phdr.p_offset)
            interpreter = (
                f.read(phdr.p_filesz).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            )

    needed: list[str] = []
    runpath: tuple[str, ...] = ()
    rpath: tuple[str, ...] = ()
    soname = None
    if dynamic is not None and dynamic[1] > 0:
        f.seek(dynamic[0])
        data = io.BytesIO(f.read(dynamic[1]))
        entry_size = structs.elf.Elf_Dyn.sizeof()
        strings: list[tuple[str, int]] = []
        strtab = strsz = None
        for pos in range(0, dynamic[1] - entry_size + 1, entry_size):
            dyn = struct_parse(structs.elf.Elf_Dyn, data, pos)
            tag = dyn.d_tag
            if tag == "DT_NULL":
                break
            if tag in ("DT_NEEDED", "DT_SONAME", "DT_RPATH", "DT_RUNPATH"):
                strings.append((tag, dyn.d_val))
            elif tag == "DT_STRTAB":
                strtab = dyn.d_ptr
            elif tag == "DT_STRSZ":
                strsz = dyn.d_val
        if strings:
            if strtab is None or strsz is None:
                raise MalformedElf("dynamic segment has strings but no DT_STRTAB/DT_STRSZ")
            offset = next((o + strtab - v for v, o, n in loads if v <= strtab < v + n), None)
            if offset is None:
                raise MalformedElf(f"DT_STRTAB {strtab:#x} is not in any PT_LOAD segment")
            f.seek(offset)
            table = f.read(strsz)
            for tag, value in strings:
                text = _cstring(table, value)
                if tag == "DT_NEEDED":
                    needed.append(text)
                elif tag == "DT_SONAME":
                    soname = text
                elif tag == "DT_RPATH":
                    rpath += tuple(text.split(":"))
                else:
                    runpath += tuple(text.split(":"))

    dlopen: list[DlopenDependency] = []
    for offset, size, align in notes:
        f.seek(offset)
        dlopen.extend(_parse_notes(f.read(size), structs, align))

    return ElfInfo(
        machine=str(header.e_machine),
        elf_class=elf_class,
        little_endian=little_endian,
        type=str(header.e_type),
        interpreter=interpreter,
        needed=tuple(needed),
        runpath=runpath,
        rpath=rpath,
        soname=soname,
        dlopen=tuple(dlopen),
    )


def _resolve(
    path: str,
    readlink: Callable[[str], str | None],
    links: list[str] | None = None,
    follow: bool = True,
) -> str:
    try:
        found = resolve_in_root(path, readlink, follow=follow)
    except OSError:
        raise BuildError(f"{path}: too many levels of symbolic links in the image tree") from None
    if links is not None:
        # Top-level links (/lib -> usr/lib) are the tree's layout, not a dependency of the path.
        links.extend(link for link, _ in found.links if link.rpartition("/")[0])
    return found.path


def tree_path(tree: Path, path: str) -> Path:
    """Host path of `path` inside `tree`, every symlink resolved inside the tree as under chroot.

    The result may not exist; no component of it below `tree` is a symlink.
    """
    return Path(os.fspath(tree).rstrip("/") + _resolve(path, host_readlink(tree)))


class Resolver:
    """Resolves files and libraries inside one image tree, caching everything it learns.

    Paths it takes and returns are absolute paths inside the tree ("/usr/bin/ls"). The returned
    ones have no symlink among their directories, but the last component may be a symlink.
    """

    def __init__(self, tree: Path, machine: str = "EM_X86_64") -> None:
        if machine not in MULTIARCH:
            raise BuildError(
                f"ELF analysis does not know machine {machine}",
                hint=f"known machines: {', '.join(MULTIARCH)}",
            )
        self.tree = tree
        self.machine = machine
        self._root = os.fspath(tree).rstrip("/")
        self.triplet, self.platform = MULTIARCH[machine]
        self._links: dict[str, str | None] = {}
        self._dirs: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._infos: dict[str, ElfInfo | None] = {}
        self._malformed: dict[str, str] = {}
        self._searches: dict[tuple[str, tuple[str, ...], tuple[int, bool, str]], str | None] = {}
        self.default_dirs = (
            f"/lib/{self.triplet}",
            f"/usr/lib/{self.triplet}",
            "/lib64",
            "/usr/lib64",
            "/lib",
            "/usr/lib",
        )
        self.conf_dirs = tuple(self._read_ld_so_conf("/etc/ld.so.conf", depth=0))

    # Paths inside the tree

    def host(self, path: str) -> str:
        """Host path of an in-tree path that is already resolved (no symlinks to chase)."""
        return self._root + path

    def _readlink(self, path: str) -> str | None:
        try:
            return self._links[path]
        except KeyError:
            pass
        try:
            target: str | None = os.readlink(self._root + path)
        except OSError:
            target = None
        self._links[path] = target
        return target

    def canonical(self, path: str, links: list[str] | None = None, follow: bool = True) -> str:
        """Resolve `path` inside the tree like the kernel would under chroot.

        Symlinks met on the way, except the top-level ones (/lib -> usr/lib), are appended to
        `links`. With follow=False a final symlink is left unresolved. Missing components are not
        an error: the result simply does not exist.
        """
        return _resolve(path, self._readlink, links, follow)

    def _canonical_dir(self, directory: str) -> tuple[str, tuple[str, ...]]:
        try:
            return self._dirs[directory]
        except KeyError:
            pass
        links: list[str] = []
        result = (self.canonical(directory, links), tuple(links))
        self._dirs[directory] = result
        return result

    def tree_path(self, path: str) -> Path:
        """Host path of `path` inside the tree, every symlink resolved inside the tree."""
        return Path(self.host(self.canonical(path)))

    def _read_ld_so_conf(self, path: str, depth: int) -> Iterable[str]:
        # ldconfig has no include depth limit, but a tree including itself must not recurse forever.
        if depth > 8:
            raise BuildError(f"{path}: ld.so.conf includes nest too deeply (include loop?)")
        try:
            with open(self.host(self.canonical(path)), encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        for raw in lines:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            keyword, *rest = line.split()
            if keyword == "include":
                for pattern in rest:
                    if not pattern.startswith("/"):
                        pattern = posixpath.join(posixpath.dirname(path), pattern)
                    for conf in self._glob(pattern):
                        yield from self._read_ld_so_conf(conf, depth + 1)
            elif keyword == "hwcap":
                continue
            else:
                yield line

    def _glob(self, pattern: str) -> list[str]:
        directory, name = posixpath.split(pattern)
        real = self.canonical(directory)
        try:
            entries = os.listdir(self.host(real))
        except OSError:
            return []
        # ldconfig expands includes with glob(3), which sorts its results.
        return sorted(f"{real}/{entry}" for entry in entries if fnmatch.fnmatchcase(entry, name))

    # ELF files

    def _info(self, real: str) -> ElfInfo | None:
        """ElfInfo of a resolved in-tree path; None if it is not ELF or not a readable file."""
        try:
            return self._infos[real]
        except KeyError:
            pass
        if real in self._malformed:
            raise MalformedElf(self._malformed[real])
        try:
            info = read_elf(self.host(real))
        except MalformedElf as e:
            self._malformed[real] = f"{real}: malformed ELF: {e}"
            raise MalformedElf(self._malformed[real]) from e
        except (IsADirectoryError, FileNotFoundError, NotADirectoryError, PermissionError):
            info = None
        self._infos[real] = info
        return info

    def elf_info(self, path_in_tree: str) -> ElfInfo | None:
        """The ElfInfo of a file in the tree (symlinks followed); None for non-ELF files."""
        real = self.canonical(path_in_tree)
        if not os.path.isfile(self.host(real)):
            raise BuildError(f"{path_in_tree}: no such file in the image tree")
        return self._info(real)

    # Library search

    def _expand(self, entry: str, origin: str) -> list[str]:
        """Expand the dynamic string tokens of one RPATH/RUNPATH entry."""
        expanded = [entry.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)]
        expanded = [e.replace("${PLATFORM}", self.platform) for e in expanded]
        expanded = [e.replace("$PLATFORM", self.platform) for e in expanded]
        if "LIB" in entry:
            # Debian's ld.so expands $LIB to the multiarch directory; upstream x86_64 uses lib64.
            variants = (f"lib/{self.triplet}", "lib64", "lib")
            expanded = [
                e.replace("${LIB}", v).replace("$LIB", v) for e in expanded for v in variants
            ]
        # An empty entry means the current directory, which an image cannot rely on.
        return [posixpath.normpath(e if e.startswith("/") else f"/{e}") for e in expanded if e]

    def _own_rpath(self, real: str, info: ElfInfo) -> tuple[str, ...]:
        if info.runpath or not info.rpath:
            return ()
        origin = posixpath.dirname(real)
        return tuple(d for entry in info.rpath for d in self._expand(entry, origin))

    def search_dirs(
        self, real: str, info: ElfInfo, inherited_rpath: Sequence[str] = ()
    ) -> tuple[str, ...]:
        """Directories ld.so searches for the DT_NEEDED entries of `real`, in order.

        `inherited_rpath` holds the DT_RPATH directories of the objects that loaded this one,
        which glibc also searches when this object has no DT_RUNPATH.
        """
        origin = posixpath.dirname(real)
        if info.runpath:
            first = tuple(d for entry in info.runpath for d in self._expand(entry, origin))
        else:
            first = self._own_rpath(real, info) + tuple(inherited_rpath)
        return tuple(dict.fromkeys(first + self.conf_dirs + self.default_dirs))

    def _search(
        self, soname: str, dirs: tuple[str, ...], wanted: ElfInfo
    ) -> tuple[str, tuple[str, ...]] | None:
        """Find `soname` in `dirs` as a file compatible with `wanted`: (path, dir symlinks)."""
        if "/" in soname:
            path = self.canonical(posixpath.dirname(soname)) + "/" + posixpath.basename(soname)
            path = path.replace("//", "/")
            return (path, ()) if self._loadable(path, wanted) else None
        key = (soname, dirs, (wanted.elf_class, wanted.little_endian, wanted.machine))
        if key in self._searches:
            found = self._searches[key]
            return (
                None if found is None else (found, self._canonical_dir(posixpath.dirname(found))[1])
            )
        result = None
        for directory in dirs:
            real_dir, dir_links = self._canonical_dir(directory)
            path = f"{real_dir.rstrip('/')}/{soname}"
            if self._loadable(path, wanted):
                result = (path, dir_links)
                break
        self._searches[key] = None if result is None else result[0]
        return result

    def _loadable(self, path: str, wanted: ElfInfo) -> bool:
        real = self.canonical(path)
        try:
            info = self._info(real)
        except MalformedElf:
            return False
        return info is not None and wanted.compatible(info)

    def resolve(self, soname: str, needed_by: str) -> str | None:
        """Where ld.so finds `soname` for `needed_by`, as an in-tree path whose last component may
        be a symlink; None if it is nowhere in the tree."""
        real = self.canonical(needed_by)
        info = self._info(real)
        if info is None:
            raise BuildError(f"{needed_by}: not an ELF file, it has no libraries to resolve")
        found = self._search(soname, self.search_dirs(real, info), info)
        return None if found is None else found[0]

    # Initrd closure

    def shebang(self, real: str) -> str | None:
        """The interpreter named by a script's #! line, if `real` is such a script."""
        try:
            with open(self.host(real), "rb") as f:
                head = f.read(256)
        except OSError:
            return None
        if not head.startswith(b"#!"):
            return None
        words = head[2:].split(b"\n", 1)[0].split()
        return words[0].decode("utf-8", "surrogateescape") if words else None

    def closure(self, paths: Iterable[str], dlopen_features: Collection[str] = ()) -> list[str]:
        """Every in-tree path needed to run `paths`, sorted.

        That is the files themselves, their interpreters (ELF or #!), all DT_NEEDED libraries
        transitively, the libraries of the dlopen notes whose feature is in `dlopen_features`, and
        each symlink on the way to any of them (except the top-level merged-/usr links, which the
        caller creates). Raises BuildError listing everything that cannot be resolved.
        """
        paths = list(paths)
        features = frozenset(dlopen_features)
        files: set[str] = set()
        problems: list[str] = []
        features_seen: set[str] = set()
        for path in paths:
            process = _Process(self, features)
            process.add_root(path)
            process.run()
            files |= process.files
            problems += [f"{real}: {problem}" for real, problem in process.problems]
            features_seen |= process.features_seen
        unknown = features - features_seen
        if unknown:
            problems.append(
                f"no file in the closure declares dlopen features {', '.join(sorted(unknown))}"
            )
        if problems:
            raise BuildError(
                f"cannot collect the files to run {', '.join(paths)}:\n"
                + "\n".join(f"  {p}" for p in dict.fromkeys(problems)),
                hint="install the packages that provide them into the image",
            )
        return sorted(files)


class _Process:
    """What ld.so loads for one program: its files, and what it could not find.

    Like ld.so it loads breadth first and reuses an object already loaded under the requested name
    or SONAME before searching, which is how a library without a search path of its own (systemd's
    libsystemd-core needing libsystemd-shared) still finds its dependencies.
    """

    def __init__(self, resolver: Resolver, dlopen_features: frozenset[str]) -> None:
        self.resolver = resolver
        self.dlopen_features = dlopen_features
        self.files: set[str] = set()
        self.problems: list[tuple[str, str]] = []
        # (object, name) pairs whose dependency was found in this process
        self.satisfied: set[tuple[str, str]] = set()
        self.features_seen: set[str] = set()
        self._names: dict[str, str] = {}
        self._loaded: set[str] = set()
        self._queue: deque[tuple[str, ElfInfo, tuple[str, ...]]] = deque()
        self._dlopen: deque[tuple[str, ElfInfo, DlopenDependency, tuple[str, ...]]] = deque()

    def _file(self, path: str, links: list[str] | None = None) -> str | None:
        links = [] if links is None else links
        real = self.resolver.canonical(path, links)
        if not os.path.isfile(self.resolver.host(real)):
            return None
        self.files.update(links)
        self.files.add(real)
        return real

    def _info(self, real: str) -> ElfInfo | None:
        try:
            return self.resolver._info(real)
        except MalformedElf as e:
            self.problems.append((real, str(e).removeprefix(f"{real}: ")))
            return None

    def add_root(self, path: str, script: str | None = None) -> None:
        real = self._file(path)
        if real is None:
            if script is None:
                self.problems.append((path, "no such file in the image tree"))
            else:
                self.problems.append((script, f"interpreter {path} not found"))
            return
        if real in self._loaded:
            return
        info = self._info(real)
        if info is None:
            interpreter = self.resolver.shebang(real)
            if interpreter is not None:
                self.add_root(interpreter, script=real)
            return
        if info.interpreter is not None:
            self._add_interpreter(real, info)
        self._load(real, info, None, ())

    def _add_interpreter(self, real: str, info: ElfInfo) -> None:
        assert info.interpreter is not None
        interpreter = self._file(info.interpreter)
        loader = None if interpreter is None else self._info(interpreter)
        if loader is None:
            self.problems.append((real, f"PT_INTERP {info.interpreter} not found"))
        elif not info.compatible(loader):
            self.problems.append((real, f"PT_INTERP {info.interpreter} is {loader.describe}"))
        elif interpreter is not None:
            self._load(interpreter, loader, None, ())

    def _load(self, real: str, info: ElfInfo, name: str | None, inherited: tuple[str, ...]) -> None:
        if name is not None:
            self._names[name] = real
        if info.soname is not None:
            self._names.setdefault(info.soname, real)
        if real not in self._loaded:
            self._loaded.add(real)
            self._queue.append((real, info, inherited))

    def _need(
        self, real: str, info: ElfInfo, name: str, dirs: tuple[str, ...], inherit: tuple[str, ...]
    ) -> bool:
        if name in self._names:
            self.satisfied.add((real, name))
            return True
        found = self.resolver._search(name, dirs, info)
        if found is None:
            return False
        path, dir_links = found
        self.files.update(dir_links)
        library = self._file(path)
        library_info = None if library is None else self._info(library)
        if library is None or library_info is None:
            return False
        self.satisfied.add((real, name))
        self._load(library, library_info, name, inherit)
        return True

    def run(self) -> None:
        # dlopen() happens after start-up, when every DT_NEEDED object is already loaded.
        while self._queue or self._dlopen:
            if not self._queue:
                real, info, dependency, inherit = self._dlopen.popleft()
                self.features_seen.add(dependency.feature)
                dirs = self.resolver.search_dirs(real, info, inherit)
                if not any(self._need(real, info, s, dirs, inherit) for s in dependency.sonames):
                    self.problems.append(
                        (
                            real,
                            f"dlopen feature {dependency.feature!r} needs one of "
                            f"{', '.join(dependency.sonames)}, none is in the image tree",
                        )
                    )
                continue
            real, info, inherited = self._queue.popleft()
            dirs = self.resolver.search_dirs(real, info, inherited)
            inherit = self.resolver._own_rpath(real, info) + inherited
            for name in info.needed:
                if not self._need(real, info, name, dirs, inherit):
                    self.problems.append(
                        (real, f"DT_NEEDED {name} not found (searched: {':'.join(dirs)})")
                    )
            for dependency in info.dlopen:
                if dependency.feature in self.dlopen_features:
                    self._dlopen.append((real, info, dependency, inherited))


# The lint

LINTED_TYPES = frozenset({"ET_EXEC", "ET_DYN"})
MAGIC_THREADS = 8


def _walk_files(root: str) -> Iterable[str]:
    """In-tree paths of the regular files under root (no symlinks, pseudo-filesystems skipped)."""
    stack = [""]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(root + (directory or "/")))
        except OSError:
            continue
        for entry in entries:
            path = f"{directory}/{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                if not (directory == "" and entry.name in SKIPPED_TOP_DIRS):
                    stack.append(path)
            elif entry.is_file(follow_symlinks=False):
                yield path


def _has_elf_magic(host_path: str) -> bool:
    try:
        with open(host_path, "rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def _elf_files(root: str) -> list[str]:
    """In-tree paths of the files under root that start with the ELF magic, sorted."""
    paths = list(_walk_files(root))
    # Opening some 15,000 files is bound by disk latency when the page cache is cold; threads
    # overlap those waits (the reads release the GIL), which makes a cold run several times faster.
    chunks = [paths[i::MAGIC_THREADS] for i in range(MAGIC_THREADS)]
    with ThreadPoolExecutor(MAGIC_THREADS) as pool:
        found = pool.map(lambda chunk: [p for p in chunk if _has_elf_magic(root + p)], chunks)
    return sorted(path for chunk in found for path in chunk)


def lint_tree(tree: Path, machine: str = "EM_X86_64") -> list[LintProblem]:
    """Check every ELF file in the tree: machine, interpreter and DT_NEEDED resolution.

    A program (an object with PT_INTERP) is checked by loading it as ld.so would. A library is
    checked with its own search path, and a dependency it cannot find that way is excused only if
    some program in the tree loads it and, in that process, the dependency is already loaded.
    """
    resolver = Resolver(tree, machine)
    found: dict[str, list[str]] = {}
    # A library's dependencies not found with its own search path, and the text to report.
    unresolved: list[tuple[str, str, str]] = []
    satisfied: set[tuple[str, str]] = set()
    with complete_step(f"Checking ELF files in {tree}"):
        for path in _elf_files(resolver._root):
            try:
                info = resolver._info(path)
            except MalformedElf as e:
                found.setdefault(path, []).append(str(e).removeprefix(f"{path}: "))
                continue
            if info is None:
                continue
            if info.machine != machine:
                # A binary for another machine cannot run, so its libraries are beside the point.
                found.setdefault(path, []).append(
                    f"e_machine is {info.machine}, expected {machine}"
                )
                continue
            if info.type not in LINTED_TYPES:
                continue
            if info.interpreter is not None:
                process = _Process(resolver, frozenset())
                process.add_root(path)
                process.run()
                satisfied |= process.satisfied
                for real, problem in process.problems:
                    if real == path:
                        found.setdefault(path, []).append(problem)
                continue
            dirs = resolver.search_dirs(path, info)
            for name in info.needed:
                if resolver._search(name, dirs, info) is None:
                    text = f"DT_NEEDED {name} not found (searched: {':'.join(dirs)})"
                    unresolved.append((path, name, text))
        for path, name, text in unresolved:
            if (path, name) not in satisfied:
                found.setdefault(path, []).append(text)
    return [
        LintProblem(path.lstrip("/"), problem)
        for path in sorted(found)
        for problem in dict.fromkeys(found[path])
    ]


def format_problems(problems: Sequence[LintProblem]) -> str:
    """The lint's findings as one message, one offender per line."""
    if not problems:
        return "no ELF problems"
    count = len({p.path for p in problems})
    header = f"{count} ELF file{'s' if count != 1 else ''} cannot work in the image:"
    return "\n".join([header, *(f"  {p}" for p in problems)])

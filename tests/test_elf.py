"""ELF lint and library closure, on small merged-/usr trees built from the host's own binaries.

The trees hold copies of /usr/bin/ls, its libraries and the dynamic loader, plus a few objects
compiled here with gcc (RUNPATH with $ORIGIN, a library that relies on its program's search path,
a `.note.dlopen` note). Every test breaks a private copy of the tree in one way.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from builder.elf import (
    DlopenDependency,
    DlopenPriority,
    LintProblem,
    Resolver,
    format_problems,
    lint_tree,
    read_elf,
    tree_path,
)
from builder.errors import BuildError
from builder.run import run

MULTIARCH = "usr/lib/x86_64-linux-gnu"
LOADER = "/lib64/ld-linux-x86-64.so.2"
EM_AARCH64 = 183

# gcc and the x86_64 loader are host requirements of `./build.py test` (cli/test.py), so a
# missing one is a failure here, not a skip.

LIBBERTH_C = "int berth_value(void) { return 42; }\n"
USES_BERTH_C = "int berth_value(void);\nint berth_a(void) { return berth_value(); }\n"
PROG_C = "int berth_value(void);\nint main(void) { return berth_value() == 42 ? 0 : 1; }\n"
REL_C = "int berth_module(void) { return 1; }\n"
# The layout of systemd's ELF_NOTE_DLOPEN: an ELF note (owner "FDO", type 0x407c0c0a) whose
# descriptor is a NUL-terminated JSON array, in a section named .note.dlopen.
NOTE_C = r"""
#include <stdint.h>
#define NOTE(var, json)                                                              \
    __attribute__((used, section(".note.dlopen"), aligned(4))) static const struct { \
        struct { uint32_t n_namesz, n_descsz, n_type; } nhdr;                         \
        char name[4];                                                                 \
        _Alignas(4) char desc[(sizeof(json) + 3) & ~3];                               \
    } var = { { 4, sizeof(json), 0x407c0c0a }, "FDO", json }
NOTE(wanted, "[{\"feature\":\"berthfeature\",\"description\":\"Test feature\","
             "\"priority\":\"recommended\","
             "\"soname\":[\"libberth-missing.so.9\",\"libberth.so.1\"]}]");
NOTE(absent, "[{\"feature\":\"berthabsent\",\"description\":\"Never installed\","
             "\"priority\":\"suggested\",\"soname\":[\"libnothere.so.1\"]}]");
int berth_note(void) { return 0; }
"""


def gcc(workdir: Path, source: str, output: str, *args: str) -> Path:
    c_file = workdir / f"{output}.c"
    c_file.write_text(source)
    run(["gcc", "-O1", "-o", workdir / output, c_file, *args], quiet=True)
    return workdir / output


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("elf-objects")
    shared = ("-shared", "-fPIC")
    gcc(work, LIBBERTH_C, "libberth.so.1", *shared, "-Wl,-soname,libberth.so.1")
    link_berth = (f"-L{work}", "-Wl,--no-as-needed", "-l:libberth.so.1")
    gcc(work, USES_BERTH_C, "liba.so.1", *shared, "-Wl,-soname,liba.so.1", *link_berth)
    gcc(work, PROG_C, "runpath-prog", *link_berth, "-Wl,--enable-new-dtags,-rpath,$ORIGIN/lib")
    gcc(work, PROG_C, "rpath-prog", *link_berth, "-Wl,--disable-new-dtags,-rpath,$ORIGIN/lib")
    gcc(
        work,
        PROG_C,
        "chain-prog",
        *link_berth,
        "-l:liba.so.1",
        "-Wl,--enable-new-dtags,-rpath,/usr/lib/berth/private",
    )
    gcc(work, NOTE_C, "libnote.so.1", *shared, "-Wl,-soname,libnote.so.1")
    (work / "module.c").write_text(REL_C)
    run(["gcc", "-c", "-o", work / "module.ko", work / "module.c"], quiet=True)
    return work


def host_libraries(binary: str) -> list[str]:
    """The host's libraries for a binary, as ldd reports them (fixture set-up only)."""
    out = run(["ldd", binary], capture=True).stdout.decode()
    return [line.split()[2] for line in out.splitlines() if "=>" in line and "/" in line]


def install_library(tree: Path, host_path: str) -> None:
    """Copy a host library under its real name, with a relative soname link like the package has."""
    real = Path(os.path.realpath(host_path))
    shutil.copy2(real, tree / MULTIARCH / real.name)
    name = Path(host_path).name
    if name != real.name:
        (tree / MULTIARCH / name).symlink_to(real.name)


@pytest.fixture(scope="session")
def base_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("elf-base") / "tree"
    for directory in ("usr/bin", MULTIARCH, "usr/lib64", "etc/ld.so.conf.d", "proc", "opt/berth"):
        (tree / directory).mkdir(parents=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        (tree / link).symlink_to(f"usr/{link}")
    shutil.copy2("/usr/bin/ls", tree / "usr/bin/ls")
    for library in host_libraries("/usr/bin/ls"):
        install_library(tree, library)
    shutil.copy2(os.path.realpath(LOADER), tree / MULTIARCH / "ld-linux-x86-64.so.2")
    # Debian's own layout: an absolute link, which must be followed inside the tree.
    (tree / "usr/lib64/ld-linux-x86-64.so.2").symlink_to(
        "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    )
    (tree / "etc/ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    (tree / "etc/ld.so.conf.d/berth.conf").write_text("# extra libraries\n/opt/berth/lib\n")
    # Not ELF by magic: skipped, as compressed kernel modules are.
    (tree / "usr/lib/module.ko.xz").write_bytes(b"\xfd7zXZ\0" + bytes(64))
    # The host's /proc is never walked; this stands for whatever a tree's /proc might hold.
    (tree / "proc/garbage").write_bytes(b"\x7fELF" + bytes(60))
    return tree


@pytest.fixture
def tree(base_tree: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tree"
    shutil.copytree(base_tree, copy, symlinks=True)
    return copy


def patch_machine(path: Path, machine: int) -> None:
    data = bytearray(path.read_bytes())
    data[18:20] = machine.to_bytes(2, "little")
    path.write_bytes(bytes(data))


def offenders(problems: list[LintProblem]) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for problem in problems:
        result.setdefault(problem.path, []).append(problem.problem)
    return result


def lib(name: str) -> str:
    return f"/{MULTIARCH}/{name}"


# Resolving paths inside the tree


def test_tree_path_follows_absolute_and_relative_links_inside_the_tree(tree: Path) -> None:
    assert tree_path(tree, LOADER) == tree / MULTIARCH / "ld-linux-x86-64.so.2"
    assert tree_path(tree, "/bin/../lib/x86_64-linux-gnu") == tree / MULTIARCH
    # ".." at the root stays at the root, as under chroot.
    assert tree_path(tree, "/../../usr/bin/ls") == tree / "usr/bin/ls"
    (tree / "usr/bin/escape").symlink_to("../../../../../../etc/hostname")
    assert tree_path(tree, "/usr/bin/escape") == tree / "etc/hostname"


def test_symlink_loop_is_an_error(tree: Path) -> None:
    (tree / "usr/bin/loop-a").symlink_to("loop-b")
    (tree / "usr/bin/loop-b").symlink_to("/bin/loop-a")
    with pytest.raises(BuildError, match="too many levels"):
        tree_path(tree, "/usr/bin/loop-a")


# The lint


def test_lint_passes_on_a_complete_tree(tree: Path) -> None:
    assert lint_tree(tree) == []
    assert format_problems([]) == "no ELF problems"


def test_missing_library_is_listed_with_its_name(tree: Path) -> None:
    (tree / MULTIARCH / "libselinux.so.1").unlink()
    problems = lint_tree(tree)
    assert [p.path for p in problems] == ["usr/bin/ls"]
    assert problems[0].problem.startswith("DT_NEEDED libselinux.so.1 not found (searched: ")
    assert "/opt/berth/lib" in problems[0].problem
    assert str(problems[0]).startswith("usr/bin/ls: DT_NEEDED libselinux.so.1 not found")
    assert format_problems(problems).splitlines() == [
        "1 ELF file cannot work in the image:",
        f"  {problems[0]}",
    ]


def test_missing_dependency_of_a_library_is_listed_at_the_library(tree: Path) -> None:
    pcre = tree / MULTIARCH / "libpcre2-8.so.0"
    os.unlink(tree / MULTIARCH / os.readlink(pcre))
    problems = offenders(lint_tree(tree))
    assert list(problems) == [f"{MULTIARCH}/libselinux.so.1"]
    assert "DT_NEEDED libpcre2-8.so.0 not found" in problems[f"{MULTIARCH}/libselinux.so.1"][0]


def test_foreign_machine_is_an_offender(tree: Path) -> None:
    shutil.copy2(tree / "usr/bin/ls", tree / "usr/bin/foreign")
    patch_machine(tree / "usr/bin/foreign", EM_AARCH64)
    assert lint_tree(tree) == [
        LintProblem("usr/bin/foreign", "e_machine is EM_AARCH64, expected EM_X86_64")
    ]


def test_missing_interpreter_is_an_offender(tree: Path) -> None:
    (tree / MULTIARCH / "ld-linux-x86-64.so.2").unlink()
    problems = offenders(lint_tree(tree))
    assert problems["usr/bin/ls"] == [f"PT_INTERP {LOADER} not found"]


def test_kernel_modules_only_get_the_machine_check(tree: Path, compiled: Path) -> None:
    modules = tree / "usr/lib/modules/6.12.0/kernel"
    modules.mkdir(parents=True)
    shutil.copy2(compiled / "module.ko", modules / "good.ko")
    shutil.copy2(compiled / "module.ko", modules / "foreign.ko")
    patch_machine(modules / "foreign.ko", EM_AARCH64)
    assert lint_tree(tree) == [
        LintProblem(
            "usr/lib/modules/6.12.0/kernel/foreign.ko",
            "e_machine is EM_AARCH64, expected EM_X86_64",
        )
    ]


def test_library_found_through_ld_so_conf_d(tree: Path) -> None:
    pcre = tree / MULTIARCH / "libpcre2-8.so.0"
    real = tree / MULTIARCH / os.readlink(pcre)
    (tree / "opt/berth/lib").mkdir()
    real.rename(tree / "opt/berth/lib/libpcre2-8.so.0")
    pcre.unlink()
    assert lint_tree(tree) == []
    resolver = Resolver(tree)
    assert resolver.conf_dirs == ("/opt/berth/lib",)
    assert (
        resolver.resolve("libpcre2-8.so.0", lib("libselinux.so.1"))
        == "/opt/berth/lib/libpcre2-8.so.0"
    )
    # Without the include the library is nowhere ld.so would look.
    (tree / "etc/ld.so.conf").write_text("# nothing\n")
    assert [p.path for p in lint_tree(tree)] == [f"{MULTIARCH}/libselinux.so.1"]


def test_incompatible_candidate_is_skipped_like_ld_so_does(tree: Path) -> None:
    (tree / "opt/berth/lib").mkdir()
    foreign = tree / "opt/berth/lib/libc.so.6"
    shutil.copy2(tree / MULTIARCH / "libc.so.6", foreign)
    patch_machine(foreign, EM_AARCH64)
    # The conf directory comes first, but its libc is for another machine.
    assert Resolver(tree).resolve("libc.so.6", "/bin/ls") == lib("libc.so.6")
    assert [p.path for p in lint_tree(tree)] == ["opt/berth/lib/libc.so.6"]


def test_runpath_with_origin(tree: Path, compiled: Path) -> None:
    (tree / "usr/libexec/berth/lib").mkdir(parents=True)
    shutil.copy2(compiled / "runpath-prog", tree / "usr/libexec/berth/prog")
    shutil.copy2(compiled / "libberth.so.1", tree / "usr/libexec/berth/lib/libberth.so.1")
    # $ORIGIN is the directory of the real file, not of a link to it.
    (tree / "usr/bin/berth-prog").symlink_to("../libexec/berth/prog")
    info = Resolver(tree).elf_info("/usr/bin/berth-prog")
    assert info is not None
    assert info.runpath == ("$ORIGIN/lib",)
    assert info.rpath == ()
    assert info.needed == ("libberth.so.1", "libc.so.6")
    assert lint_tree(tree) == []
    resolver = Resolver(tree)
    assert resolver.resolve("libberth.so.1", "/usr/bin/berth-prog") == (
        "/usr/libexec/berth/lib/libberth.so.1"
    )
    closure = resolver.closure(["/usr/bin/berth-prog"])
    assert {"/usr/bin/berth-prog", "/usr/libexec/berth/prog"} <= set(closure)
    assert "/usr/libexec/berth/lib/libberth.so.1" in closure

    (tree / "usr/libexec/berth/lib/libberth.so.1").rename(tree / "usr/libexec/libberth.so.1")
    problems = lint_tree(tree)
    assert [p.path for p in problems] == ["usr/libexec/berth/prog"]
    assert (
        "DT_NEEDED libberth.so.1 not found (searched: /usr/libexec/berth/lib:"
        in problems[0].problem
    )


def test_rpath_with_origin(tree: Path, compiled: Path) -> None:
    (tree / "usr/libexec/berth/lib").mkdir(parents=True)
    shutil.copy2(compiled / "rpath-prog", tree / "usr/libexec/berth/prog")
    shutil.copy2(compiled / "libberth.so.1", tree / "usr/libexec/berth/lib/libberth.so.1")
    info = Resolver(tree).elf_info("/usr/libexec/berth/prog")
    assert info is not None
    assert (info.rpath, info.runpath) == (("$ORIGIN/lib",), ())
    assert lint_tree(tree) == []


def test_absolute_symlink_resolves_inside_the_tree(tree: Path) -> None:
    # The link's target exists only in the tree ...
    hidden = "/usr/lib/berth-only-in-tree"
    assert not Path(hidden).exists()
    (tree / hidden.lstrip("/")).mkdir()
    selinux = tree / MULTIARCH / "libselinux.so.1"
    selinux.rename(tree / hidden.lstrip("/") / "libselinux.so.1.real")
    selinux.symlink_to(f"{hidden}/libselinux.so.1.real")
    assert lint_tree(tree) == []
    resolver = Resolver(tree)
    assert resolver.resolve("libselinux.so.1", "/usr/bin/ls") == lib("libselinux.so.1")
    assert f"{hidden}/libselinux.so.1.real" in resolver.closure(["/usr/bin/ls"])


def test_absolute_symlink_never_reaches_the_host(tree: Path) -> None:
    # ... and here only on the host: the tree's own target is gone.
    pcre = tree / MULTIARCH / "libpcre2-8.so.0"
    real_name = os.readlink(pcre)
    assert Path(f"/usr/lib/x86_64-linux-gnu/{real_name}").exists()
    (tree / MULTIARCH / real_name).unlink()
    pcre.unlink()
    pcre.symlink_to(f"/usr/lib/x86_64-linux-gnu/{real_name}")
    problems = lint_tree(tree)
    assert [p.path for p in problems] == [f"{MULTIARCH}/libselinux.so.1"]
    assert "libpcre2-8.so.0 not found" in problems[0].problem


def test_library_may_rely_on_what_its_program_loaded(tree: Path, compiled: Path) -> None:
    # Like systemd's libsystemd-core: no search path of its own, its dependency is loaded first
    # through the program's RUNPATH, and ld.so reuses it by name.
    private = tree / "usr/lib/berth/private"
    private.mkdir(parents=True)
    shutil.copy2(compiled / "liba.so.1", private / "liba.so.1")
    shutil.copy2(compiled / "libberth.so.1", private / "libberth.so.1")
    shutil.copy2(compiled / "chain-prog", tree / "usr/bin/chain-prog")
    assert lint_tree(tree) == []
    assert "/usr/lib/berth/private/liba.so.1" in Resolver(tree).closure(["/bin/chain-prog"])
    # Without a program to load it first, the library cannot find its dependency.
    (tree / "usr/bin/chain-prog").unlink()
    problems = lint_tree(tree)
    assert [p.path for p in problems] == ["usr/lib/berth/private/liba.so.1"]
    assert problems[0].problem.startswith("DT_NEEDED libberth.so.1 not found")


def test_malformed_elf_is_an_offender(tree: Path) -> None:
    (tree / "usr/bin/truncated").write_bytes((tree / "usr/bin/ls").read_bytes()[:40])
    problems = lint_tree(tree)
    assert [p.path for p in problems] == ["usr/bin/truncated"]


# ElfInfo and the initrd closure


def test_elf_info_of_ls(tree: Path) -> None:
    resolver = Resolver(tree)
    info = resolver.elf_info("/bin/ls")
    assert info is not None
    assert (info.machine, info.elf_class, info.type) == ("EM_X86_64", 64, "ET_DYN")
    assert info.interpreter == LOADER
    assert "libc.so.6" in info.needed
    assert info.soname is None
    assert info.dlopen == ()
    libc = resolver.elf_info(lib("libc.so.6"))
    assert libc is not None and libc.soname == "libc.so.6"
    assert resolver.elf_info("/etc/ld.so.conf") is None
    with pytest.raises(BuildError, match="no such file"):
        resolver.elf_info("/usr/bin/nothere")


def test_closure_of_ls(tree: Path) -> None:
    expected = {"/usr/bin/ls", "/usr/lib64/ld-linux-x86-64.so.2", lib("ld-linux-x86-64.so.2")}
    for library in host_libraries("/usr/bin/ls"):
        name, real = Path(library).name, Path(os.path.realpath(library)).name
        expected |= {lib(name), lib(real)}
    closure = Resolver(tree).closure(["/bin/ls"])
    assert closure == sorted(expected)
    assert lib("libc.so.6") in closure
    assert lib("libpcre2-8.so.0") in closure


def test_closure_names_what_is_missing(tree: Path) -> None:
    (tree / MULTIARCH / "libselinux.so.1").unlink()
    with pytest.raises(BuildError, match=r"/usr/bin/ls: DT_NEEDED libselinux\.so\.1 not found"):
        Resolver(tree).closure(["/usr/bin/ls"])
    with pytest.raises(BuildError, match="no such file"):
        Resolver(tree).closure(["/usr/bin/nothere"])


def test_closure_follows_script_interpreters(tree: Path) -> None:
    (tree / "usr/bin/script").write_text("#!/bin/ls -l\n")
    closure = Resolver(tree).closure(["/usr/bin/script"])
    assert {"/usr/bin/script", "/usr/bin/ls", lib("libc.so.6")} <= set(closure)


def test_dlopen_note_is_read(compiled: Path) -> None:
    info = read_elf(compiled / "libnote.so.1")
    assert info is not None
    # The compiler may emit the two notes in either order.
    assert set(info.dlopen) == {
        DlopenDependency(
            feature="berthfeature",
            description="Test feature",
            priority=DlopenPriority.RECOMMENDED,
            sonames=("libberth-missing.so.9", "libberth.so.1"),
        ),
        DlopenDependency(
            feature="berthabsent",
            description="Never installed",
            priority=DlopenPriority.SUGGESTED,
            sonames=("libnothere.so.1",),
        ),
    }


def test_closure_includes_wanted_dlopen_features_only(tree: Path, compiled: Path) -> None:
    shutil.copy2(compiled / "libnote.so.1", tree / MULTIARCH / "libnote.so.1")
    shutil.copy2(compiled / "libberth.so.1", tree / MULTIARCH / "libberth.so.1")
    resolver = Resolver(tree)
    assert lib("libberth.so.1") not in resolver.closure([lib("libnote.so.1")])
    # The first soname is absent, the second one is taken.
    assert lib("libberth.so.1") in resolver.closure([lib("libnote.so.1")], ["berthfeature"])
    with pytest.raises(BuildError, match=r"'berthabsent' needs one of libnothere\.so\.1"):
        resolver.closure([lib("libnote.so.1")], ["berthabsent"])
    with pytest.raises(BuildError, match="declares dlopen features nosuchfeature"):
        resolver.closure([lib("libnote.so.1")], ["nosuchfeature"])

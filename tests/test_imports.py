"""The import graph keeps the layout's promises: which package may import which, and no cycles.

Read from the source with ast, not by importing it, so that an import inside a function or under
TYPE_CHECKING counts as well: it is an arrow of the design all the same.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import REPO

PACKAGES = ("builder", "cli", "qemu", "updater")
# What each package must never import, and why.
FORBIDDEN: Mapping[str, tuple[str, ...]] = {
    # The builder is a library that front ends call; it boots nothing and parses no command line.
    "builder": ("qemu", "cli", "tests", "bench"),
    # The VM harness may use the builder's lower modules (run, log, errors), never its front end.
    "qemu": ("cli", "tests", "bench"),
    # The agent is installed into the image alone and runs on the image's own Python.
    "updater": ("builder", "qemu", "cli", "tests", "bench"),
    "cli": ("tests", "bench"),
}


@dataclass(frozen=True)
class Arrow:
    source: str  # importing module, e.g. builder.image
    target: str  # imported module, e.g. builder.publish
    where: str  # file:line, for the message

    def __str__(self) -> str:
        return f"{self.where}: {self.source} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            # A relative import counts from the importing module's package.
            base = module.split(".")
            base = base[: len(base) - node.level + (1 if is_package else 0)]
            prefix = ".".join([*base, node.module] if node.module else base)
        else:
            prefix = node.module or ""
        yield prefix
        # `from builder import publish` imports the module builder.publish.
        yield from (f"{prefix}.{alias.name}" for alias in node.names)


def import_graph(modules: Mapping[str, Path]) -> list[Arrow]:
    arrows = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            for target in _imported(node, module, path.name == "__init__.py"):
                top = target.split(".")[0]
                if target in modules or top in ("tests", "bench"):
                    where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
                    arrows.append(Arrow(module, target, where))
    return arrows


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
    }


def cycles(arrows: list[Arrow], depth: int) -> list[list[Arrow]]:
    """Cycles between the packages and modules named by the first `depth` parts of their names.

    Depth 1 compares top-level packages (builder, qemu, ...), depth 2 their direct parts
    (updater.release, builder.publish, builder.image ...), and so on: a cycle at any depth is
    one between two rooms that should be one, or whose concerns are split wrongly.
    """

    def node(module: str) -> str:
        return ".".join(module.split(".")[:depth])

    edges: dict[str, dict[str, Arrow]] = {}
    for arrow in arrows:
        a, b = node(arrow.source), node(arrow.target)
        if a != b:
            edges.setdefault(a, {}).setdefault(b, arrow)
    found: list[list[Arrow]] = []
    done: set[str] = set()

    def walk(current: str, path: list[str]) -> None:
        for nxt in sorted(edges.get(current, {})):
            if nxt in path:
                start = path.index(nxt)
                ring = [*path[start:], nxt]
                found.append([edges[x][y] for x, y in itertools.pairwise(ring)])
            elif nxt not in done:
                walk(nxt, [*path, nxt])
        done.add(current)

    for start in sorted(edges):
        if start not in done:
            walk(start, [start])
    return found


def test_the_scan_sees_the_imports_it_judges() -> None:
    # A scan that found nothing would pass every rule below.
    modules = project_modules()
    arrows = {(a.source, a.target) for a in import_graph(modules)}
    assert {"builder.image", "cli.main", "qemu.vm", "updater.agent"} <= set(modules)
    assert ("cli.run", "qemu.__main__") in arrows
    assert ("qemu.vm", "builder.run") in arrows
    # Inside a function: the image builder loads the publisher only to create development keys.
    assert ("builder.image", "builder.publish") in arrows


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_only_what_its_room_allows(package: str) -> None:
    wrong = [
        str(arrow)
        for arrow in import_graph(project_modules())
        if arrow.source.split(".")[0] == package
        and arrow.target.split(".")[0] in FORBIDDEN[package]
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_packages_or_modules() -> None:
    modules = project_modules()
    arrows = import_graph(modules)
    deepest = max(len(name.split(".")) for name in modules)
    found = [ring for depth in range(1, deepest + 1) for ring in cycles(arrows, depth)]
    assert not found, "\n\n".join("\n".join(map(str, ring)) for ring in found)


def test_a_cycle_is_reported_with_the_imports_that_make_it() -> None:
    arrows = [
        Arrow("builder.cli", "qemu.__main__", "builder/cli.py:1"),
        Arrow("qemu.vm", "builder.log", "qemu/vm.py:2"),
        Arrow("qemu.vm", "updater.files", "qemu/vm.py:3"),
    ]
    assert cycles(arrows, 1) == [[arrows[0], arrows[1]]]
    assert cycles(arrows, 2) == []


# updater/'s rooms from the bottom up (docs/architecture.md): each may import only rooms of a
# lower layer. provision/ stands beside the update packages and uses layer 0 alone.
UPDATER_LAYERS: tuple[frozenset[str], ...] = tuple(
    frozenset(layer)
    for layer in (
        {"updater.errors", "updater.files", "updater.limits", "updater.run"},
        {"updater.release"},
        {"updater.disk"},
        {"updater.reboot"},
        {"updater.config"},
        {"updater.update"},
        {"updater.agent"},
        {"updater.service"},
        {"updater.cli", "updater.__main__", "updater.progress"},
    )
)
PROVISION = "updater.provision"


def updater_room(module: str) -> str | None:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "updater" and len(parts) > 1 else None


def layer_violations(arrows: list[Arrow]) -> list[str]:
    rank = {room: i for i, layer in enumerate(UPDATER_LAYERS) for room in layer}
    top = len(UPDATER_LAYERS) - 1
    wrong = []
    for arrow in arrows:
        source, target = updater_room(arrow.source), updater_room(arrow.target)
        if source is None or target is None or source == target:
            continue
        if source == PROVISION:
            allowed = rank.get(target) == 0
        elif target == PROVISION:
            allowed = False  # only berth-provision's own entry point runs it
        elif source not in rank or target not in rank:
            allowed = False  # a new room: give it its layer above first
        else:
            # The shared modules of layer 0 use each other (run raises errors' types), and so do
            # the front end's at the top; between those, strictly downwards.
            same = rank[source] == rank[target] in (0, top)
            allowed = rank[target] < rank[source] or same
        if not allowed:
            wrong.append(str(arrow))
    return wrong


def test_updater_rooms_import_only_downwards() -> None:
    wrong = layer_violations(import_graph(project_modules()))
    assert not wrong, "\n".join(wrong)


def test_an_upward_import_in_updater_is_named() -> None:
    arrows = [
        Arrow("updater.disk.slots", "updater.release.version", "updater/disk/slots.py:1"),
        Arrow("updater.reboot.gate", "updater.config", "updater/reboot/gate.py:2"),
        Arrow("updater.provision.apply", "updater.files", "updater/provision/apply.py:3"),
        Arrow("updater.provision.apply", "updater.disk.gpt", "updater/provision/apply.py:4"),
        Arrow("updater.cli", "updater.progress", "updater/cli.py:5"),
        Arrow("updater.newroom.x", "updater.files", "updater/newroom/x.py:6"),
    ]
    assert layer_violations(arrows) == [
        "updater/reboot/gate.py:2: updater.reboot.gate imports updater.config",
        "updater/provision/apply.py:4: updater.provision.apply imports updater.disk.gpt",
        "updater/newroom/x.py:6: updater.newroom.x imports updater.files",
    ]

"""The house of docs/architecture.md, read from the picture there and held against the code: every room the picture
names exists and every module is in a room of it; every import (at module level and inside functions) runs down the
picture or stays in its room; no module reaches itself through its imports; a package's command (`cli`) is entered
only through its doors; and the top floor holds only the foundation, the pipeline file and thin doors."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lunggen_diffusers"
PICTURE = ROOT / "docs" / "architecture.md"
DOOR_LINES = 40


def read_picture() -> list[tuple[str, list[str]]]:
    """The picture's floors, top first: ("doors", [module, ...]), ("training", [package]), ...,
    ("foundation", [module, ...])."""
    block = PICTURE.read_text().split("<!-- the house -->")[1].split("```")[1]
    floors = []
    for line in block.splitlines():
        found = re.match(r"^  (\w+)([/:])\s+(.*)$", line)
        if found:
            name, kind, rest = found.groups()
            floors.append((name, [name] if kind == "/" else rest.split()))
    return floors


FLOORS = read_picture()
DOORS = dict(FLOORS)["doors"]
FOUNDATION = dict(FLOORS)["foundation"]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _room(module: str) -> str:
    """The room a module lives in: its subpackage, or itself at the top."""
    return module.removeprefix("lunggen_diffusers.").split(".")[0] if module != "lunggen_diffusers" else "__init__"


def _floor(module: str) -> int:
    room = _room(module)
    for depth, (_, rooms) in enumerate(FLOORS):
        if room in rooms:
            return len(FLOORS) - depth  # the foundation is floor 1
    if room == "__init__":
        return 1
    raise AssertionError(f"{module} is in no room of the picture in {PICTURE.name}: draw it there")


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):  # every import, in functions too
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            while name not in MODULES and "." in name:
                name = name.rpartition(".")[0]
            if name in MODULES and name != module:
                found.add(name)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def test_the_picture_and_the_graph_are_read():
    assert [name for name, _ in FLOORS] == ["doors", "training", "hub", "reader_study", "utility", "evaluation",
                                            "generation", "data", "foundation"]
    assert "lunggen_diffusers.generation.sampling" in GRAPH["lunggen_diffusers.generation.output_folder"]
    assert "lunggen_diffusers.hub.export" in GRAPH["lunggen_diffusers.training.diffusion"]
    assert not GRAPH["lunggen_diffusers.lunggen_pipeline"]  # shipped as remote code: torch and diffusers only


def test_every_room_of_the_picture_is_in_the_code_and_every_top_module_in_the_picture():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    drawn = {room for _, rooms in FLOORS for room in rooms}
    assert drawn == top | packages, f"drawn but not in the code: {sorted(drawn - top - packages)}; in the code but " \
                                    f"not drawn: {sorted(top | packages - drawn)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_runs_up_the_picture(module):
    upward = sorted(m for m in GRAPH[module] if _floor(m) > _floor(module))
    assert not upward, f"{module} (room {_room(module)}) imports rooms drawn above it: {upward}"


def test_commands_are_entered_only_through_their_doors():
    """A package's `cli` is where its command parses its flags; nothing but a door (or a `__main__`) calls it."""
    for module, imported in GRAPH.items():
        door = _room(module) in DOORS or module.endswith("__main__")
        for target in imported:
            command = target.count(".") == 2 and target.endswith(".cli")  # not the foundation's own cli
            assert door or not command, f"{module} imports the command {target}"


@pytest.mark.parametrize("door", DOORS)
def test_doors_are_thin(door):
    lines = (PACKAGE / f"{door}.py").read_text().splitlines()
    assert len(lines) <= DOOR_LINES, f"{door}.py has {len(lines)} lines: its work belongs in a room below"
    assert not [n for n in ast.parse("\n".join(lines)).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))], \
        f"{door}.py defines something: a door only imports a command and calls it"


def test_no_module_reaches_itself():
    def cycle_from(start):
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in GRAPH[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(GRAPH)) if c]
    assert not cycles, " -> ".join(cycles[0])


def test_no_test_file_imports_another_or_conftest():
    """What several test files share lives in tests/fixtures; a test file imported by another runs its module-level
    code twice and ties the two together."""
    tests = Path(__file__).resolve().parent
    names = {p.stem for p in tests.glob("test_*.py")} | {"conftest"}
    found = []
    for path in tests.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found += [f"{path.name}: {name}" for name in imported if name.split(".")[0] in names]
    assert not found, found

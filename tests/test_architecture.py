"""The house rules of docs/architecture.md, read from the code: every import (at module level and inside functions)
runs from a higher layer to a lower one or within a layer, and no module reaches itself through its imports."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lunggen_diffusers"

# Lowest first; a module may import its own layer and those below (docs/architecture.md, "Layers").
LAYERS = {
    "foundation": ["lunggen_diffusers", "cli", "config", "utils", "runtime", "summaries", "lunggen_pipeline",
                   "vocabulary"],
    "parts": ["data", "data.*", "model", "autoencoder", "latents", "loop", "conditioning", "sampling", "output_folder",
              "checkpoints", "evaluation",
              "evaluation.*", "hub", "hub.privacy", "hub.card", "hub.push", "hub.export", "utility",
              "utility.stats", "utility.classifier", "utility.report", "utility.data", "utility.subgroups"],
    "work": ["training", "autoencoder_training", "prepare", "evaluation.run", "utility.run"],
    "commands": ["train", "generate", "evaluate", "autoencoder_report", "utility.__main__", "hub.cli", "hub.__main__"],
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    short = module.removeprefix("lunggen_diffusers.")
    matches = [(len(p), i) for i, patterns in enumerate(LAYERS.values()) for p in patterns
               if short == p or (p.endswith(".*") and short.startswith(p[:-1]))]
    assert matches, f"{module} is in no layer: give it one in LAYERS and in docs/architecture.md"
    return max(matches)[1]  # the most specific pattern wins (evaluation.run over evaluation.*)


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


def test_the_graph_is_read_from_the_code():
    assert "lunggen_diffusers.sampling" in GRAPH["lunggen_diffusers.output_folder"]
    assert "lunggen_diffusers.hub.export" in GRAPH["lunggen_diffusers.training"]
    assert not GRAPH["lunggen_diffusers.lunggen_pipeline"]  # shipped as remote code: torch and diffusers only


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_runs_up_a_layer(module):
    upward = sorted(m for m in GRAPH[module] if _layer(m) > _layer(module))
    assert not upward, f"{module} ({list(LAYERS)[_layer(module)]}) imports higher layers: {upward}"


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

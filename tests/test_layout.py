"""The package layout's rules, checked on the code itself:

- Ray enters only through the `ray_*.py` module of a stage (at most one per stage): no other module
  imports `ray`, directly or through another pipeline module.
- The pure core (`pipeline.core`) really imports no ray when loaded (checked in a fresh process).
- Stages import only stages below them: data < core < methods < training < inference < temporal
  < tuning.
- No module, job or bench script cites a file outside the repository.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGE = REPOSITORY / "pipeline"
STAGE_ORDER = ("data", "core", "methods", "training", "inference", "temporal", "tuning")
"""Lower stages first; a module may import its own stage and the ones before it."""
SHARED = {"pipeline", "pipeline.config", "pipeline.progress", "pipeline.demo"}
"""Importable from anywhere: the package root (version), typed configs, progress lines, the demo corpus."""


def module_name(path: Path) -> str:
    parts = path.relative_to(REPOSITORY).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every absolute module an import statement in `path` names (`from a import b` gives a and
    a.b, since b may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
IMPORTS = {name: {imported for imported in imported_modules(path)
                  if imported in MODULES or imported.split(".")[0] == "ray"}
           for name, path in MODULES.items()}


def is_ray_edge(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("ray_")


def stage_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGE_ORDER else None


def ray_path(name: str, seen: frozenset[str] = frozenset()) -> list[str] | None:
    """The import chain from `name` to `ray`, or None."""
    for imported in sorted(IMPORTS[name]):
        if imported.split(".")[0] == "ray":
            return [name, imported]
        if imported in MODULES and imported not in seen:
            chain = ray_path(imported, seen | {name})
            if chain:
                return [name, *chain]
    return None


def test_the_import_graph_is_read():
    # Guards the checks below against passing on an empty graph.
    assert "pipeline.data.ray_ingest" in MODULES and "pipeline.core.thresholds" in MODULES
    assert "ray.data" in IMPORTS["pipeline.data.ray_ingest"]
    assert "pipeline.data.schema" in IMPORTS["pipeline.core.thresholds"]
    assert ray_path("pipeline.inference.ray_inference") is not None


@pytest.mark.parametrize("name", [name for name in MODULES if not is_ray_edge(name)])
def test_only_ray_edges_import_ray(name):
    assert ray_path(name) is None, " -> ".join(ray_path(name))


def test_at_most_one_ray_edge_per_stage():
    edges: dict[str, list[str]] = {}
    for name in MODULES:
        if is_ray_edge(name):
            edges.setdefault(stage_of(name) or name, []).append(name)
    assert {stage: names for stage, names in edges.items() if len(names) > 1} == {}
    assert set(edges) <= set(STAGE_ORDER), f"a ray_ module outside the stage packages: {edges}"


@pytest.mark.parametrize("name", [name for name in MODULES if stage_of(name)])
def test_stages_import_only_stages_below(name):
    rank = STAGE_ORDER.index(stage_of(name))
    upward = sorted(imported for imported in IMPORTS[name] if imported in MODULES
                    and stage_of(imported) and STAGE_ORDER.index(stage_of(imported)) > rank)
    assert upward == [], f"{name} imports a later stage"


def test_modules_outside_the_stages_are_the_shared_ones():
    loose = {name for name in MODULES if not stage_of(name) and not name.startswith("pipeline.demo")}
    assert loose <= SHARED


def test_the_pure_core_loads_without_ray():
    core = sorted(name for name in MODULES if stage_of(name) in ("core", "methods"))
    code = f"import sys; import {', '.join(core)}; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=REPOSITORY, timeout=120)
    assert result.stdout.strip() == "False"


OUTSIDE_REFERENCE = re.compile(r"\.\./shared|\b(METHODS|PERF|RAY-2\.60|GPU|CLUSTER|TUNE|STYLE)\.md\b")


@pytest.mark.parametrize("folder", ["pipeline", "jobs", "bench", "tests", "cluster", "docs"])
def test_nothing_cites_a_file_outside_the_repository(folder):
    this_file = Path(__file__).resolve()
    cited = [f"{path.relative_to(REPOSITORY)}:{number}"
             for path in sorted((REPOSITORY / folder).rglob("*"))
             if path.suffix in {".py", ".md", ".yaml"} and path.resolve() != this_file
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if OUTSIDE_REFERENCE.search(line)]
    assert cited == []

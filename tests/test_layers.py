"""The house's shape: imports only point down (the layers contract in pyproject.toml, checked by
import-linter as `make lint` checks it), and no module imports one that imports it back, deferred imports
included (docs/architecture.md)."""

import subprocess
import sys
from pathlib import Path

import grimp

from tests.conftest import ROOT


def test_imports_only_point_down():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_no_module_imports_one_that_imports_it_back():
    graph = grimp.build_graph("vdvae", "hydra_plugins.vdvae_sweepers")
    cycles = [
        f"{importer} -> {imported} -> ... -> {importer}"
        for importer in sorted(graph.modules)
        for imported in sorted(graph.find_modules_directly_imported_by(importer))
        if graph.find_shortest_chain(importer=imported, imported=importer)
    ]
    assert not cycles, "\n".join(cycles)

"""The repository's layout never shadows a third-party module (DESIGN §1).

Python puts the working directory first on ``sys.path`` for ``python -m …``, ``python -c``,
torchrun and notebooks, so a top-level folder with an ``__init__.py`` (or a top-level ``.py``
file) named like an installed module wins over the installed one: transformers ≥ 5.25 imports the
hub package ``kernels`` at start-up, and a ``kernels/__init__.py`` at our root broke every such run.
"""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _from_root(code: str) -> subprocess.CompletedProcess:
    """Run ``python -c code`` with the repository root as working directory (and so first on sys.path)."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def _root_importables() -> set[str]:
    """Top-level names the repository root makes importable: packages and ``.py`` modules."""
    names = {p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return names | {p.stem for p in REPO.glob("*.py")}


def test_slope_is_the_only_package_at_the_root():
    assert _root_importables() == {"slope"}, (
        "a top-level folder with __init__.py (or a top-level .py) is importable from the repository "
        "root and can shadow a third-party module; put Python code under slope/"
    )


def test_no_installed_top_level_module_resolves_into_the_repository():
    """Every top-level module of an installed distribution (but slope) resolves to its installed
    copy (a venv inside the checkout counts as installed), never to the repository's own files."""
    third_party = sorted(
        name for name, dists in importlib.metadata.packages_distributions().items()
        if name.isidentifier() and "slope" not in dists
    )
    assert "torch" in third_party  # the listing itself works
    code = (
        "import importlib.util, json, os, sys\n"
        f"names, root = {third_party!r}, {str(REPO)!r} + os.sep\n"
        "bad = {}\n"
        "for name in names:\n"
        "    try:\n"
        "        spec = importlib.util.find_spec(name)\n"
        "    except Exception:\n"
        "        continue\n"
        "    where = [spec.origin] if spec and spec.origin else list(spec.submodule_search_locations or []) if spec else []\n"
        "    hits = [w for w in where if os.path.abspath(w).startswith(root) and 'site-packages' not in w.split(os.sep)]\n"
        "    if hits: bad[name] = hits\n"
        "print(json.dumps(bad))\n"
    )
    proc = _from_root(code)
    assert proc.returncode == 0, proc.stderr
    shadowed = json.loads(proc.stdout)
    assert shadowed == {}, f"run from the repository root, these resolve into the repository: {shadowed}"


#: top-level folders that Python would import as namespace packages from the root: our own names only.
OWN_FOLDERS = {"slope", "tests", "scripts", "docs", "requirements", "accuracy_experiments", "performance_experiments", "build"}


def test_no_top_level_folder_is_a_namespace_package_under_a_foreign_name():
    """A folder without ``__init__.py`` still imports, as a namespace package, when nothing else of
    that name is installed: ``kernels/`` made ``import kernels`` (which transformers probes for its
    optional hub kernels) resolve into the repository on machines without the hub package."""
    folders = {p.name for p in REPO.iterdir() if p.is_dir() and p.name.isidentifier() and not p.name.startswith(".")}
    assert folders <= OWN_FOLDERS, f"top-level folders {sorted(folders - OWN_FOLDERS)} import as namespace packages from the root"
    proc = _from_root("import importlib.util, json; s = importlib.util.find_spec('kernels'); "
                      "print(json.dumps(None if s is None else (s.origin or list(s.submodule_search_locations))))")
    assert proc.returncode == 0, proc.stderr
    where = json.loads(proc.stdout)
    assert where is None or "site-packages" in Path(where if isinstance(where, str) else where[0]).parts, where


def test_transformers_starts_from_the_repository_root():
    proc = _from_root("import transformers; print(type(transformers.LlamaConfig()).__name__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "LlamaConfig"


def test_hub_kernels_package_wins_from_the_repository_root():
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the hub package `kernels` is not installed (transformers < 5.25 does not need it)")
    proc = _from_root(
        "import kernels, transformers, os; transformers.LlamaConfig(); print(os.path.abspath(kernels.__file__))"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    where = Path(proc.stdout.strip())
    assert "site-packages" in where.parts, where  # (a venv inside the repository is fine)


def test_slope_kernels_and_optimizers_import_from_the_package():
    proc = _from_root(
        "import os, slope.kernels, slope.optimizers, slope.kernels.cutlass_sm90 as c\n"
        "print(os.path.dirname(slope.kernels.__file__)); print(os.path.dirname(slope.optimizers.__file__))\n"
        "print(all((c.CUDA_SOURCES / n).is_file() for n in c.SOURCES))"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels_dir, optimizers_dir, sources_found = proc.stdout.split()
    assert Path(kernels_dir) == REPO / "slope" / "kernels"
    assert Path(optimizers_dir) == REPO / "slope" / "optimizers"
    assert sources_found == "True"  # the CUDA/C++ sources are found in slope/kernels/csrc/

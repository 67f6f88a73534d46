"""The installed import names: the converter is ``filterdb_dask.convert``, never a
top-level ``convert`` that a user's own ``convert.py`` could shadow (issue 11.6)."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = [p for d in ("filterdb_dask", "convert", "tests", "benchmarks")
           for p in sorted((ROOT / d).rglob("*.py"))]


def _imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_source_imports_a_top_level_convert():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p)
                                                  if m == "convert" or m.startswith("convert."))
                 for p in SOURCES}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_core_never_imports_the_converter():
    # the dependency runs one way: filterdb_dask.convert uses the core; the core
    # (everything but the CLI, which composes both) never imports the converter
    core = [p for p in (ROOT / "filterdb_dask").glob("*.py") if p.name != "run.py"]
    offenders = {p.name for p in core
                 if any(m.startswith("filterdb_dask.convert") for m in _imported_modules(p))}
    assert offenders == set()


def test_benchmarks_use_public_names_only():
    private = {}
    for p in (ROOT / "benchmarks").glob("*.py"):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
                private.setdefault(p.name, []).append("__import__")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("filterdb_dask"):
                private.setdefault(p.name, []).extend(
                    a.name for a in node.names if a.name.startswith("_"))
    assert {k: v for k, v in private.items() if v} == {}


def test_a_users_convert_py_does_not_shadow_the_converter(tmp_path):
    # a decoy convert.py in the working directory, which is first on sys.path
    (tmp_path / "convert.py").write_text("raise SystemExit('decoy convert.py was imported')\n")
    code = ("import filterdb_dask.run, filterdb_dask.convert.write, filterdb_dask.convert.ingest, "
            "filterdb_dask.convert.verify, filterdb_dask.convert.synth, sys; "
            "assert 'convert' not in sys.modules, sys.modules['convert']; "
            "print(filterdb_dask.convert.write.__name__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "filterdb_dask.convert.write"

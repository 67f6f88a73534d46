"""What a newcomer reads: the method page, the package's exports, the README, messages."""

from __future__ import annotations

import inspect
import os
import re

import pytest

import filterdb_dask
from filterdb_dask.errors import StoreError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_method_page_exists_and_the_code_cites_it():
    page = open(os.path.join(ROOT, "docs", "method.md"), encoding="utf-8").read()
    for n in range(1, 9):
        assert re.search(rf"^## {n}\. ", page, re.M), n
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "(docs/method.md)" in readme and "METHOD.md" not in readme


@pytest.mark.parametrize("name, module", [
    ("analyze", "filterdb_dask.analysis"), ("open_store", "filterdb_dask.store"),
    ("write_report", "filterdb_dask.report"),
])
def test_package_exports_the_real_functions(name, module):
    f = getattr(filterdb_dask, name)
    assert f.__module__ == module
    assert "**kwargs" not in str(inspect.signature(f))
    assert f.__doc__ and ("Parameters" in f.__doc__ or "Returns" in f.__doc__)
    assert name in dir(filterdb_dask)


def test_readme_lists_every_command():
    from filterdb_dask.run import build_parser

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for cmd in sub.choices:
        assert f"filterdb-dask {cmd} " in readme, cmd


def test_a_source_file_given_as_store_says_convert_first(synth_h5, tmp_path):
    with pytest.raises(StoreError, match=r"is an HDF5 file .*run 'filterdb-dask convert"):
        filterdb_dask.open_store(synth_h5)
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(StoreError, match="is a file, not a converted store"):
        filterdb_dask.open_store(str(other))


def test_no_source_cites_a_page_outside_the_repository():
    for top in ("filterdb_dask", "convert"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith((".py", ".yaml")):
                    text = open(os.path.join(dirpath, name), encoding="utf-8").read()
                    assert "METHOD" not in text, os.path.join(dirpath, name)

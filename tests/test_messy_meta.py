"""End to end on messy meta (issue 10 "Done when"): never a traceback or an internal error.

Hypothesis draws small DBs whose meta has what real DBs have: missing and empty values,
'NA'/'None'/'null', values starting with '=', unicode, HTML, 300-character names, column
names that collide after slugging or are named like the result set's own files, 1-filter
layers, single-layer groups, small groups spread wide, and models sharing one model_id.
Each one runs ``analyze`` (with its report) and ``report`` again through the CLI: the
outcome is a one-line refusal, or a complete result set whose report renders in headless
Chromium with every image loaded.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from filterdb_dask.convert.write import convert
from filterdb_dask.resultset import Results
from filterdb_dask.run import main
from tests.conftest import write_h5
from tests.test_report import CHROMIUM, assert_renders

MESSY = ["", "NA", "None", "null", "nan", "=1+1", "=cmd|' /C calc'!A0", "<b>bold</b>&amp;",
         "<script>alert(1)</script>", "naïve ünïcödé", "日本語", "a$b$c", "x" * 300,
         "tab\there", "  padded  ", "1", "Classification"]
VALUES = st.one_of(st.sampled_from(MESSY), st.none(), st.just(float("nan")))
# columns whose names collide after slugging or name the result set's own files
EXTRA_COLUMNS = ["visual_category", "Visual-Category", "drift", "!!!", "depth decile",
                 "quality.csv", "kl", "results.zarr", "Paper", "x" * 300, "日本"]


@st.composite
def messy_db(draw):
    n_models = draw(st.integers(1, 4))
    sizes, models, depth, norm = [], [], [], []
    for m in range(n_models):
        n_layers = draw(st.integers(1, 3))
        for d in range(n_layers):
            sizes.append(draw(st.sampled_from([1, 2, 3, 9, 40])))
            models.append(m)
            depth.append(d)
            norm.append(d / (n_layers - 1) if n_layers > 1 else 0.0)
    n_layers = len(sizes)
    names = draw(st.lists(VALUES, min_size=n_models, max_size=n_models))
    ids = list(range(n_models))
    shared = n_models > 1 and draw(st.booleans()) and draw(st.booleans())
    if shared:  # two different models under one id
        ids[1] = ids[0]
        names[0], names[1] = "first.onnx", "second.onnx"
    model_id = [ids[m] for m in models]

    def per_model(col):
        vals = draw(st.lists(VALUES, min_size=n_models, max_size=n_models))
        return [vals[m] for m in models]

    cols = {
        "model": [names[m] for m in models],
        "Task": per_model("Task"),
        "Visual Category": per_model("Visual Category"),
    }
    for extra in draw(st.lists(st.sampled_from(EXTRA_COLUMNS), max_size=4, unique=True)):
        cols[extra] = draw(st.lists(VALUES, min_size=n_layers, max_size=n_layers))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    meta = pd.DataFrame({
        "model_id": model_id, "conv_depth": depth, "conv_depth_norm": norm,
        "filter_ids": [f"{a}:{a + n - 1}" for a, n in zip(starts, sizes, strict=True)],
        **cols,
    }).set_index(["model_id", "conv_depth", "conv_depth_norm"])
    seed = draw(st.integers(0, 2**16))
    by = draw(st.lists(st.sampled_from(["Task", "Visual Category", "depth decile", "model",
                                        *cols]), min_size=1, max_size=4, unique=True))
    return meta, sizes, seed, by, shared


def _filters(sizes, seed):
    """Small layers spread wide: scales from 1e-3 to 1e3, some all-zero filters."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    x = rng.normal(size=(n, 9)) * 10.0 ** rng.uniform(-3, 3, size=(n, 1))
    x[rng.random(n) < 0.05] = 0
    return x.astype(np.float32)


def _run(argv, capsys):
    rc = main(["-q", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err, err
    if rc != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("filterdb-dask: "), err
    return rc, err


def _check_db(tmp, meta, sizes, seed, by, shared, capsys):
    h5 = write_h5(tmp / "d.h5", _filters(sizes, seed), meta)
    store = str(tmp / "s.zarr")
    convert(h5, store, chunk_filters=int(seed % 50) + 1, verbosity=0)
    out = str(tmp / "out")
    argv = ["analyze", store, "--out", out, "--scheduler", "threads", "--engine", "numpy"]
    for b in by:
        argv += ["--by", b]
    rc, err = _run(argv, capsys)
    if shared:
        assert rc == 1 and "model_id 0 holds 2 different model values" in err, err
        assert not os.path.exists(out)
        return None
    if rc != 0:  # a refusal must say why in one line; only a few are expected
        assert "print alike" in err or "at least two filters" in err, err
        assert not os.path.exists(out)
        return None
    for name in ("pca.json", "pca_subsets.json"):
        with open(os.path.join(out, name)) as fh:
            json.loads(fh.read(), parse_constant=_no_constant)  # strict JSON
    res = Results.open(out)
    for g in res.groupings:  # labels survive exactly, one KL file per grouping
        assert os.path.exists(os.path.join(out, "kl", f"{g.slug}.csv"))
        if g.name in meta.columns and g.name != "depth decile":  # that name is computed
            col = meta[g.name]
            want = {str(v) for v in col[col.notna()]}
            assert want <= set(g.labels)
    assert len({g.slug for g in res.groupings}) == len(res.groupings)
    assert _run(["report", out], capsys)[0] == 0
    return out


def _no_constant(name):
    raise ValueError(f"bare {name} in JSON")


EXPLICIT = (
    pd.DataFrame({
        "model_id": [0, 0, 1, 2, 3], "conv_depth": [0, 1, 0, 0, 0],
        "conv_depth_norm": [0.0, 1.0, 0.0, 0.0, 0.0],
        "filter_ids": ["0:0", "1:40", "41:41", "42:44", "45:53"],
        "model": ["NA", "NA", "None", "null", None],
        "Task": [None, None, "", "=1+1", "<b>x</b>"],
        "Visual Category": ["=fractals", "=fractals", "naïve", None, "x" * 300],
        "visual_category": ["a", "b", "a", "b", "a"],
        "drift": ["", "", "", "", ""], "!!!": [1, 2, 3, 4, 5],
        "depth decile": ["u", "v", "u", "v", "u"],
    }).set_index(["model_id", "conv_depth", "conv_depth_norm"]),
    [1, 40, 1, 3, 9], 7,
    ["Task", "Visual Category", "visual_category", "drift", "!!!", "depth decile", "model"],
    False,
)
NEEDS_CHROMIUM = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
FAST = settings(max_examples=2, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _case(db, tmp_path_factory, capsys):
    meta, sizes, seed, by, shared = db
    tmp = tmp_path_factory.mktemp("messy")
    out = _check_db(tmp, meta, sizes, seed, by, shared, capsys)
    if out is not None:
        assert_renders(os.path.join(out, "report.html"), tmp)


@NEEDS_CHROMIUM
@FAST
@given(db=messy_db())
@example(db=EXPLICIT)
def test_messy_meta_end_to_end(db, tmp_path_factory, capsys):
    _case(db, tmp_path_factory, capsys)


@pytest.mark.slow
@NEEDS_CHROMIUM
@settings(FAST, max_examples=25, derandomize=True)
@given(db=messy_db())
def test_messy_meta_end_to_end_many(db, tmp_path_factory, capsys):
    _case(db, tmp_path_factory, capsys)

"""The converter: round trips, alignment, resume after SIGKILL, verify, bad targets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
import zarr

from filterdb_dask.convert.verify import verify
from filterdb_dask.convert.write import convert
from filterdb_dask.errors import InputError, StoreBusyError, StoreError
from filterdb_dask.store import open_store
from filterdb_dask.storeformat import LOCK_NAME
from tests.conftest import simple_meta, write_h5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _filters(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 9))


@pytest.mark.parametrize("fmt", ["fixed", "table"])
@pytest.mark.parametrize("name,shape3,dtype", [
    ("filter", False, np.float32), ("filters", True, np.float64),
    ("filter", True, np.float32), ("filters", False, np.float64),
])
def test_round_trip_every_layout(tmp_path, fmt, name, shape3, dtype):
    sizes = [7, 30, 1, 12, 50, 3, 3, 40]
    meta = simple_meta(sizes, models=[0, 0, 1, 1, 2, 3, 3, 4])
    x = _filters(sum(sizes) + 5).astype(dtype)
    p = write_h5(tmp_path / "d.h5", x, meta, name=name, meta_format=fmt, shape3=shape3)
    res = convert(p, str(tmp_path / "s.zarr"), chunk_filters=40, verbosity=0)
    assert res.unreferenced == 5
    st = open_store(tmp_path / "s.zarr")
    assert st.filters.dtype == dtype
    np.testing.assert_array_equal(st.filters.compute(), x.reshape(len(x), 9))
    assert st.attrs["source"]["name"] == name
    assert st.attrs["source"]["dtype"] == np.dtype(dtype).name
    # dask chunks are exactly the planned, model-aligned chunks
    assert st.filters.chunks[0] == tuple(int(b - a) for a, b in st.plan)
    starts = st.meta["start"].to_numpy()
    bounds = set(st.plan[:, 0].tolist())
    for m in st.meta["model_id"].unique():
        sel = st.meta["model_id"] == m
        a, e = starts[sel].min(), st.meta["stop"][sel].max()
        if e - a <= 40:
            assert not any(a < b < e for b in bounds)
    want = pd.read_hdf(p, "meta")
    for col in ["filter_ids", "model", "Visual Category"]:
        assert st.meta[col].tolist() == want[col].tolist()
    assert list(st.meta.index.names) == ["model_id", "conv_depth", "conv_depth_norm"]


def test_list_filter_ids_round_trip(tmp_path):
    meta = pd.DataFrame({
        "model_id": [0, 0, 1], "conv_depth": [0, 1, 0], "conv_depth_norm": [0.0, 1.0, 0.0],
        "filter_ids": [list(range(0, 4)), list(range(4, 6)), list(range(6, 10))],
        "Datatype": ["a", "a", "b"],
    }).set_index(["model_id", "conv_depth", "conv_depth_norm"])
    x = _filters(10).astype(np.float32)
    p = write_h5(tmp_path / "v01.h5", x, meta)
    convert(p, str(tmp_path / "s.zarr"), chunk_filters=5, verbosity=0)
    st = open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(st.filters.compute(), x)
    assert st.meta["Visual Category"].tolist() == ["a", "a", "b"]
    assert st.meta["filter_ids"].tolist() == ["[0, 1, 2, 3]", "[4, 5]", "[6, 7, 8, 9]"]


def test_cast_to_float32_records_source_dtype(tmp_path):
    x = _filters(20)
    p = write_h5(tmp_path / "d.h5", x, simple_meta([10, 10]), shape3=True)
    convert(p, str(tmp_path / "s.zarr"), dtype="float32", verbosity=0)
    st = open_store(tmp_path / "s.zarr")
    assert st.attrs["dtype"] == "float32" and st.attrs["source"]["dtype"] == "float64"
    np.testing.assert_array_equal(st.filters.compute(), x.astype(np.float32))


def test_rerun_of_complete_store_writes_nothing(synth_h5, synth_store):
    res = convert(synth_h5, synth_store, chunk_filters=9_000, verbosity=0)
    assert res.written == 0 and res.skipped == res.n_chunks


def _chunk_state(path):
    out = {}
    fdir = os.path.join(path, "filters")
    for name in sorted(os.listdir(fdir)) if os.path.isdir(fdir) else []:
        try:
            attrs = dict(zarr.open_array(path, path=f"filters/{name}", mode="r").attrs)
        except Exception:
            continue
        if "crc32" in attrs:
            out[name] = os.stat(os.path.join(fdir, name, "zarr.json")).st_mtime_ns
    return out


def test_resume_after_sigkill(tmp_path):
    from filterdb_dask.convert.synth import synthesize

    src = str(tmp_path / "big.h5")
    synthesize(src, n_filters=3_000_000, n_models=80, seed=2)
    target = str(tmp_path / "killed.zarr")
    cmd = [sys.executable, "-m", "filterdb_dask.run", "-q", "convert", src, target,
           "--chunk-filters", "8000", "--codec", "zstd", "--scheduler", "threads"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    fdir = os.path.join(target, "filters")
    deadline = time.time() + 120
    # a cheap poll (directory entries) so the kill lands early in the conversion
    while time.time() < deadline and proc.poll() is None and (
            not os.path.isdir(fdir) or len(os.listdir(fdir)) < 24):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _chunk_state(target)
    attrs = json.load(open(os.path.join(target, "zarr.json")))["attributes"]["filterdb"]
    n_chunks = len(attrs["chunks"])
    assert 0 < len(done_before) < n_chunks, "the kill came too late to test a resume"
    assert not attrs["complete"]
    with pytest.raises(StoreError, match="is incomplete"):
        open_store(target)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    after = _chunk_state(target)
    assert all(after[k] == v for k, v in done_before.items()), "finished chunks were rewritten"
    clean = str(tmp_path / "clean.zarr")
    convert(src, clean, chunk_filters=8000, codec="zstd", verbosity=0)
    a, b = open_store(target), open_store(clean)
    assert a.attrs["checksums"] == b.attrs["checksums"]
    np.testing.assert_array_equal(a.filters.compute(), b.filters.compute())
    pd.testing.assert_frame_equal(a.meta, b.meta)
    assert verify(target, src, verbosity=0).ok


def test_verify_reports_corrupt_chunk_and_source_mismatch(tmp_path):
    x = _filters(300).astype(np.float32)
    p = write_h5(tmp_path / "d.h5", x, simple_meta([100, 100, 100], models=[0, 1, 2]))
    s = str(tmp_path / "s.zarr")
    convert(p, s, chunk_filters=100, codec="none", verbosity=0)
    assert verify(s, p, verbosity=0).ok
    with h5py.File(p, "a") as f:
        f["filter"][150] = 0.0
    rep = verify(s, p, verbosity=0)
    assert not rep.ok and any("first rows: 150" in m for m in rep.problems)
    chunk_file = os.path.join(s, "filters", "00002", "c", "0", "0")
    data = bytearray(open(chunk_file, "rb").read())
    data[40] ^= 0xFF
    open(chunk_file, "wb").write(bytes(data))
    rep = verify(s, verbosity=0)
    assert any("chunk 2 (rows 200:300) checksum" in m for m in rep.problems)


def test_target_of_another_source_is_refused(tmp_path):
    a = write_h5(tmp_path / "a.h5", _filters(20), simple_meta([10, 10]))
    b = write_h5(tmp_path / "b.h5", _filters(20, seed=9), simple_meta([10, 10]))
    s = str(tmp_path / "s.zarr")
    convert(a, s, verbosity=0)
    with pytest.raises(StoreError, match="was converted from another source"):
        convert(b, s, verbosity=0)
    with pytest.raises(StoreError, match="started with another codec"):
        convert(a, s, codec="zstd", verbosity=0)


def test_non_store_target_is_refused(tmp_path):
    a = write_h5(tmp_path / "a.h5", _filters(20), simple_meta([10, 10]))
    os.makedirs(tmp_path / "t")
    (tmp_path / "t" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="is not empty and is not a filterdb store"):
        convert(a, str(tmp_path / "t"), verbosity=0)
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="is not a directory"):
        convert(a, str(tmp_path / "f"), verbosity=0)


def test_two_converters_on_one_target(tmp_path):
    a = write_h5(tmp_path / "a.h5", _filters(20), simple_meta([10, 10]))
    s = tmp_path / "s.zarr"
    os.makedirs(s)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (s / LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": sleeper.pid}))
        with pytest.raises(StoreBusyError, match=f"another converter \\(pid {sleeper.pid}"):
            convert(a, str(s), verbosity=0)
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone: its stale lock is taken over
    convert(a, str(s), verbosity=0)
    assert open_store(s).n_filters == 20 and not (s / LOCK_NAME).exists()


def test_nan_and_inf_are_reported_and_store_stays_incomplete(tmp_path):
    x = _filters(40).astype(np.float32)
    x[3, 2] = np.nan
    x[27, 0] = np.inf
    x[27, 1] = -np.inf
    p = write_h5(tmp_path / "nan.h5", x, simple_meta([10, 10, 20], models=[0, 1, 2]))
    s = str(tmp_path / "s.zarr")
    with pytest.raises(InputError, match=r"3 NaN/Inf values \(first rows: \[3, 27\]\)"):
        convert(p, s, chunk_filters=10, verbosity=0)
    with pytest.raises(StoreError, match="is incomplete"):
        open_store(s)


def test_open_store_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "none.zarr")
    zarr.open_group(str(tmp_path / "z.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(StoreError, match="not a filterdb store"):
        open_store(tmp_path / "z.zarr")
    os.makedirs(tmp_path / "plain")
    with pytest.raises(StoreError, match="is not a Zarr store"):
        open_store(tmp_path / "plain")
    g = zarr.open_group(str(tmp_path / "old.zarr"), mode="w")
    g.attrs["filterdb"] = {"schema_version": 0}
    with pytest.raises(StoreError, match="schema 0"):
        open_store(tmp_path / "old.zarr")


def _as_schema_2(store: str, sources: list[np.ndarray]) -> None:
    """Rewrite a store's record and chunk marks as schema 2 wrote them (SHA-256 of the
    source rows under ``source_sha256``)."""
    import hashlib

    from filterdb_dask import storeformat as fmt

    g = zarr.open_group(store, mode="a")
    attrs = dict(g.attrs[fmt.ATTR_KEY])
    digests = [hashlib.sha256(np.ascontiguousarray(x).data).hexdigest() for x in sources]
    attrs.pop("source_digest")
    if attrs["complete"]:
        attrs["source_sha256"] = digests
    g.attrs[fmt.ATTR_KEY] = dict(attrs, schema_version=2)
    for i, d in enumerate(digests):
        arr = zarr.open_array(store, path=fmt.chunk_name(i), mode="a")
        a = dict(arr.attrs)
        a.pop("source_digest")
        arr.attrs.put(dict(a, source_sha256=d))


def test_schema_2_stores_are_read_appended_to_and_never_resumed(tmp_path):
    from filterdb_dask import storeformat as fmt

    sizes = [30, 20, 40, 10]
    meta = simple_meta(sizes, models=[0, 1, 2, 3])
    x = _filters(sum(sizes)).astype(np.float32)
    p = write_h5(tmp_path / "d.h5", x, meta)
    s = str(tmp_path / "s.zarr")
    convert(p, s, chunk_filters=40, verbosity=0)
    plan = open_store(s).plan
    rec = fmt.read_record(s)
    assert all(d.startswith("blake3:") and len(d) == 7 + 64 for d in rec.source_digest)
    _as_schema_2(s, [x[a:b] for a, b in plan])
    old = fmt.read_record(s)
    assert old.source_digest[0].startswith("sha256:")
    np.testing.assert_array_equal(open_store(s).filters.compute(), x)
    assert verify(s, p, verbosity=0).ok
    assert convert(p, s, chunk_filters=40, verbosity=0).written == 0  # complete: kept
    marks = {i: fmt.chunk_mark(s, i, int(a), int(b), "float32", "lz4")
             for i, (a, b) in enumerate(plan)}
    assert all(m is not None and m.source_digest.startswith("sha256:") for m in marks.values())
    # a digest of either kind is checked against the bytes it names
    assert fmt.digest_matches(marks[0].source_digest, x[plan[0, 0]:plan[0, 1]])
    assert not fmt.digest_matches(marks[0].source_digest, x[plan[1, 0]:plan[1, 1]])
    assert fmt.digest_matches(fmt.source_digest(x[:5]), x[:5])
    assert not fmt.digest_matches("md5:" + "0" * 32, x[:5])
    # an unfinished schema-2 conversion is not resumed by this version
    t = str(tmp_path / "t.zarr")
    convert(p, t, chunk_filters=40, verbosity=0)
    _as_schema_2(t, [x[a:b] for a, b in plan])
    g = zarr.open_group(t, mode="a")
    g.attrs[fmt.ATTR_KEY] = dict(g.attrs[fmt.ATTR_KEY], complete=False)
    with pytest.raises(StoreError, match="unfinished conversion by an older version"):
        convert(p, t, chunk_filters=40, verbosity=0)

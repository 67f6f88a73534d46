"""No number from bad bytes (issue 10, integrity): every tampering of a store is refused.

Each tampering is applied to a copy of a pristine store, then ``analyze`` runs with each
kernel engine: it must exit 1 with one line on stderr. With numba it runs as a real
subprocess (compiled kernels fed out-of-bounds layer rows would segfault: a negative
return code); the numpy engine cannot crash the interpreter and runs in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import zarr

from filterdb_dask import storeformat as fmt
from filterdb_dask.convert.verify import verify
from filterdb_dask.convert.write import convert
from filterdb_dask.errors import StoreBusyError, StoreError
from filterdb_dask.run import main
from filterdb_dask.store import open_store
from tests.conftest import simple_meta, write_h5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = 5000  # rows per layer = per chunk; more than the fingerprint's 2 x 4096 end rows
ENGINES = ["numba", "numpy"]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "filterdb_dask.run", "-q", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _analyze(store, out_dir, engine, capsys):
    args = ["-q", "analyze", store, "--out", str(out_dir), "--engine", engine, "--no-report",
            "--scheduler", "threads"]
    if engine == "numba":
        return _run(*args[1:])
    capsys.readouterr()
    rc = main(args)
    return subprocess.CompletedProcess(args, rc, "", capsys.readouterr().err)


def _assert_refused(out, match):
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])  # < 0: killed by a signal
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("integrity")
    x = np.random.default_rng(3).normal(size=(3 * ROWS, 9)).astype(np.float32)
    h5 = write_h5(d / "d.h5", x, simple_meta([ROWS] * 3, models=[0, 1, 2]))
    stores = {}
    for codec in ("lz4", "none"):
        stores[codec] = str(d / f"{codec}.zarr")
        convert(h5, stores[codec], chunk_filters=ROWS, codec=codec, verbosity=0)
    return h5, stores


@pytest.fixture
def store(sources, tmp_path, request):
    codec = getattr(request, "param", "lz4")
    path = str(tmp_path / "s.zarr")
    shutil.copytree(sources[1][codec], path)
    return path


def _chunk_file(store, i, j=0):
    return os.path.join(store, "filters", f"{i:05d}", "c", str(j), "0")


def _flip(path, pos):
    data = bytearray(open(path, "rb").read())
    data[pos] ^= 0x10
    open(path, "wb").write(bytes(data))


def _edit_json(path, edit):
    md = json.load(open(path))
    edit(md)
    json.dump(md, open(path, "w"))


def _flip_lz4(s):
    _flip(_chunk_file(s, 1), 200)


def _truncate(s):
    p = _chunk_file(s, 1)
    os.truncate(p, os.path.getsize(p) - 10)


def _delete(s):
    os.remove(_chunk_file(s, 1))


def _symlink(s):
    p = _chunk_file(s, 2)
    os.remove(p)
    os.symlink(os.path.abspath(_chunk_file(s, 1)), p)


def _fifo(s):
    # a reader that opened it would wait for a writer forever
    p = _chunk_file(s, 1)
    os.remove(p)
    os.mkfifo(p)


def _device(s):
    p = _chunk_file(s, 1)
    os.remove(p)
    os.symlink("/dev/zero", p)  # endless bytes


def _directory(s):
    p = _chunk_file(s, 1)
    os.remove(p)
    os.mkdir(p)


def _grown(s):
    with open(_chunk_file(s, 1), "ab") as fh:  # far more bytes than any encoding
        fh.truncate(64 << 20)


def _dtype_edit(s):
    _edit_json(os.path.join(s, "filters", "00001", "zarr.json"),
               lambda md: md.update(data_type="float64"))


def _shape_edit(s):
    _edit_json(os.path.join(s, "filters", "00001", "zarr.json"),
               lambda md: md.update(shape=[ROWS - 1, 9]))


def _meta_edit(s):
    # a layer's stop moved beyond its chunk, written through Zarr (valid bytes)
    g = zarr.open_group(s, mode="a", path="meta")
    col = next(c["array"] for c in g.attrs["columns"] if c["name"] == "stop")
    stop = g[col][...]
    stop[0] += 3 * ROWS
    g[col][...] = stop


TAMPER = {
    "flip-lz4": (_flip_lz4, "chunk 1 (rows 5000:10000) checksum failed"),
    "truncate": (_truncate, "its stored Zarr chunk 0 is not the one written"),
    "delete": (_delete, "its stored Zarr chunk 0 is missing"),
    "symlink": (_symlink, "chunk 2 (rows 10000:15000)"),
    "fifo": (_fifo, "chunk 1 (rows 5000:10000)"),
    "device": (_device, "chunk 1 (rows 5000:10000)"),
    "directory": (_directory, "chunk 1 (rows 5000:10000)"),
    "grown": (_grown, "its stored Zarr chunk 0 is not the one written"),
    "dtype-edit": (_dtype_edit, "(data_type edited)"),
    "shape-edit": (_shape_edit, "(shape edited)"),
    "meta-edit": (_meta_edit, "meta table"),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tampered_store_is_refused(store, tmp_path, case, engine, capsys):
    tamper, match = TAMPER[case]
    tamper(store)
    out = _analyze(store, tmp_path / "res", engine, capsys)
    _assert_refused(out, match)
    assert "verify" in out.stderr
    assert not os.path.exists(tmp_path / "res" / "pca.json")


@pytest.mark.parametrize("store", ["none"], indirect=True)
@pytest.mark.parametrize("engine", ENGINES)
def test_flipped_byte_of_uncompressed_chunk_is_refused(store, tmp_path, engine, capsys):
    _flip(_chunk_file(store, 0), 1000)
    out = _analyze(store, tmp_path / "res", engine, capsys)
    _assert_refused(out, "chunk 0 (rows 0:5000) checksum failed")


def _rerecord_meta(s, edit):
    """Edit the meta table and record its new digest: a store consistent with itself
    whose layer bounds are wrong (only the bounds check stands in the way)."""
    rec = fmt.read_record(s)
    meta = fmt.read_meta(s, rec)
    edit(meta)
    rec.meta_sha256 = fmt.write_meta(s, meta)
    zarr.open_group(s, mode="a").attrs[fmt.ATTR_KEY] = rec.to_attrs()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("where", ["stop-past-chunk", "start-before-chunk", "chunk-index"])
def test_layer_bounds_outside_chunk_are_refused(store, tmp_path, engine, where, capsys):
    def edit(meta):
        if where == "stop-past-chunk":
            meta.iloc[1, meta.columns.get_loc("stop")] += 2 * ROWS
        elif where == "start-before-chunk":
            meta.iloc[2, meta.columns.get_loc("start")] -= ROWS + 7
        else:
            meta.iloc[0, meta.columns.get_loc("chunk")] = 99

    _rerecord_meta(store, edit)
    out = _analyze(store, tmp_path / "res", engine, capsys)
    _assert_refused(out, "lies outside its chunk")


def test_verify_names_every_tampering(sources, tmp_path, capsys):
    base = sources[1]["lz4"]
    for case, (tamper, match) in sorted(TAMPER.items()):
        s = str(tmp_path / case)
        shutil.copytree(base, s)
        tamper(s)
        rep = verify(s, verbosity=0)
        assert not rep.ok and any(match in p for p in rep.problems), (case, rep.problems)
        capsys.readouterr()
        assert main(["-q", "verify", s]) == 1
        assert match in capsys.readouterr().err, case


def test_library_readers_check_too(store):
    """The crc32c codec is in every chunk's Zarr pipeline: plain Zarr refuses a flip."""
    _flip_lz4(store)
    arr = zarr.open_array(store, path=fmt.chunk_name(1), mode="r")
    assert arr.metadata.to_dict()["codecs"][-1]["name"] == "crc32c"
    with pytest.raises(ValueError, match="checksum"):
        arr[...]


def test_changed_source_on_resume_is_refused(sources, tmp_path):
    h5 = str(tmp_path / "d.h5")
    shutil.copy(sources[0], h5)
    s = str(tmp_path / "s.zarr")
    convert(h5, s, chunk_filters=ROWS, verbosity=0)
    # as if killed before the last chunk: chunk 2 not written, store not complete
    shutil.rmtree(os.path.join(s, "filters", "00002"))
    rec = fmt.read_record(s)
    zarr.open_group(s, mode="a").attrs[fmt.ATTR_KEY] = dict(rec.to_attrs(), complete=False)
    with h5py.File(h5, "a") as f:  # a middle row of a finished chunk; size and ends kept
        f["filter"][ROWS + ROWS // 2] = 0.5
    out = _run("convert", h5, s, "--chunk-filters", str(ROWS), "--scheduler", "threads")
    _assert_refused(out, "changed since the interrupted conversion")
    assert "rows 5000:10000" in out.stderr
    with pytest.raises(StoreError, match="is incomplete"):
        open_store(s)
    # the source as it was resumes: every finished chunk (also those the refused run
    # wrote) is hashed again against it
    with h5py.File(h5, "a") as f, h5py.File(sources[0], "r") as g:
        f["filter"][ROWS + ROWS // 2] = g["filter"][ROWS + ROWS // 2]
    res = convert(h5, s, chunk_filters=ROWS, verbosity=0)
    assert res.skipped == 3 and open_store(s).record.complete
    assert verify(s, h5, verbosity=0).ok


def test_old_schema_store_is_refused(store, tmp_path):
    rec = fmt.read_record(store)
    zarr.open_group(store, mode="a").attrs[fmt.ATTR_KEY] = dict(rec.to_attrs(),
                                                                schema_version=1)
    out = _run("analyze", store, "--out", str(tmp_path / "r"), "--scheduler", "threads")
    _assert_refused(out, "has store schema 1; this version reads schemas 2 and 3")
    assert "convert again" in out.stderr


def test_record_round_trip(store):
    rec = fmt.read_record(store)
    again = fmt.StoreRecord.from_attrs(rec.to_attrs())
    assert again.to_attrs() == rec.to_attrs()
    bad = dict(rec.to_attrs(), stored_crc32c=rec.stored_crc32c[:-1])
    with pytest.raises(StoreError, match="record .* is damaged"):
        fmt.StoreRecord.from_attrs(bad, store)


def test_ingest_into_a_locked_store_is_refused(store, tmp_path):
    pytest.importorskip("onnx")
    from tests.test_ingest import _tiny_conv_model

    model = _tiny_conv_model(str(tmp_path / "m.onnx"))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(store, fmt.LOCK_NAME), "w") as fh:
            json.dump({"host": os.uname().nodename, "pid": sleeper.pid}, fh)
        out = _run("ingest", model, "--into", store)
        _assert_refused(out, f"another converter (pid {sleeper.pid}")
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.raises(StoreBusyError):  # the library call too, not just the CLI
        with fmt.StoreLock(store), fmt.StoreLock(store):
            pass
    before = open_store(store).n_filters
    out = _run("ingest", model, "--into", store)  # the holder is gone: lock taken over
    assert out.returncode == 0, out.stderr
    after = open_store(store)
    assert after.n_filters > before and after.record.appended
    assert verify(store, verbosity=0).ok

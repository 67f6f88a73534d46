"""Safe reading of dataset.h5: every layout, v0.1.0 conventions, every bad input."""

from __future__ import annotations

import os
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest

from filterdb_dask.convert.read import clean_task, parse_filter_ids, read_source
from filterdb_dask.errors import InputError, UnsafePickleError
from tests.conftest import simple_meta, write_h5


def _filters(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 9)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["fixed", "table"])
@pytest.mark.parametrize("name", ["filter", "filters"])
@pytest.mark.parametrize("shape3,dtype", [(False, np.float32), (True, np.float64)])
def test_meta_equals_pandas_for_every_layout(tmp_path, fmt, name, shape3, dtype):
    meta = simple_meta([5, 7, 3, 10], tasks=["Semantic Segmentation", "Classification",
                                             "Instance Segmentation", None],
                       extra={"op_set": [11, 11, 13, 13], "Accessible": [True, False, True, True],
                              "3x3_filter_share": [0.5, 0.5, 1.0, np.nan]})
    x = _filters(25).astype(dtype)
    p = write_h5(tmp_path / "d.h5", x, meta, name=name, meta_format=fmt, shape3=shape3)
    src = read_source(p)
    assert src.name == name and src.dtype == dtype and src.n_filters == 25
    assert src.shape == ((25, 3, 3) if shape3 else (25, 9))
    want = pd.read_hdf(p, "meta")  # trusted: the test wrote it
    got = src.meta
    for col in want.columns:
        exp = want[col]
        if col == "Task":
            exp = clean_task(exp)
        pd.testing.assert_series_equal(got[col].reset_index(drop=True),
                                       exp.reset_index(drop=True), check_dtype=False,
                                       check_names=False)
    assert list(got.index.names) == ["model_id", "conv_depth", "conv_depth_norm"]
    assert got["Task"].tolist()[:3] == ["Segmentation", "Classification", "Segmentation"]
    assert pd.isna(got["Task"].iloc[3])
    np.testing.assert_array_equal(got["start"], [0, 5, 12, 15])
    np.testing.assert_array_equal(got["stop"], [5, 12, 15, 25])


def test_v010_conventions_list_ids_and_datatype(tmp_path):
    meta = pd.DataFrame({
        "model_id": [0, 0, 1], "conv_depth": [0, 1, 0], "conv_depth_norm": [0.0, 1.0, 0.0],
        "filter_ids": [list(range(0, 4)), list(range(4, 6)), list(range(6, 10))],
        "Datatype": ["natural", "natural", "medical"], "Unknown column": ["a", "b", "c"],
    }).set_index(["model_id", "conv_depth", "conv_depth_norm"])
    p = write_h5(tmp_path / "v01.h5", _filters(10), meta, name="filters")
    src = read_source(p)
    assert src.meta["Visual Category"].tolist() == ["natural", "natural", "medical"]
    assert src.meta["Unknown column"].tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(src.meta["stop"] - src.meta["start"], [4, 2, 4])


def test_unreferenced_rows_are_counted(tmp_path):
    meta = simple_meta([5, 5])
    p = write_h5(tmp_path / "gap.h5", _filters(14), meta)
    assert read_source(p).unreferenced == 4


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    meta = simple_meta([3, 3])
    meta["Paper"] = [Evil(), "x"]
    p = str(tmp_path / "evil.h5")
    with h5py.File(p, "w") as f:
        f["filter"] = _filters(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta.to_hdf(p, key="meta", format="fixed", mode="a")
    assert not marker.exists()
    with pytest.raises(UnsafePickleError,
                       match=r"/meta/block\d_values: the stored pickle names (io|builtins)\.open"):
        read_source(p)
    assert not marker.exists()
    # the file really is hostile: pandas itself runs the payload
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pd.read_hdf(p, "meta")
        except Exception:
            pass
    assert marker.exists()


def test_crafted_pytables_attribute_pickle_is_refused(tmp_path):
    meta = simple_meta([3, 3])
    p = write_h5(tmp_path / "attr.h5", _filters(6), meta, meta_format="table")
    payload = b"cos\nsystem\n(S'touch " + str(tmp_path / "x").encode() + b"'\ntR."
    with h5py.File(p, "a") as f:
        f["meta"].attrs["non_index_axes"] = np.bytes_(payload)
    with pytest.raises(UnsafePickleError,
                       match="/meta attribute 'non_index_axes': .* names os.system"):
        read_source(p)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_source(tmp_path / "nope.h5")


def test_empty_file(tmp_path):
    (tmp_path / "e.h5").write_bytes(b"")
    with pytest.raises(InputError, match=r"is empty \(0 bytes\)"):
        read_source(tmp_path / "e.h5")


def test_not_hdf5(tmp_path):
    (tmp_path / "t.h5").write_text("model_id,filter_ids\n0,0:3\n")
    with pytest.raises(InputError, match="is not an HDF5 file"):
        read_source(tmp_path / "t.h5")


def test_truncated_file(tmp_path):
    meta = simple_meta([4000, 4000])
    p = write_h5(tmp_path / "full.h5", _filters(8000), meta)
    data = open(p, "rb").read()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        read_source(tmp_path / "cut.h5")


def test_no_filter_dataset(tmp_path):
    p = write_h5(tmp_path / "n.h5", _filters(6), simple_meta([3, 3]), name="weights")
    with pytest.raises(InputError, match="has no filter dataset.*'weights'"):
        read_source(p)


def test_no_meta(tmp_path):
    p = str(tmp_path / "nm.h5")
    with h5py.File(p, "w") as f:
        f["filter"] = _filters(6)
    with pytest.raises(InputError, match="has no meta table '/meta'"):
        read_source(p)


@pytest.mark.parametrize("data,match", [
    (np.zeros((6, 8), np.float32), r"has shape \(6, 8\); expected square K×K filters, "
                                   r"\(N, K²\) or \(N, K, K\) .*\(N, 9\) or \(N, 3, 3\)"),
    (np.zeros((6, 9), np.int32), "has dtype int32; expected float16, float32 or float64"),
    (np.zeros((0, 9), np.float32), "holds no filters"),
])
def test_wrong_shape_or_dtype(tmp_path, data, match):
    p = str(tmp_path / "w.h5")
    with h5py.File(p, "w") as f:
        f["filter"] = data
    with pytest.raises(InputError, match=match):
        read_source(p)


@pytest.mark.parametrize("ids,match", [
    (["0:2", "3-5"], r"filter_ids '3-5' in meta row 1 is not 'start:end'"),
    (["0:2", "3:9"], r"filter_ids 3:9 in meta row 1 lies outside the filter array \(N=6\)"),
    (["0:3", "3:5"], r"meta rows 0 \(0:3\) and 1 \(3:5\) overlap"),
    (["0:2", "5:3"], r"filter_ids 5:3 in meta row 1 is decreasing"),
    (["0:2", "-1:1"], r"lies outside"),
])
def test_bad_filter_ids(tmp_path, ids, match):
    meta = simple_meta([3, 3])
    meta["filter_ids"] = ids
    p = write_h5(tmp_path / "ids.h5", _filters(6), meta)
    with pytest.raises(InputError, match=match):
        read_source(p)


def test_non_contiguous_list_ids():
    with pytest.raises(InputError, match="not a contiguous ascending range"):
        parse_filter_ids([[0, 1, 3]], 10, "f.h5")
    with pytest.raises(InputError, match="neither 'start:end' nor a list"):
        parse_filter_ids([3.5], 10, "f.h5")
    with pytest.raises(InputError, match="not a non-empty list of integers"):
        parse_filter_ids([[]], 10, "f.h5")


def test_meta_without_required_columns(tmp_path):
    meta = simple_meta([3, 3]).reset_index(drop=True).drop(columns=["filter_ids"])
    p = write_h5(tmp_path / "c.h5", _filters(6), meta)
    with pytest.raises(InputError, match=r"lacks \['model_id', 'conv_depth', 'conv_depth_norm', "
                                         r"'filter_ids'\]"):
        read_source(p)


def test_both_filter_names(tmp_path):
    p = write_h5(tmp_path / "b.h5", _filters(6), simple_meta([3, 3]))
    with h5py.File(p, "a") as f:
        f["filters"] = _filters(6)
    with pytest.raises(InputError, match="holds both 'filter' and 'filters'"):
        read_source(p)
    assert read_source(p, name="filters").name == "filters"


def test_directory_is_refused(tmp_path):
    os.makedirs(tmp_path / "d.h5")
    with pytest.raises(InputError, match="is a directory"):
        read_source(tmp_path / "d.h5")


def test_truncated_filter_data_with_intact_meta(tmp_path):
    p = str(tmp_path / "m_first.h5")
    meta = simple_meta([4000, 4000])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta.to_hdf(p, key="meta", format="fixed", mode="w")
    with h5py.File(p, "a") as f:
        f["filter"] = _filters(8000)
    data = open(p, "rb").read()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) - 1000])
    with pytest.raises(InputError, match="truncated"):
        read_source(tmp_path / "cut.h5")


# --------------------------------------------- rows read straight from the file (O_DIRECT)
def _raw_h5(path, x, **kw):
    with h5py.File(path, "w") as f:
        f.create_dataset("filter", data=x, **kw)
    return str(path)


@pytest.mark.parametrize("dtype", ["<f4", "<f8", "<f2", ">f4", ">f8"])
@pytest.mark.parametrize("shape3", [False, True])
def test_direct_rows_equal_h5py_bit_for_bit(tmp_path, dtype, shape3):
    from filterdb_dask.convert import read as rd

    n = 5000
    x = np.random.default_rng(1).normal(size=(n, 9)).astype(dtype)
    x[3] = -0.0
    p = _raw_h5(tmp_path / "d.h5", x.reshape(n, 3, 3) if shape3 else x)
    with h5py.File(p, "r") as f:
        off = rd._contiguous_bytes(f["filter"])
    assert off is not None
    size = np.dtype(dtype).itemsize * 9
    for a, b in [(0, n), (1, 2), (7, 4099), (4095, n), (n - 1, n), (1234, 1234 + 455)]:
        got = rd.read_rows(p, "filter", a, b)
        assert got.dtype == np.dtype(dtype) and got.shape == (b - a, 9)
        assert got.tobytes() == x[a:b].tobytes()
        if getattr(os, "O_DIRECT", 0):  # and it was the direct read that gave them
            direct = rd._read_direct(p, off + a * size, (b - a, 9), np.dtype(dtype))
            assert direct is not None and direct.tobytes() == x[a:b].tobytes()


def test_chunked_and_compressed_rows_are_read_by_h5py(tmp_path):
    from filterdb_dask.convert import read as rd

    x = _filters(3000)
    p = _raw_h5(tmp_path / "c.h5", x, chunks=(700, 9), compression="gzip")
    with h5py.File(p, "r") as f:
        assert rd._contiguous_bytes(f["filter"]) is None
    assert np.array_equal(rd.read_rows(p, "filter", 5, 2999), x[5:2999])


def test_direct_read_falls_back_where_refused(tmp_path, monkeypatch):
    """A file system without O_DIRECT (open fails), or an alignment it refuses (the
    read fails): the same rows through h5py."""
    from filterdb_dask.convert import read as rd

    x = _filters(3000)
    p = _raw_h5(tmp_path / "d.h5", x)
    real_open, real_preadv = os.open, os.preadv
    direct = getattr(os, "O_DIRECT", 0)

    def no_direct_open(path, flags, *a):
        if direct and flags & direct:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct_open)
    assert np.array_equal(rd.read_rows(p, "filter", 10, 2000), x[10:2000])
    monkeypatch.setattr(os, "open", real_open)

    def refuse(*a):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "preadv", refuse)
    assert np.array_equal(rd.read_rows(p, "filter", 10, 2000), x[10:2000])
    monkeypatch.setattr(os, "preadv", real_preadv)
    # a file that ends before the dataset's bytes: no direct result (h5py decides)
    assert rd._read_direct(p, os.path.getsize(p) - 100, (10, 9), np.dtype("<f4")) is None


def test_direct_read_of_unaligned_values_is_a_copy_of_the_right_bytes(tmp_path):
    from filterdb_dask.convert import read as rd

    p = _raw_h5(tmp_path / "d.h5", _filters(3000))
    data = open(p, "rb").read()
    for off in (1, 4093, 4097, 8191):
        got = rd._read_direct(p, off, (10, 9), np.dtype("<f4"))
        if not getattr(os, "O_DIRECT", 0):
            assert got is None
            continue
        assert got is not None and got.flags.aligned and got.flags.c_contiguous
        assert got.tobytes() == data[off:off + 360]

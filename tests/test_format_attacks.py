"""Bad and hostile safetensors and Keras HDF5 files: one-line errors, bounded in memory
(issue 14 item 1, issue 9). The memory-relevant ones run ``ingest`` in a subprocess
under a 1 GiB address-space limit."""

from __future__ import annotations

import json
import os
import struct

import h5py
import numpy as np
import pytest

from filterdb_dask.convert.ingest import ingest, read_model
from filterdb_dask.errors import InputError
from tests.conftest import simple_meta, write_h5
from tests.hostile import assert_refused

pytest.importorskip("safetensors")
from safetensors.numpy import save_file  # noqa: E402


def _st(path, header, data=b"", *, raw_header=None):
    """A safetensors file from a header dict (or raw header bytes) and data bytes."""
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return str(path)


def _t(dtype, shape, b, e):
    return {"dtype": dtype, "shape": shape, "data_offsets": [b, e]}


W = _t("F32", [2, 1, 3, 3], 0, 72)


@pytest.mark.parametrize("case,match", [
    ("short", r"is truncated: 3 bytes, shorter than the 8-byte header length"),
    ("past-end", r"header length 1,000 runs past the end of the file"),
    ("not-utf8", r"the header is not UTF-8"),
    ("not-json", r"the header is not valid JSON"),
    ("list", r"the header is a JSON list, not an object"),
    ("duplicate", r"not valid JSON \(duplicate key 'a.weight'\)"),
    ("dtype", r"unknown dtype 'F128'"),
    ("shape-vs-range", r"is F32 \[2, 1, 3, 3\] \(72 bytes\) but its byte range \[0, 36\]"),
    ("beyond-data", r"data_offsets '\[0, 720\]' outside the 72 data bytes"),
    ("overlap", r"tensors 'a.weight' and 'b.weight' have overlapping byte ranges"),
    ("gap", r"bytes 72..144 of the data belong to no tensor"),
    ("metadata", r"__metadata__ must map strings to strings"),
    ("fields", r"tensor 'a.weight' must have exactly dtype, shape and data_offsets"),
])
def test_bad_safetensors_are_one_line_errors(tmp_path, case, match):
    p = tmp_path / f"{case}.safetensors"
    data = np.ones(18, np.float32).tobytes()
    if case == "short":
        p.write_bytes(b"\x01\x02\x03")
    elif case == "past-end":
        p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    elif case == "not-utf8":
        _st(p, None, raw_header=b'{"\xff\xfe": 1}')
    elif case == "not-json":
        _st(p, None, raw_header=b'{"a.weight": ')
    elif case == "list":
        _st(p, [1, 2])
    elif case == "duplicate":
        h = json.dumps({"a.weight": W})
        _st(p, None, raw_header=(h[:-1] + ", " + h[1:]).encode(), data=data)
    elif case == "dtype":
        _st(p, {"a.weight": _t("F128", [2, 1, 3, 3], 0, 72)}, data)
    elif case == "shape-vs-range":
        _st(p, {"a.weight": _t("F32", [2, 1, 3, 3], 0, 36)}, data[:36])
    elif case == "beyond-data":
        _st(p, {"a.weight": _t("F32", [20, 1, 3, 3], 0, 720)}, data)
    elif case == "overlap":
        _st(p, {"a.weight": W, "b.weight": _t("F32", [1, 1, 3, 3], 36, 72)}, data)
    elif case == "gap":
        _st(p, {"a.weight": W, "b.weight": _t("F32", [2, 1, 3, 3], 144, 216)}, data * 3)
    elif case == "metadata":
        _st(p, {"__metadata__": {"format": 1}, "a.weight": W}, data)
    elif case == "fields":
        _st(p, {"a.weight": {**W, "extra": 1}}, data)
    with pytest.raises(InputError, match=match):
        read_model(str(p))


def test_huge_claims_are_refused_under_the_memory_limit(tmp_path):
    into = str(tmp_path / "out.h5")
    # a 2 GiB header claim in a (sparse) file that is that large: refused unread
    p = tmp_path / "claim.safetensors"
    with open(p, "wb") as fh:
        fh.write(struct.pack("<Q", 1 << 31))
        fh.truncate((1 << 31) + 1024)
    assert_refused(["ingest", str(p), "--into", into],
                   r"header length 2,147,483,648 is over the 16,777,216-byte cap",
                   outputs=[into])
    # a 10^10-filter shape that its byte range does not hold
    p = _st(tmp_path / "shape.safetensors",
            {"a.weight": _t("F32", [100_000, 100_000, 3, 3], 0, 72)},
            np.ones(18, np.float32).tobytes())
    assert_refused(["ingest", p, "--into", into],
                   r"is F32 \[100000, 100000, 3, 3\] \(360,000,000,000 bytes\)", outputs=[into])
    # a header at the cap made of a million tiny tensors still parses within 1 GiB
    n = 150_000
    header = {f"t{i}": _t("U8", [1], i, i + 1) for i in range(n)}
    p = _st(tmp_path / "many.safetensors", header, b"\0" * n)
    assert os.path.getsize(p) < (16 << 20)
    assert_refused(["ingest", p, "--into", into], r"has no 3x3 conv kernels|none of the models",
                   outputs=[into])


def _sharded(tmp_path, weight_map, shards):
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return str(index)


def test_bad_shard_indexes(tmp_path):
    w = {"a.weight": np.ones((2, 1, 3, 3), np.float32)}
    save_file(w, str(tmp_path / "outside.safetensors"))
    with pytest.raises(InputError, match=r"shard '../outside.safetensors' is not a plain file"):
        read_model(_sharded(tmp_path, {"a.weight": "../outside.safetensors"}, {}))
    os.symlink(tmp_path / "outside.safetensors", tmp_path / "ckpt" / "link.safetensors")
    with pytest.raises(InputError, match=r"link.safetensors' is a symlink"):
        read_model(_sharded(tmp_path, {"a.weight": "link.safetensors"}, {}))
    with pytest.raises(InputError, match=r"tensor 'b.weight' is not in its shard 's1"):
        read_model(_sharded(tmp_path, {"a.weight": "s1.safetensors", "b.weight": "s1.safetensors"},
                            {"s1.safetensors": w}))
    with pytest.raises(InputError, match=r"has no weight_map"):
        read_model(_sharded(tmp_path, {}, {}))
    with pytest.raises(InputError, match=r"shard '.*/ckpt/missing.safetensors' does not exist"):
        read_model(_sharded(tmp_path, {"a.weight": "missing.safetensors"}, {}))


# ---------------------------------------------------------------------- Keras HDF5


def _keras2(path, *, kernel=None, layer_names=None):
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = layer_names if layer_names is not None else np.array([b"conv2d"])
        g = f.create_group("conv2d")
        g.attrs["weight_names"] = np.array([b"conv2d/kernel:0"])
        if kernel is not None:
            kernel(g)
        else:
            g.create_dataset("conv2d/kernel:0", data=np.ones((3, 3, 1, 2), np.float32))
    return str(path)


def test_keras_indirection_is_refused(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("k", data=np.ones((3, 3, 1, 2), np.float32))
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(18, np.float32).tobytes())

    def ext_link(g):
        g["conv2d"] = h5py.ExternalLink(str(other), "/")

    def ext_storage(g):
        g.create_dataset("conv2d/kernel:0", shape=(3, 3, 1, 2), dtype="f4",
                         external=[(str(secret), 0, 72)])

    def vds(g):
        layout = h5py.VirtualLayout(shape=(3, 3, 1, 2), dtype="f4")
        layout[:] = h5py.VirtualSource(str(other), "k", shape=(3, 3, 1, 2))
        g.create_group("conv2d").create_virtual_dataset("kernel:0", layout)

    def loop(g):
        g["conv2d"] = h5py.SoftLink("/conv2d/x")
        g["x"] = h5py.SoftLink("/conv2d/conv2d")

    for name, make, match in (("ext", ext_link, r"is an external link to .*other\.h5"),
                              ("storage", ext_storage, r"keeps its raw data in external file"),
                              ("vds", vds, r"is a virtual dataset"),
                              ("loop", loop, r"/conv2d/conv2d is a soft or user-defined link")):
        with pytest.raises(InputError, match=match):
            read_model(_keras2(tmp_path / f"{name}.h5", kernel=make))


def test_keras_unallocated_giant_kernel_is_refused_under_the_limit(tmp_path):
    def giant(g):
        # 2^40 bytes declared, no chunk written: a few KB on disk
        g.create_dataset("conv2d/kernel:0", shape=(3, 3, 1 << 16, 1 << 22), dtype="f4",
                         chunks=(3, 3, 64, 64))

    p = _keras2(tmp_path / "giant.h5", kernel=giant)
    assert os.path.getsize(p) < 100_000
    into = str(tmp_path / "out.h5")
    assert_refused(["ingest", p, "--into", into], r"kernel:0 declares 3 rows in "
                   r"67,108,864 chunks but only 0 chunks are stored", outputs=[into])


def test_keras_bad_names_and_non_keras_hdf5(tmp_path):
    with pytest.raises(InputError, match=r"attribute layer_names holds a name that is not UTF-8"):
        read_model(_keras2(tmp_path / "u.h5", layer_names=np.array([b"\xff\xfe"])))
    with pytest.raises(InputError, match=r"/nope does not exist"):
        read_model(_keras2(tmp_path / "m.h5", layer_names=np.array([b"nope"])))
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f.create_dataset("x", data=np.ones(3))
    with pytest.raises(InputError, match=r"is HDF5 but not a Keras weights file"):
        read_model(str(tmp_path / "plain.h5"))
    (tmp_path / "cut.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(InputError, match=r"cut.h5' is not a readable HDF5 file"):
        read_model(str(tmp_path / "cut.h5"))


def test_h5_model_or_filter_db_told_apart_by_content(tmp_path):
    # a Keras model with a .h5 name is ingested; a filter DB given as a model is refused
    model = _keras2(tmp_path / "model.h5")
    db = str(tmp_path / "db.h5")
    res = ingest([model], db)
    assert res.filters == 2 and res.layers == 1
    with pytest.raises(InputError, match=r"db.h5' is a filter DB, not a model; .* as --into"):
        ingest([db], str(tmp_path / "db2.h5"))
    pub = write_h5(tmp_path / "dataset.h5", np.ones((6, 9), np.float32), simple_meta([6]))
    with pytest.raises(InputError, match=r"is a filter DB, not a model"):
        read_model(pub)
    # the same Keras file without an extension is still recognised by content
    os.rename(model, tmp_path / "model")
    assert read_model(str(tmp_path / "model")).producer == "keras2"


def test_keras3_link_cycle_is_refused(tmp_path):
    p = tmp_path / "cycle.weights.h5"
    with h5py.File(p, "w") as f:
        inner = f.create_group("layers").create_group("sub")
        inner["layers"] = f["layers"]  # a hard link back up: layers/sub/layers/sub/...
    with pytest.raises(InputError, match=r"layers nest more than 32 deep"):
        read_model(str(p))

"""Hostile ``dataset.h5`` files, built at test time (issue 9: untrusted files).

Every builder takes a folder and a marker path and writes one file that a crafted
download could be; a payload that ran would create the marker. ``ATTACKS`` maps a
name to its builder. The pickles are assembled opcode by opcode: none of them is
ever loaded here.
"""

from __future__ import annotations

import os
import pickle
import struct
import warnings
import zlib

import h5py
import numpy as np

from tests.conftest import simple_meta, write_h5

N = 60  # filters in a small valid file
SIZES = [20, 25, 15]


# ---------------------------------------------------------------- pickles
def _s(text: str) -> bytes:
    """BINUNICODE."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def system_pickle(marker: str) -> bytes:
    """``os.system('touch marker')`` in protocol 0, as PyTables would unpickle it."""
    return b"cos\nsystem\n(S'touch " + marker.encode() + b"'\ntR."


def open_pickle(marker: str) -> bytes:
    """``builtins.open(marker, 'w')``: creates the marker when loaded (any OS)."""
    return b"\x80\x02cbuiltins\nopen\n" + _s(marker) + _s("w") + b"\x86R."


_OBJ_DTYPE = b"cnumpy\ndtype\n" + _s("O8") + b"\x89\x88\x87R"  # numpy.dtype('O8', False, True)


def dtype_flags0_scalar_pickle() -> bytes:
    """The issue's gadget: an object dtype rebuilt with flags 0, then ``scalar(it, address)``.

    numpy then treats the 8 bytes as a pointer to a Python object; with a fixed
    address this hands the pickle a callable. (Here the address is 0x41414141.)
    """
    state = b"(K\x03" + _s("|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
    return (b"\x80\x02cnumpy._core.multiarray\nscalar\n" + _OBJ_DTYPE + state + b"b"
            + b"C\x08" + struct.pack("<Q", 0x41414141) + b"\x86R.")


def numpy1_flags0_array_pickle() -> bytes:
    """The same unflagged object dtype under numpy 1.x names, inside an object array."""
    state = b"(K\x03" + _s("|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
    return (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
            + b"(K\x01K\x01\x85" + _OBJ_DTYPE + state + b"b\x89C\x08AAAAAAAA" + b"tb.")


def structured_object_field_pickle() -> bytes:
    """A structured dtype whose object field lacks the object flags (segfaulted numpy)."""
    fields = b"}(" + _s("a") + _OBJ_DTYPE + b"(K\x03" + _s("|") + \
        b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tbK\x00\x86u"
    state = b"(K\x03" + _s("|") + b"N" + _s("a") + b"\x85" + fields + b"K\x08K\x01K\x00t"
    dtype = b"cnumpy\ndtype\n" + _s("V8") + b"\x89\x88\x87R" + state + b"b"
    return (b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
            + b"(K\x01K\x01\x85" + dtype + b"\x89C\x08AAAAAAAAtb.")


def codecs_bomb_pickle(levels: int = 28) -> bytes:
    """Nested ``_codecs.encode(..., 'hex')``: each level doubles; 2**28 x 8 bytes in all."""
    body = _s("A" * 8)
    for _ in range(levels):
        body = b"c_codecs\nencode\n" + body + _s("hex") + b"\x86R"
    return b"\x80\x02" + body + b"."


def deep_tuple_array_pickle(depth: int = 10**6) -> bytes:
    """An object array whose one element is a tuple nested ``depth`` deep."""
    plain = pickle.dumps(np.array(["PLACEHOLDER"], dtype=object), protocol=2)
    deep = b"N" + b"\x85" * depth
    out = plain.replace(_s("PLACEHOLDER"), deep)
    assert out != plain
    return out


def deep_tuple_attr_pickle(depth: int = 30_000) -> bytes:
    """A deep tuple small enough for an HDF5 attribute (64 KiB)."""
    return b"\x80\x02N" + b"\x85" * depth + b"."


# ---------------------------------------------------------------- files
def _filters(n: int = N) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 9)).astype(np.float32)


def clean_file(path: str, *, meta_format: str = "fixed", n: int = N) -> str:
    """A valid small dataset.h5 of ``n`` filters (the base every attack starts from)."""
    sizes = SIZES if n == N else [n]
    meta = simple_meta(sizes, extra={"Paper": ["a", "b", "c"][: len(sizes)]})
    return write_h5(path, _filters(n), meta, meta_format=meta_format)


def _object_block(f: h5py.File) -> h5py.Dataset:
    for name in f["meta"]:
        node = f["meta"][name]
        if name.endswith("_values") and node.attrs.get("CLASS") == b"VLARRAY":
            return node
    raise AssertionError("no object block")


def _set_block(path: str, payload: bytes) -> None:
    with h5py.File(path, "a") as f:
        _object_block(f)[0] = np.frombuffer(payload, dtype=np.uint8)


def _set_attr(path: str, node: str, key: str, payload: bytes) -> None:
    with h5py.File(path, "a") as f:
        f[node].attrs[key] = np.bytes_(payload)
    with h5py.File(path, "r") as f:  # stored as written, so PyTables would unpickle it
        assert bytes(f[node].attrs[key]) == payload


def _pickle_in_block(make):
    def build(folder: str, marker: str) -> str:
        path = clean_file(os.path.join(folder, "d.h5"))
        _set_block(path, make(marker))
        return path
    return build


def _pickle_in_attr(node: str, key: str, make, *, meta_format: str = "fixed"):
    def build(folder: str, marker: str) -> str:
        path = clean_file(os.path.join(folder, "d.h5"), meta_format=meta_format)
        _set_attr(path, node, key, make(marker))
        return path
    return build


def _replace_filters(folder: str, make, n: int = N) -> str:
    """A clean file whose filter dataset is rebuilt by ``make(file, folder)``."""
    path = clean_file(os.path.join(folder, "d.h5"), n=n)
    with h5py.File(path, "a") as f:
        del f["filter"]
        make(f, folder)
    return path


def external_storage(folder: str, marker: str) -> str:
    """'filter' whose raw data is /etc/passwd (or a key file): read as weights."""
    target = "/etc/passwd"
    if not (os.path.isfile(target) and os.access(target, os.R_OK)
            and os.path.getsize(target) >= 36):
        target = os.path.join(folder, "id_rsa")
        with open(target, "w") as fh:
            fh.write("-----BEGIN PRIVATE KEY-----" + "k" * N * 36)
    n = os.path.getsize(target) // 36  # whole filters of its bytes; the meta matches
    return _replace_filters(folder, lambda f, _d: f.create_dataset(
        "filter", shape=(n, 9), dtype=np.float32, external=[(target, 0, n * 36)]), n=n)


def _other_file(folder: str) -> str:
    other = os.path.join(folder, "other.h5")
    with h5py.File(other, "w") as g:
        g["filter"] = _filters()
    return other


def virtual_dataset(folder: str, marker: str) -> str:
    """'filter' as a virtual dataset over another file."""
    other = _other_file(folder)

    def make(f, _d):
        layout = h5py.VirtualLayout(shape=(N, 9), dtype=np.float32)
        layout[:] = h5py.VirtualSource(other, "filter", shape=(N, 9))
        f.create_virtual_dataset("filter", layout)
    return _replace_filters(folder, make)


def external_link(folder: str, marker: str) -> str:
    """'filter' as an external link into another file."""
    other = _other_file(folder)
    return _replace_filters(folder, lambda f, _d: f.__setitem__(
        "filter", h5py.ExternalLink(other, "/filter")))


def external_link_meta(folder: str, marker: str) -> str:
    """A meta node as an external link into another (valid) file."""
    other = clean_file(os.path.join(folder, "other.h5"))
    path = clean_file(os.path.join(folder, "d.h5"))
    with h5py.File(path, "a") as f:
        name = _object_block(f).name
        del f[name]
        f[name] = h5py.ExternalLink(other, name)
    return path


def soft_link_loop(folder: str, marker: str) -> str:
    return _replace_filters(folder, lambda f, _d: f.__setitem__(
        "filter", h5py.SoftLink("/filter")))


def dangling_soft_link(folder: str, marker: str) -> str:
    return _replace_filters(folder, lambda f, _d: f.__setitem__(
        "filter", h5py.SoftLink("/nowhere")))


def soft_link_loop_meta(folder: str, marker: str) -> str:
    path = clean_file(os.path.join(folder, "d.h5"))
    with h5py.File(path, "a") as f:
        del f["meta/axis0"]
        f["meta/axis0"] = h5py.SoftLink("/meta/axis0")
    return path


def unallocated_chunks(folder: str, marker: str) -> str:
    """A few MB of chunks, 2**34 rows declared: the rest would be read as fill values."""
    def make(f, _d):
        d = f.create_dataset("filter", shape=(2**34, 9), dtype=np.float32, chunks=(1 << 14, 9))
        d[: 1 << 17] = np.ones((1 << 17, 9), np.float32)
    return _replace_filters(folder, make)


def unallocated_contiguous(folder: str, marker: str) -> str:
    """A contiguous 'filter' of 10**9 rows that was never written."""
    return _replace_filters(folder, lambda f, _d: f.create_dataset(
        "filter", shape=(10**9, 9), dtype=np.float32))


def compression_bomb(folder: str, marker: str) -> str:
    """288 MiB of zeros stored as about 300 KB of deflated chunks (all allocated)."""
    rows = 1 << 23
    chunk = 1 << 18

    def make(f, _d):
        d = f.create_dataset("filter", shape=(rows, 9), dtype=np.float32, chunks=(chunk, 9),
                             compression="gzip")
        blob = zlib.compress(bytes(chunk * 36), 9)
        for i in range(rows // chunk):
            d.id.write_direct_chunk((i * chunk, 0), blob)
    return _replace_filters(folder, make)


def meta_node_claims_gigabytes(folder: str, marker: str) -> str:
    """A numeric meta node (an index level) declared as 2**31 unwritten values."""
    path = clean_file(os.path.join(folder, "d.h5"))
    with h5py.File(path, "a") as f:
        name = "meta/axis1_level2"
        attrs = dict(f[name].attrs)
        del f[name]
        d = f.create_dataset(name, shape=(2**31,), dtype=np.float64, chunks=(1 << 16,))
        d.attrs.update(attrs)
    return path


def tiny_onnx(path: str, seed: int = 0) -> str:
    """A one-Conv ONNX model with 8x3 3x3 kernels (the model ``ingest`` adds)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).normal(size=(8, 3, 3, 3)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])],
        [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, producer_name="attack-test"), path)
    return path


def ingest_target_root_attr(folder: str, marker: str) -> str:
    """An ingest-written .h5 with ``os.system`` pickled in a root attribute.

    PyTables unpickles it as soon as pandas opens the file (``HDFStore``).
    """
    from filterdb_dask.convert.ingest import ingest

    path = os.path.join(folder, "own.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ingest([tiny_onnx(os.path.join(folder, "base.onnx"), seed=1)], path)
    _set_attr(path, "/", "evil", system_pickle(marker))
    return path


ATTACKS = {
    # pickles in meta blocks
    "block-os-system": _pickle_in_block(system_pickle),
    "block-builtins-open": _pickle_in_block(open_pickle),
    "block-dtype-flags0-scalar": _pickle_in_block(lambda m: dtype_flags0_scalar_pickle()),
    "block-numpy1-flags0-array": _pickle_in_block(lambda m: numpy1_flags0_array_pickle()),
    "block-structured-object-field": _pickle_in_block(
        lambda m: structured_object_field_pickle()),
    "block-codecs-bomb": _pickle_in_block(lambda m: codecs_bomb_pickle()),
    "block-deep-tuple": _pickle_in_block(lambda m: deep_tuple_array_pickle()),
    # pickles in PyTables attributes
    "attr-axis0-name-os-system": _pickle_in_attr("meta/axis0", "name", system_pickle),
    "attr-axis0-name-scalar-gadget": _pickle_in_attr(
        "meta/axis0", "name", lambda m: dtype_flags0_scalar_pickle()),
    "attr-table-kind-deep-tuple": _pickle_in_attr(
        "meta/table", "values_block_0_kind", lambda m: deep_tuple_attr_pickle(),
        meta_format="table"),
    "attr-non-index-axes-os-system": _pickle_in_attr(
        "meta", "non_index_axes", system_pickle, meta_format="table"),
    # HDF5 indirection and unbacked sizes
    "external-storage": external_storage,
    "virtual-dataset": virtual_dataset,
    "external-link": external_link,
    "external-link-meta": external_link_meta,
    "soft-link-loop": soft_link_loop,
    "dangling-soft-link": dangling_soft_link,
    "soft-link-loop-meta": soft_link_loop_meta,
    "unallocated-chunks": unallocated_chunks,
    "unallocated-contiguous": unallocated_contiguous,
    "compression-bomb": compression_bomb,
    "meta-node-claims-gigabytes": meta_node_claims_gigabytes,
}

#: attacks only ``ingest --into`` meets (the file is extended, so every attribute counts)
INGEST_ATTACKS = {"ingest-target-root-attr": ingest_target_root_attr}

"""The converter's direct chunk writer stores exactly the bytes Zarr's own write path
stores (every codec, dtype, whole and edge chunks), and the commit mark it records
is the one the readers check."""

from __future__ import annotations

import os

import numpy as np
import pytest

from filterdb_dask import storeformat as fmt


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            if n != "zarr.json":
                p = os.path.join(d, n)
                out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def _values(rows: int, dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 9)).astype(dtype)
    x[::7, 3] = 0.0
    x[1::11, 4] = -0.0                      # signed zeros survive, bit for bit
    x[2, :] = np.finfo(dtype).tiny / 4      # subnormals too
    x[3, :] = np.finfo(dtype).max
    return x


@pytest.mark.parametrize("codec", fmt.CODECS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rows", [2500, 1000, 700])  # edge chunk, whole chunks, one chunk
def test_direct_write_equals_zarrs_own(tmp_path, monkeypatch, codec, dtype, rows):
    monkeypatch.setattr(fmt, "ZARR_CHUNK_ROWS", 1000)
    x = _values(rows, dtype, seed=rows)
    direct = str(tmp_path / "direct")
    mark = fmt.write_chunk(direct, 3, x, 10, 10 + rows, dtype, codec, "ab" * 32)
    # the same array written by Zarr's generic path
    import zarr

    ref = str(tmp_path / "zarr")
    arr = fmt._create_chunk_array(zarr.storage.LocalStore(ref), fmt.chunk_name(3), rows,
                                  dtype, codec)
    arr[...] = x
    got, want = _files(direct), _files(ref)
    assert len(want) == -(-rows // 1000)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == want[k], k
    assert mark.crc32 == fmt.checksum(x)
    assert mark.stored_crc32c == tuple(fmt._stored_marks(arr))
    # the array's zarr.json as Zarr writes it, the mark in its attributes
    import json

    arr.update_attributes(mark.to_attrs(10, 10 + rows))
    here = os.path.join(fmt.chunk_name(3), "zarr.json")
    assert (json.loads(open(os.path.join(direct, here)).read())
            == json.loads(open(os.path.join(ref, here)).read()))
    back = fmt.read_chunk(direct, 3, 10, 10 + rows, dtype, codec, mark.stored_crc32c)
    assert back.dtype == np.dtype(dtype)
    assert back.tobytes() == x.tobytes()
    assert fmt.chunk_mark(direct, 3, 10, 10 + rows, dtype, codec) == mark


def test_cast_on_write_marks_the_stored_values(tmp_path):
    x = _values(1500, "float64", seed=1)
    x[3, :] = 1e300  # float64 beyond float32: stored as inf, as Zarr's cast would
    x[2, :] = 1e-300
    with np.errstate(over="ignore"):
        mark = fmt.write_chunk(str(tmp_path / "s"), 0, x, 0, 1500, "float32", "lz4", "0" * 64)
        assert mark.crc32 == fmt.checksum(x.astype(np.float32))


def test_other_codec_chains_use_zarrs_path(tmp_path):
    import zarr

    arr = zarr.create_array(zarr.storage.LocalStore(str(tmp_path / "g")), name="c",
                            shape=(10, 9), chunks=(10, 9), dtype="float32",
                            compressors=[zarr.codecs.GzipCodec()])
    assert fmt._chunk_encoder(arr) is None


def test_fast_crc32_is_zlibs():
    import zlib

    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, 3_000_001, dtype=np.uint8)
    running = 0
    for part in np.array_split(data, 5):
        running = fmt._crc32(part, running)
    assert running == zlib.crc32(data) == fmt.checksum(data)
    assert fmt._crc32(b"") == zlib.crc32(b"") == 0


def test_allocator_tuning_is_idempotent_and_leaves_the_environment():
    import os

    from filterdb_dask import cluster

    before = dict(os.environ)
    cluster.tune_allocator()
    assert cluster.tune_allocator() is False  # once per process
    assert dict(os.environ) == before


@pytest.mark.parametrize("codec", fmt.CODECS)
def test_direct_read_equals_zarrs_own_read(tmp_path, monkeypatch, codec):
    monkeypatch.setattr(fmt, "ZARR_CHUNK_ROWS", 1000)
    x = _values(2500, "float64", seed=4)
    path = str(tmp_path / "s")
    mark = fmt.write_chunk(path, 0, x, 0, 2500, "float64", codec, "ab" * 32)
    arr = fmt._open_chunk(path, 0, 0, 2500, "float64", codec)
    assert fmt._chunk_decoder(arr) is not None
    direct = fmt.read_chunk(path, 0, 0, 2500, "float64", codec, mark.stored_crc32c)
    assert direct.tobytes() == arr[...].tobytes() == x.tobytes()


@pytest.mark.parametrize("codec", fmt.CODECS)
def test_a_local_chunk_is_read_without_opening_it_through_zarr(tmp_path, monkeypatch,
                                                               codec):
    """A local chunk whose zarr.json is exactly the record's is read from its files
    alone; any other zarr.json goes through Zarr's opening and its checks."""
    import json

    import zarr

    monkeypatch.setattr(fmt, "ZARR_CHUNK_ROWS", 1000)
    x = _values(2500, "float32", seed=6)
    path = str(tmp_path / "s")
    mark = fmt.write_chunk(path, 0, x, 0, 2500, "float32", codec, "ab" * 32)
    opened = []
    real = zarr.open_array
    monkeypatch.setattr(zarr, "open_array", lambda *a, **k: opened.append(1) or real(*a, **k))
    got = fmt.read_chunk(path, 0, 0, 2500, "float32", codec, mark.stored_crc32c)
    assert got.tobytes() == x.tobytes() and not opened
    meta = os.path.join(path, "filters", "00000", "zarr.json")
    md = json.load(open(meta))
    for edit in ({"rows": [0, 2499]}, {"fill_value": 1.0}):
        bad = dict(md, **edit) if "rows" not in edit else dict(
            md, attributes=dict(md["attributes"], **edit))
        with open(meta, "w") as fh:
            json.dump(bad, fh)
        with pytest.raises(fmt.StoreError, match="zarr.json differs from the store's record"):
            fmt.read_chunk(path, 0, 0, 2500, "float32", codec, mark.stored_crc32c)
    assert opened
    # a FIFO in its place is refused at once (Zarr's read of it would never return)
    os.remove(meta)
    os.mkfifo(meta)
    with pytest.raises(fmt.StoreError, match="zarr.json is not a regular file"):
        fmt.read_chunk(path, 0, 0, 2500, "float32", codec, mark.stored_crc32c)
    with pytest.raises(fmt.StoreError, match="zarr.json is not a regular file"):
        fmt._open_chunk(path, 0, 0, 2500, "float32", codec)  # what opening a store checks


@pytest.mark.parametrize("codec", fmt.CODECS)
def test_direct_read_refuses_a_chunk_of_the_wrong_size(tmp_path, monkeypatch, codec):
    # a stored chunk replaced by a valid encoding of half the rows, its trailer and the
    # mark consistent: the decoder must refuse it, not return half-filled memory
    monkeypatch.setattr(fmt, "ZARR_CHUNK_ROWS", 1000)
    x = _values(1000, "float32", seed=5)
    path = str(tmp_path / "s")
    fmt.write_chunk(path, 0, x, 0, 1000, "float32", codec, "ab" * 32)
    arr = fmt._open_chunk(path, 0, 0, 1000, "float32", codec)
    short = fmt._chunk_encoder(arr)(x[:500])
    (name,) = _files(path)
    with open(os.path.join(path, name), "wb") as fh:
        fh.write(short)
    with pytest.raises(fmt.StoreError, match="checksum failed.*corrupt"):
        fmt.read_chunk(path, 0, 0, 1000, "float32", codec,
                       (int.from_bytes(short[-4:], "little"),))


def test_direct_write_replaces_a_planted_link_and_leaves_no_partial_file(tmp_path, monkeypatch):
    # the writer renames a fresh file over the chunk's name: a link planted there is
    # replaced, never written through, and no temporary file stays behind
    monkeypatch.setattr(fmt, "ZARR_CHUNK_ROWS", 1000)
    x = _values(1000, "float32", seed=6)
    path = str(tmp_path / "s")
    fmt.write_chunk(path, 0, x, 0, 1000, "float32", "lz4", "ab" * 32)
    (name,) = _files(path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    os.remove(os.path.join(path, name))
    os.symlink(victim, os.path.join(path, name))
    mark = fmt.write_chunk(path, 0, x, 0, 1000, "float32", "lz4", "ab" * 32)
    assert victim.read_bytes() == b"keep"
    assert not os.path.islink(os.path.join(path, name))
    assert list(_files(path)) == [name]  # no *.partial left
    back = fmt.read_chunk(path, 0, 0, 1000, "float32", "lz4", mark.stored_crc32c)
    assert back.tobytes() == x.tobytes()


def test_blosc_frames_decode_alike_in_both_libraries():
    # c-blosc2 reads the Blosc 1 frames Zarr writes exactly as c-blosc 1 does
    import numcodecs

    x = _values(5000, "float32", seed=7).view(np.uint8).reshape(-1)
    for shuffle in (0, 1, 2):
        frame = np.frombuffer(numcodecs.Blosc("lz4", 5, shuffle, typesize=4).encode(x),
                              dtype=np.uint8)
        out = np.empty_like(x)
        fmt._blosc_decompress()(frame, out)
        assert out.tobytes() == x.tobytes()


# ------------------------------------------------------------ direct (O_DIRECT) writes
_SIZES = [0, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 17, (1 << 20) + 5]


def _parts(n: int, seed: int) -> tuple:
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    cut = n // 3
    return (data[:cut], bytes(data[cut:])), bytes(data)  # an array part and a bytes part


@pytest.mark.parametrize("n", _SIZES)
def test_written_files_hold_exactly_their_bytes(tmp_path, n):
    parts, want = _parts(n, n)
    path = str(tmp_path / "c" / "0" / "0")
    fmt._write_file(path, parts)
    assert open(path, "rb").read() == want
    assert os.listdir(tmp_path / "c" / "0") == ["0"]  # no temporary file left


@pytest.mark.parametrize("n", [4096, 3 * 4096 + 17])
def test_write_falls_back_to_buffered_when_direct_io_is_refused(tmp_path, monkeypatch, n):
    """A file system that refuses O_DIRECT (F_SETFL fails), or one whose alignment
    rules are stricter than 4096 bytes (the direct write fails): the same bytes,
    written through the page cache."""
    import fcntl

    parts, want = _parts(n, 7)
    real_fcntl = fcntl.fcntl

    def refuse(fd, cmd, arg=0):
        if cmd == fcntl.F_SETFL and arg & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", refuse)
    fmt._write_file(str(tmp_path / "a"), parts)
    assert open(tmp_path / "a", "rb").read() == want
    monkeypatch.setattr(fcntl, "fcntl", real_fcntl)

    real_write = os.write
    calls = []

    def fail_first(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            raise OSError(22, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", fail_first)
    fmt._write_file(str(tmp_path / "b"), parts)
    assert open(tmp_path / "b", "rb").read() == want
    if getattr(os, "O_DIRECT", 0):
        assert calls[0] == n - n % 4096  # the first write was the direct one


def test_a_failing_write_leaves_no_file(tmp_path, monkeypatch):
    parts, _ = _parts(3 * 4096 + 5, 3)

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        fmt._write_file(str(tmp_path / "x"), parts)
    assert os.listdir(tmp_path) == []


def test_direct_write_replaces_a_planted_directory_link(tmp_path, monkeypatch):
    # a chunk array's directory replaced by a link to another directory: the writer
    # removes the link and writes its own directory; the linked one is left untouched
    monkeypatch.setattr(fmt, "ZARR_CHUNK_ROWS", 1000)
    x = _values(1000, "float32", seed=8)
    path = str(tmp_path / "s")
    os.makedirs(os.path.join(path, "filters"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_bytes(b"keep")
    os.symlink(elsewhere, os.path.join(path, fmt.chunk_name(0)))
    mark = fmt.write_chunk(path, 0, x, 0, 1000, "float32", "lz4", "ab" * 32)
    assert sorted(os.listdir(elsewhere)) == ["keep"]
    assert not os.path.islink(os.path.join(path, fmt.chunk_name(0)))
    back = fmt.read_chunk(path, 0, 0, 1000, "float32", "lz4", mark.stored_crc32c)
    assert back.tobytes() == x.tobytes()


def test_an_unfinished_chunk_array_has_no_mark(tmp_path, monkeypatch):
    # the mark (the array's zarr.json) is written last: the encoded chunks alone, as a
    # run killed between them leaves them, are not a written chunk, and the next write
    # replaces whatever was there
    monkeypatch.setattr(fmt, "ZARR_CHUNK_ROWS", 1000)
    x = _values(2500, "float32", seed=9)
    path = str(tmp_path / "s")
    mark = fmt.write_chunk(path, 0, x, 0, 2500, "float32", "lz4", "ab" * 32)
    d = os.path.join(path, fmt.chunk_name(0))
    os.remove(os.path.join(d, "zarr.json"))
    open(os.path.join(d, "stale.partial"), "wb").close()
    assert fmt.chunk_mark(path, 0, 0, 2500, "float32", "lz4") is None
    again = fmt.write_chunk(path, 0, x, 0, 2500, "float32", "lz4", "ab" * 32)
    assert again == mark
    assert "stale.partial" not in os.listdir(d)
    assert fmt.chunk_mark(path, 0, 0, 2500, "float32", "lz4") == mark

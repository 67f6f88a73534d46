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

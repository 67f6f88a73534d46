"""The filter store's format: the one module that writes it, reads it and checks it.

Owner of the store-format contract (issue 11.1). ``filterdb_dask.convert.write`` (new
stores, resume), ``filterdb_dask.convert.ingest`` (appends), ``filterdb_dask.convert.verify``
and :func:`filterdb_dask.open_store` plan what to do and call this module; none of them
spells an attribute, a path or a codec itself.

Layout (Zarr v3 directory)::

    store.zarr/
      zarr.json          attributes["filterdb"] = StoreRecord.to_attrs(): schema,
                         completion flag, source and its fingerprint, chunk plan,
                         per chunk: CRC-32 of its values, the CRC-32C of every stored
                         Zarr chunk, BLAKE3 digest of the source bytes it was made
                         from; SHA-256 of the meta table
      filters/00000      (n_0, K²) filters of planned chunk 0 (K×K kernels, flattened
                         row-major; K = 3: (n_0, 9)), one Zarr array per chunk,
                         Zarr chunks of ZARR_CHUNK_ROWS rows; codecs: bytes, the
                         compressor, crc32c (any Zarr reader checks every chunk)
      filters/00001      ...
      meta/c000 ...      one array per meta column (strings: UTF-8 + a NA mask)

Writing (each step is a commit mark, so a run killed anywhere resumes):
:class:`StoreLock` → :func:`create_or_resume` → :func:`write_chunk` per chunk (its
attributes, written last, are the chunk's commit mark) → :func:`write_meta` →
:func:`commit` (``complete`` set last). :func:`append` does the same for new chunks.

Reading checks everything against the root record, which is written last:
:func:`read_chunk` (the task behind every dask block) refuses a chunk whose metadata
(shape, dtype, codecs, rows) differs from the record's, whose stored Zarr chunks are
missing (Zarr would silently return the fill value) or are not the ones recorded (a
symlink to another chunk, a truncated file), and its crc32c codec refuses flipped
bytes. :func:`read_meta` checks the meta table's digest and every layer's bounds.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
import stat
import threading
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd

from .errors import StoreBusyError, StoreError

try:  # the same CRC-32 as zlib's, ~10x faster (carry-less multiply); optional: [fast]
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - depends on the installed extras
    from zlib import crc32 as _crc32

try:  # CRC-32C (Zarr's crc32c codec): 23 GB/s against google-crc32c's 5, GIL released
    from crc32c import crc32c as _crc32c
except ImportError:  # pragma: no cover - depends on the installed extras
    from google_crc32c import value as _crc32c

#: the schema this version writes; 3: each chunk's source digest is BLAKE3, recorded as
#: ``source_digest`` ("blake3:<hex>"). Schema 2 recorded SHA-256 as ``source_sha256``;
#: its stores are read (and appended to) as they are, never resumed
SCHEMA_VERSION = 3
READ_SCHEMAS = (2, 3)
#: kernel sizes K a store can hold (K×K filters of K² values); the record's ``kernel``
#: field (absent in stores written before it existed: 3)
MIN_KERNEL, MAX_KERNEL = 2, 15
ATTR_KEY = "filterdb"
LOCK_NAME = ".filterdb-convert.lock"
STR_NA_SUFFIX = ".isna"
#: rows per Zarr chunk inside a planned chunk: 4.5 MiB of float32 decodes ~2x faster
#: than one 36 MiB Zarr chunk (cache-sized blocks, less copying)
ZARR_CHUNK_ROWS = 1 << 17
CODECS = ("lz4", "zstd", "none")
_REPAIR = "run `filterdb-dask verify` on it and convert the source again"


# ------------------------------------------------------------------ where a store is
@dataclass(frozen=True)
class Location:
    """Where a store lives: a local directory or an fsspec URL (``s3://bucket/db.zarr``).

    The one place that knows the difference: everything else in this module asks it
    for a Zarr store and for the few whole-object operations the lock and the resume
    checks need. Picklable (it travels inside every chunk task); ``options`` are the
    fsspec storage options as JSON (credentials may also come from the environment:
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``).
    """

    url: str
    options: str = "{}"

    def __str__(self) -> str:
        return self.url

    @property
    def remote(self) -> bool:
        return "://" in self.url and not self.url.startswith("file://")

    @property
    def path(self) -> str:
        """The local directory (local stores only)."""
        return self.url[len("file://"):] if self.url.startswith("file://") else self.url

    def zarr_store(self):
        """What zarr opens: the path itself, or an fsspec store (cached per process)."""
        return _fsspec_store(self.url, self.options) if self.remote else self.path

    def _fs(self):
        return _filesystem(self.url, self.options)

    def _key(self, name: str) -> str:
        return self._fs()[1].rstrip("/") + "/" + name

    def exists(self, name: str = "") -> bool:
        """Does the store (``name=""``: anything under it) or its object ``name`` exist?"""
        if not self.remote:
            return os.path.exists(os.path.join(self.path, name) if name else self.path)
        fs, root = self._fs()
        return bool(fs.exists(self._key(name))) if name else bool(self.listdir())

    def listdir(self) -> list[str]:
        """Names directly under the store ([] if nothing is there)."""
        if not self.remote:
            return os.listdir(self.path)
        fs, root = self._fs()
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False,
                                                                     refresh=True)]
        except FileNotFoundError:
            return []

    def prepare(self) -> None:
        """Make the store's directory (local) or check its bucket is reachable."""
        if not self.remote:
            if os.path.exists(self.path) and not os.path.isdir(self.path):
                raise StoreError(f"target {self.url!r} exists and is not a directory")
            os.makedirs(self.path, exist_ok=True)
            return
        if not self.url.startswith("s3://"):
            raise StoreError(
                f"writing to {self.url.split('://')[0]}:// is not supported (the lock needs "
                "conditional writes; s3:// and local directories are); reading is"
            )
        fs, root = self._fs()
        bucket = root.split("/", 1)[0]
        try:
            fs.ls(bucket, detail=False)
        except Exception as exc:
            raise StoreError(f"bucket {bucket!r} of {self.url!r} cannot be listed "
                             f"({type(exc).__name__}: {exc}); create it or check the "
                             "credentials and endpoint") from exc

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Write object ``name`` only if it does not exist (exclusive create locally,
        ``If-None-Match: *`` on S3). False if it exists."""
        if not self.remote:
            try:
                fd = os.open(os.path.join(self.path, name),
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return True
        try:
            self._fs()[0].pipe_file(self._key(name), data, mode="create")
        except FileExistsError:
            return False
        return True

    def read_small(self, name: str, limit: int = 4096) -> bytes | None:
        """The first ``limit`` bytes of object ``name`` (None if absent or unreadable)."""
        try:
            if not self.remote:
                with open(os.path.join(self.path, name), "rb") as fh:
                    return fh.read(limit)
            return self._fs()[0].cat_file(self._key(name), start=0, end=limit)
        except (OSError, ValueError):
            return None

    def remove(self, name: str) -> None:
        try:
            if not self.remote:
                os.remove(os.path.join(self.path, name))
            else:
                self._fs()[0].rm_file(self._key(name))
        except FileNotFoundError:
            pass

    def size(self) -> int:
        """Bytes stored under the store."""
        if not self.remote:
            return sum(os.path.getsize(os.path.join(d, f))
                       for d, _, fs in os.walk(self.path) for f in fs)
        fs, root = self._fs()
        return int(fs.du(root, total=True))


def location(where: str | os.PathLike | Location,
             storage_options: dict | None = None) -> Location:
    """The :class:`Location` of a path or URL (``s3://bucket/db.zarr``).

    Raises
    ------
    StoreError
        Storage options given for a local path, or fsspec cannot handle the URL's
        protocol (e.g. s3:// without ``pip install 'filterdb-dask[s3]'``).
    """
    if isinstance(where, Location):
        return where
    url = os.fspath(where)
    loc = Location(url, json.dumps(storage_options or {}, sort_keys=True))
    if not loc.remote:
        if storage_options:
            raise StoreError(f"`storage_options` are for object-store URLs, not the "
                             f"local path {url!r}")
        return loc
    try:
        loc._fs()
    except ImportError as exc:
        raise StoreError(f"{url!r} needs an fsspec backend that is not installed ({exc}); "
                         "pip install 'filterdb-dask[s3]'") from exc
    except (ValueError, TypeError) as exc:
        raise StoreError(f"cannot open {url!r} ({type(exc).__name__}: {exc})") from exc
    return loc


@functools.lru_cache(maxsize=8)
def _filesystem(url: str, options: str):
    from fsspec.core import url_to_fs

    return url_to_fs(url, **json.loads(options))


@functools.lru_cache(maxsize=8)
def _fsspec_store(url: str, options: str):
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(url, storage_options=json.loads(options), read_only=False)



def chunk_name(i: int) -> str:
    """Path of planned chunk ``i``'s array inside the store."""
    return f"filters/{i:05d}"


# ------------------------------------------------------------------------ record
@dataclass
class StoreRecord:
    """The store's attributes (``zarr.json`` → ``attributes["filterdb"]``), typed.

    ``chunks`` is the (C, 2) plan of ``[begin, end)`` rows; the per-chunk lists
    (``checksums``, ``stored_crc32c``, ``source_digest``) have C entries once the
    store is complete. ``kernel`` is K: every filter is a K×K kernel of ``width``
    = K² values (schema 2 without the field: K = 3, so older stores open as they were).
    """

    n_filters: int
    n_layers: int
    dtype: str
    codec: str
    target_chunk_filters: int
    chunks: np.ndarray
    source: dict
    unreferenced_filters: int = 0
    complete: bool = False
    checksums: list[int] = field(default_factory=list)
    stored_crc32c: list[list[int]] = field(default_factory=list)
    source_digest: list[str] = field(default_factory=list)
    meta_sha256: str | None = None
    appended: list[str] = field(default_factory=list)
    kernel: int = 3

    @property
    def width(self) -> int:
        """Values per filter, K²."""
        return int(self.kernel) ** 2

    def to_attrs(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["chunks"] = np.asarray(self.chunks, dtype=np.int64).reshape(-1, 2).tolist()
        return {"schema_version": SCHEMA_VERSION, **out}

    @classmethod
    def from_attrs(cls, attrs: dict, path: str = "") -> StoreRecord:
        """The record of ``attrs``; StoreError for another schema or a damaged record."""
        version = attrs.get("schema_version")
        if version not in READ_SCHEMAS or isinstance(version, bool):
            raise StoreError(
                f"{path!r} has store schema {version!r}; this version reads schemas "
                f"{' and '.join(map(str, READ_SCHEMAS))} (every chunk checksummed on "
                "read): convert again"
            )
        if version == 2:  # SHA-256 digests, under their old name
            attrs = dict(attrs, source_digest=[
                f"sha256:{d}" for d in attrs.get("source_sha256") or []])
        try:
            rec = cls(**{f.name: attrs[f.name] for f in fields(cls) if f.name in attrs})
            rec.chunks = np.asarray(rec.chunks, dtype=np.int64).reshape(-1, 2)
            _validate_record(rec)
        except (TypeError, ValueError, KeyError) as exc:
            raise StoreError(
                f"the record in {path!r}/zarr.json is damaged ({exc}); convert again"
            ) from exc
        return rec

    def chunk_marks(self, i: int) -> tuple[int, ...]:
        """The recorded CRC-32C of every stored Zarr chunk of planned chunk ``i``."""
        return tuple(int(c) for c in self.stored_crc32c[i])


def _validate_record(rec: StoreRecord) -> None:
    plan = rec.chunks
    if (not isinstance(rec.kernel, int) or isinstance(rec.kernel, bool)
            or not MIN_KERNEL <= rec.kernel <= MAX_KERNEL):
        raise ValueError(f"kernel {rec.kernel!r} is not an integer in "
                         f"{MIN_KERNEL}..{MAX_KERNEL}")
    if rec.dtype not in ("float32", "float64") or rec.codec not in CODECS:
        raise ValueError(f"dtype {rec.dtype!r} / codec {rec.codec!r}")
    if len(plan) and (plan[0, 0] != 0 or plan[-1, 1] != rec.n_filters
                      or np.any(plan[:, 1] <= plan[:, 0])
                      or np.any(plan[1:, 0] != plan[:-1, 1])):
        raise ValueError("the chunk plan does not tile the filters")
    if rec.complete:
        k = len(plan)
        if not (len(rec.checksums) == len(rec.stored_crc32c) == len(rec.source_digest) == k):
            raise ValueError(f"per-chunk lists do not have {k} entries")
        for i, (a, b) in enumerate(plan):
            if len(rec.stored_crc32c[i]) != _n_zarr_chunks(int(b - a)):
                raise ValueError(f"chunk {i} has the wrong number of stored checksums")


def read_record(path: str | Location) -> StoreRecord:
    """The record of the store at ``path``; StoreError for a missing or foreign path."""
    import zarr

    loc = location(path)
    path = loc.url
    try:
        found = loc.exists()
    except Exception as exc:  # network, credentials, bucket: one line
        raise StoreError(f"store {path!r} cannot be reached ({type(exc).__name__}: "
                         f"{str(exc)[:120]})") from exc
    if not found:
        raise StoreError(f"store {path!r} does not exist")
    try:
        root = zarr.open_group(loc.zarr_store(), mode="r")
    except Exception as exc:  # zarr raises several types for a non-store
        raise StoreError(f"{path!r} is not a Zarr store ({type(exc).__name__})") from exc
    attrs = dict(root.attrs).get(ATTR_KEY)
    if not isinstance(attrs, dict):
        raise StoreError(f"{path!r} is a Zarr store but not a filterdb store")
    return StoreRecord.from_attrs(attrs, path)


# ------------------------------------------------------------------ chunk arrays
def _n_zarr_chunks(rows: int) -> int:
    return -(-rows // zarr_chunk_rows(rows))


def zarr_chunk_rows(rows: int) -> int:
    """Rows per stored Zarr chunk of a planned chunk of ``rows`` rows
    (:attr:`ChunkWriter.rows`)."""
    return max(1, min(rows, ZARR_CHUNK_ROWS))


def _compressors(codec: str, typesize: int) -> list:
    import zarr
    from zarr.codecs import Crc32cCodec

    if codec == "none":
        return [Crc32cCodec()]
    if codec == "lz4":
        comp = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle",
                                      typesize=typesize)
    elif codec == "zstd":
        comp = zarr.codecs.ZstdCodec(level=1)
    else:
        raise StoreError(f"codec {codec!r} is not one of {CODECS}")
    return [comp, Crc32cCodec()]  # the checksum is over the stored bytes: checked first


def _create_chunk_array(store, name: str | None, rows: int, dtype: str, codec: str,
                        width: int = 9):
    import zarr

    dt = np.dtype(dtype)
    return zarr.create_array(
        store, name=name, shape=(rows, width), chunks=(zarr_chunk_rows(rows), width), dtype=dt,
        compressors=_compressors(codec, dt.itemsize), overwrite=True,
        config={"write_empty_chunks": True},
    )


def _plain(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


@functools.lru_cache(maxsize=16)
def _template(dtype: str, codec: str) -> str:
    from zarr.storage import MemoryStore

    md = _plain(_create_chunk_array(MemoryStore(), None, 1, dtype, codec).metadata.to_dict())
    md.pop("attributes")
    return json.dumps(md)


def expected_chunk_metadata(rows: int, dtype: str, codec: str, width: int = 9) -> dict:
    """The Zarr metadata (less attributes) every chunk array of ``rows`` rows of
    ``width`` values has."""
    md = json.loads(_template(dtype, codec))
    md["shape"] = [rows, width]
    md["chunk_grid"]["configuration"]["chunk_shape"] = [zarr_chunk_rows(rows), width]
    return md


@functools.lru_cache(maxsize=64)
def _chunk_metadata(rows: int, dtype: str, codec: str, width: int):
    """Zarr's own metadata object of a chunk array of ``rows`` rows (no attributes),
    built without touching any store: the local writer stores its ``zarr.json``."""
    from zarr.core.metadata.v3 import ArrayV3Metadata

    return ArrayV3Metadata.from_dict(
        dict(expected_chunk_metadata(rows, dtype, codec, width), attributes={}))


def _open_chunk(path: str | Location, i: int, a: int, b: int, dtype: str, codec: str,
                width: int = 9):
    """Open chunk ``i``'s array and check its metadata against the record's."""
    import zarr

    loc = location(path)
    where = f"chunk {i} (rows {a}:{b}) of {loc.url!r}"
    if not loc.remote:
        with contextlib.suppress(OSError):  # Zarr reports what else is wrong
            _read_chunk_json(loc.path, i, where)  # refuses what Zarr's read would hang on
    try:
        arr = zarr.open_array(loc.zarr_store(), path=chunk_name(i), mode="r")
        md = _plain(arr.metadata.to_dict())
    except Exception as exc:
        raise StoreError(f"{where} cannot be opened ({type(exc).__name__}: {exc}); "
                         f"{_REPAIR}") from exc
    rows = md.pop("attributes").get("rows")
    if rows != [a, b] or md != expected_chunk_metadata(b - a, dtype, codec, width):
        want = expected_chunk_metadata(b - a, dtype, codec, width)
        diff = sorted(k for k in set(md) | set(want) if md.get(k) != want.get(k))
        raise StoreError(
            f"{where}: its zarr.json differs from the store's record "
            f"({', '.join(diff) or 'rows'} edited); {_REPAIR}"
        )
    return arr


def _stored_keys(prefix: str, md, n: int) -> list[str]:
    """Store keys of the ``n`` stored Zarr chunks of the chunk array at ``prefix``
    whose metadata is ``md``."""
    return [f"{prefix}/{md.encode_chunk_key((j, 0))}" for j in range(n)]


def _stored_marks(arr) -> list[int | None]:
    """The CRC-32C trailer of every stored Zarr chunk of ``arr`` (None: missing)."""
    import asyncio

    from zarr.abc.store import SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    sp = arr.store_path
    keys = _stored_keys(sp.path, arr.metadata, arr.cdata_shape[0])
    proto = default_buffer_prototype()

    async def _all():
        return await asyncio.gather(*(
            sp.store.get(k, proto, byte_range=SuffixByteRequest(4)) for k in keys))

    out = []
    for buf in sync(_all()):
        raw = None if buf is None else buf.to_bytes()
        out.append(None if raw is None or len(raw) != 4 else
                   int(np.frombuffer(raw, dtype="<u4")[0]))
    return out


def _read_chunk_json(root: str, i: int, where: str) -> np.ndarray | None:
    """The bytes of local chunk ``i``'s ``zarr.json`` (None: missing), read by
    :func:`_read_file` (this thread's scratch buffer).

    Raises
    ------
    StoreError
        Something other than a regular file of at most 64 KiB is in its place: a FIFO
        would block Zarr's own read of it forever, a device or a huge file exhaust it.
    """
    path = os.path.join(root, *chunk_name(i).split("/"), "zarr.json")
    try:
        return _read_file(path, 1 << 16)
    except ValueError as exc:
        raise StoreError(f"{where}: its zarr.json is not a regular file of at most 64 KiB "
                         f"({exc}); {_REPAIR}") from exc


def _local_chunk_metadata(root: str, i: int, a: int, b: int, dtype: str, codec: str,
                          width: int, where: str):
    """Zarr's metadata object of local chunk ``i`` when its ``zarr.json`` is exactly the
    record's (rows ``[a, b)``, the expected shape and codecs), read as one file; None
    for anything else, which the caller then opens through Zarr and reports.

    Opening each chunk array through Zarr costs ~4 ms of thread hand-offs to its event
    loop, a tenth of reading a chunk of 2^20 filters in one thread.

    Raises
    ------
    StoreError
        See :func:`_read_chunk_json`.
    """
    try:
        raw = _read_chunk_json(root, i, where)
        md = None if raw is None else json.loads(raw.tobytes())
    except (OSError, ValueError):
        return None
    if not isinstance(md, dict) or not isinstance(md.get("attributes"), dict):
        return None
    if md.pop("attributes").get("rows") != [a, b]:
        return None
    if md != expected_chunk_metadata(b - a, dtype, codec, width):
        return None
    return _chunk_metadata(b - a, dtype, codec, width)


def read_chunk(path: str | Location, i: int, a: int, b: int, dtype: str, codec: str,
               marks: tuple[int, ...], width: int = 9) -> np.ndarray:
    """Rows ``[a, b)`` of planned chunk ``i`` (``width`` = K² values each), verified:
    the task behind each block.

    Raises
    ------
    StoreError
        The chunk's metadata differs from the record, a stored Zarr chunk is missing
        or is not the one recorded, or its bytes fail their CRC-32C.
    """
    loc = location(path)
    where = f"chunk {i} (rows {a}:{b}) of {loc.url!r}"
    if not loc.remote:
        md = _local_chunk_metadata(loc.path, i, a, b, dtype, codec, width, where)
        if md is not None:  # exactly the record's: no need to open it through Zarr
            keys = _stored_keys(chunk_name(i), md, _n_zarr_chunks(b - a))
            return _get_decoded(keys, zarr_chunk_rows(b - a), b - a, width, dtype, marks,
                                _decoder(md.codecs, dtype), where, loc.path)
    arr = _open_chunk(path, i, a, b, dtype, codec, width)
    path = loc.url
    decode = _chunk_decoder(arr)
    if decode is not None:
        sp = arr.store_path
        keys = _stored_keys(sp.path, arr.metadata, arr.cdata_shape[0])
        return _get_decoded(keys, arr.chunks[0], b - a, arr.shape[1], arr.dtype, marks,
                            decode, where, None if loc.remote else loc.path, sp.store)
    found = _stored_marks(arr)
    for j, (got, want) in enumerate(zip(found, marks, strict=True)):
        if got is None:
            raise StoreError(f"{where}: its stored Zarr chunk {j} is missing; {_REPAIR}")
        if got != want:
            raise StoreError(
                f"{where}: its stored Zarr chunk {j} is not the one written (replaced, "
                f"truncated or edited); {_REPAIR}"
            )
    try:
        return arr[...]
    except Exception as exc:  # zarr's crc32c codec raises ValueError on a mismatch
        raise StoreError(
            f"chunk {i} (rows {a}:{b}) checksum failed: its stored bytes in {path!r} "
            f"are corrupt ({type(exc).__name__}: {str(exc)[:80]}); {_REPAIR}"
        ) from exc


def checksum(a: np.ndarray) -> int:
    """CRC-32 of the array's values (C order, store dtype)."""
    return _crc32(np.ascontiguousarray(a).data) & 0xFFFFFFFF


def _bytes_of(a) -> memoryview:
    return memoryview(np.ascontiguousarray(a)).cast("B")


class SourceDigest:
    """The digest recorded for the source bytes a chunk was made from, fed block by
    block (any split of the bytes gives the same value), as ``"<algorithm>:<hex>"``:
    BLAKE3 is written; SHA-256 is what schema-2 stores recorded. BLAKE3 is
    cryptographic as SHA-256 is, and 4x faster here (7.3 against 30 ms for a 36 MiB
    chunk, one thread): SHA-256 was a third of the converter's CPU."""

    ALGORITHMS = ("blake3", "sha256")

    def __init__(self, algorithm: str = "blake3"):
        if algorithm == "blake3":
            from blake3 import blake3

            self._h = blake3()
        elif algorithm == "sha256":
            self._h = hashlib.sha256()
        else:
            raise ValueError(f"unknown digest algorithm {algorithm!r}")
        self.algorithm = algorithm

    @classmethod
    def like(cls, recorded: str) -> SourceDigest | None:
        """A new digest of the algorithm ``recorded`` names (None: no known one)."""
        algo = str(recorded).partition(":")[0]
        return cls(algo) if algo in cls.ALGORITHMS else None

    def update(self, a) -> SourceDigest:
        self._h.update(_bytes_of(a))
        return self

    def value(self) -> str:
        return f"{self.algorithm}:{self._h.hexdigest()}"


def source_digest(a) -> str:
    """:class:`SourceDigest` of ``a``'s bytes."""
    return SourceDigest().update(a).value()


def digest_matches(recorded: str, a) -> bool:
    """Whether ``a``'s bytes have the digest ``recorded`` (``"blake3:<hex>"``, or
    ``"sha256:<hex>"`` as schema-2 stores recorded it); False for anything else."""
    digest = SourceDigest.like(recorded)
    return digest is not None and digest.update(a).value() == recorded


@dataclass(frozen=True)
class ChunkMark:
    """The commit mark of a written chunk (its array's attributes)."""

    crc32: int
    stored_crc32c: tuple[int, ...]
    source_digest: str

    def to_attrs(self, a: int, b: int) -> dict:
        return {"rows": [int(a), int(b)], "crc32": self.crc32,
                "stored_crc32c": list(self.stored_crc32c),
                "source_digest": self.source_digest}


def _chunk_encoder(arr):
    """``encode(values) -> bytes``: one Zarr chunk of ``arr`` as Zarr's own codec
    pipeline stores it (little-endian bytes, the compressor, the CRC-32C trailer),
    for the codec chains :func:`_compressors` makes; None for any other chain.

    Writing the encoded chunks directly skips the copies of Zarr's generic write
    path (a fill-value buffer per chunk, the merge into it, the trailer appended by
    copying): a third of the converter's time. ``tests/test_chunk_encoding.py``
    checks the bytes against Zarr's for every codec, dtype and edge chunk.
    """
    return _encoder(arr.metadata.codecs, arr.dtype)


def _encoder(codecs, dtype):
    """:func:`_chunk_encoder` for an array of Zarr ``codecs`` and numpy ``dtype``."""
    import numcodecs

    chain = [c.to_dict() for c in codecs]
    if (len(chain) < 2 or chain[0] != {"name": "bytes", "configuration": {"endian": "little"}}
            or chain[-1] != {"name": "crc32c"} or len(chain) > 3):
        return None
    comp = None
    if len(chain) == 3:
        conf = chain[1].get("configuration", {})
        if chain[1]["name"] == "blosc":
            shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[conf["shuffle"]]
            comp = numcodecs.Blosc(cname=conf["cname"], clevel=conf["clevel"],
                                   shuffle=shuffle, blocksize=conf["blocksize"],
                                   typesize=conf["typesize"])
        elif chain[1]["name"] == "zstd":
            comp = numcodecs.Zstd(level=conf["level"], checksum=conf["checksum"])
        else:
            return None
    little = np.dtype(dtype).newbyteorder("<")

    def encode(values: np.ndarray, parts: bool = False):
        """The stored bytes; ``parts=True``: (body, trailer), not joined (no copy)."""
        raw = np.ascontiguousarray(values, dtype=little).view(np.uint8).reshape(-1)
        body = raw if comp is None else np.frombuffer(comp.encode(raw), dtype=np.uint8)
        trailer = _crc32c(body).to_bytes(4, "little")
        return (body, trailer) if parts else b"".join((body.data, trailer))

    return encode


def _chunk_decoder(arr):
    """``decode(body, out)``: the inverse of :func:`_chunk_encoder` for one stored Zarr
    chunk whose CRC-32C trailer was checked and removed, decoding into ``out`` (a
    whole Zarr chunk of little-endian values); None for any other codec chain.

    Reading the stored objects directly (one read each, the trailer checked against
    the record's mark and against the bytes, the body decompressed straight into
    the result) skips a second read of every trailer and the copies of Zarr's
    generic read path. Blosc frames (Blosc 1 format, as Zarr writes them) are
    decoded by c-blosc2 where installed: 1.5x faster than c-blosc 1 on this data.
    ``tests/test_chunk_encoding.py`` checks it against Zarr's own reading for every
    codec, dtype and edge chunk.
    """
    return _decoder(arr.metadata.codecs, arr.dtype)


def _decoder(codecs, dtype):
    """:func:`_chunk_decoder` for an array of Zarr ``codecs`` and numpy ``dtype``."""
    if _encoder(codecs, dtype) is None:  # same accepted chains
        return None
    import numcodecs

    chain = [c.to_dict() for c in codecs]
    name = chain[1]["name"] if len(chain) == 3 else None
    blosc = _blosc_decompress() if name == "blosc" else None
    zstd = numcodecs.Zstd() if name == "zstd" else None

    def decode(body: np.ndarray, out: np.ndarray) -> None:
        dest = out.view(np.uint8).reshape(-1)  # a view: ``out`` is C-contiguous
        if blosc is not None:
            # the frame's 16-byte header says how many bytes it holds (bytes 4-7,
            # little-endian): exactly a whole chunk, so no byte of ``out`` is left
            # unwritten
            held = int(body[4:8].view("<u4")[0]) if body.size >= 16 else -1
            if held != dest.size:
                raise ValueError(f"a Blosc frame of {held} bytes for {dest.size}")
            blosc(body, dest)
            return
        data = body if zstd is None else np.frombuffer(zstd.decode(body), dtype=np.uint8)
        if data.size != dest.size:
            raise ValueError(f"{data.size} decoded bytes for {dest.size}")
        dest[...] = data

    return decode


@functools.lru_cache(maxsize=1)
def _blosc_decompress():
    """``f(frame, dest)``: decompress one Blosc frame into ``dest`` (uint8, exactly
    the frame's size), in the calling thread, the GIL released."""
    try:
        import blosc2
    except ImportError:  # pragma: no cover - python-blosc2 comes with tables
        blosc2 = None
    if blosc2 is not None and hasattr(blosc2, "decompress2"):
        if hasattr(blosc2, "set_releasegil"):
            blosc2.set_releasegil(True)  # other threads of the worker run meanwhile

        def f(frame, dest):
            # a context of one thread per call (thread-safe; the caller's thread)
            n = blosc2.decompress2(frame, dst=dest, nthreads=1)
            if n is not None and n != dest.size:
                raise ValueError(f"{n} bytes decompressed for {dest.size}")
        return f
    import numcodecs

    codec = numcodecs.Blosc()

    def f(frame, dest):
        codec.decode(frame, out=dest)
    return f


_scratch = threading.local()


def _read_file(path: str, limit: int) -> np.ndarray | None:
    """The bytes of the regular file ``path`` (None: missing), read in this thread
    into its scratch buffer: valid until this thread's next call.

    Anything else where a stored chunk should be (a FIFO, a device, a directory, a
    file larger than any encoding of the chunk) is refused before it is read:
    opening does not block and reading never runs past ``limit`` bytes.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{st.st_size} bytes, more than any encoding of the chunk")
        scratch = getattr(_scratch, "buf", None)
        if scratch is None or scratch.size < st.st_size:
            scratch = _scratch.buf = np.empty(max(st.st_size, 1 << 20), dtype=np.uint8)
        buf = scratch[:st.st_size]
        got = 0
        while got < buf.size:
            n = os.readv(fd, [buf[got:]])
            if n == 0:  # shrank while read
                return buf[:got]
            got += n
        return buf
    finally:
        os.close(fd)


def _get_decoded(keys: list[str], rows: int, rows_total: int, width: int, dtype,
                 marks: tuple[int, ...], decode, where: str, local_dir: str | None = None,
                 store=None):
    """All ``rows_total`` rows of a chunk array stored as the Zarr chunks ``keys`` (paths
    inside the store, ``rows`` rows each): every stored Zarr chunk read once, its
    CRC-32C trailer equal to the recorded mark and to the bytes' own, decoded in place.

    ``local_dir``: the store's directory, for a local store: each stored chunk is then
    read straight from its file (:func:`_read_file`) rather than through Zarr's
    asynchronous ``store`` (a thread hand-off and a copy per chunk).
    """
    little = np.dtype(dtype).newbyteorder("<")
    if len(keys) != len(marks):
        raise StoreError(f"{where}: {len(keys)} stored Zarr chunks for {len(marks)} "
                         f"recorded; {_REPAIR}")
    chunk_bytes = rows * width * little.itemsize
    limit = chunk_bytes + chunk_bytes // 16 + 4096  # Blosc/Zstd worst case + trailer
    if local_dir is not None:
        def raws():
            for k in keys:
                try:
                    yield _read_file(os.path.join(local_dir, *k.split("/")), limit)
                except (OSError, ValueError):
                    yield np.empty(0, dtype=np.uint8)  # no trailer: "not the one written"
    else:
        def raws():
            import asyncio

            from zarr.core.buffer import default_buffer_prototype
            from zarr.core.sync import sync

            proto = default_buffer_prototype()

            async def _all():
                return await asyncio.gather(*(store.get(k, proto) for k in keys))

            for buf in sync(_all()):
                yield None if buf is None else buf.as_numpy_array().view(np.uint8).reshape(-1)

    out = np.empty((rows_total, width), dtype=little)
    for j, (raw, want) in enumerate(zip(raws(), marks, strict=True)):
        if raw is None:
            raise StoreError(f"{where}: its stored Zarr chunk {j} is missing; {_REPAIR}")
        got = int(raw[-4:].view("<u4")[0]) if raw.size >= 4 else None
        if got != want:
            raise StoreError(
                f"{where}: its stored Zarr chunk {j} is not the one written (replaced, "
                f"truncated or edited); {_REPAIR}"
            )
        body = raw[:-4]
        start = j * rows
        n = min(rows, rows_total - start)
        try:
            if _crc32c(body) != got:
                raise ValueError("the stored bytes do not match their CRC-32C")
            if n == rows:
                decode(body, out[start:start + n])
            else:  # an edge chunk is stored whole, padded with the fill value
                full = np.empty((rows, width), dtype=little)
                decode(body, full)
                out[start:] = full[:n]
        except Exception as exc:
            raise StoreError(
                f"{where.split(' of ')[0]} checksum failed: its stored bytes in "
                f"{where.split(' of ', 1)[1]} are corrupt ({type(exc).__name__}: "
                f"{str(exc)[:80]}); {_REPAIR}"
            ) from exc
    return out.astype(np.dtype(dtype), copy=False)


class ChunkWriter:
    """Write planned chunk ``i`` (rows ``[a, b)`` of ``width`` values) one Zarr chunk
    at a time: :meth:`write` each block of :attr:`rows` rows in order (the last one
    shorter), then :meth:`commit` writes the commit mark, last. A writer never
    committed leaves no mark: the chunk counts as unwritten.

    Each block is encoded (:func:`_encoder`: Zarr's codec chain, bit for bit) and
    stored at once, so a caller streaming its rows holds one block, not the chunk.
    A local store is written without Zarr's store layer: the chunk array's directory
    is cleared (its old ``zarr.json``, a mark or not, removed first), every encoded
    Zarr chunk written by :func:`_write_file`, then the array's ``zarr.json`` as Zarr's
    own metadata object writes it, with the mark in its attributes (on the 20 M
    benchmark file, Zarr's array creation, attribute update and read-back of the
    trailers cost 0.4 s of CPU in its I/O threads, a fifth of the conversion's). An
    object store is written through Zarr.
    """

    def __init__(self, path: str | Location, i: int, a: int, b: int, dtype: str, codec: str,
                 width: int = 9):
        self.loc = location(path)
        self.i, self.a, self.b = i, int(a), int(b)
        self.dtype = np.dtype(dtype)
        self.width = width
        self.rows = zarr_chunk_rows(self.b - self.a)
        self._md = _chunk_metadata(self.b - self.a, self.dtype.name, codec, width)
        self._encode = _encoder(self._md.codecs, self.dtype)
        if self._encode is None:  # pragma: no cover - every chain _compressors makes has one
            raise StoreError(f"no direct encoder for codec {codec!r}")
        self._crc = 0
        self._stored: list[int] = []
        self._puts: list[tuple[str, bytes]] = []  # object stores: sent together at commit
        self._done = 0
        if self.loc.remote:
            self._arr = _create_chunk_array(self.loc.zarr_store(), chunk_name(i),
                                            self.b - self.a, self.dtype.name, codec, width)
            self._dir = None
        else:
            self._arr = None
            self._dir = os.path.join(self.loc.path, *chunk_name(i).split("/"))
            _clear_local_array(self._dir)

    def write(self, block: np.ndarray) -> None:
        """Store the next :attr:`rows` rows (fewer: the last block), cast to the
        store's dtype; ``block`` is not kept (its buffer may be reused at once)."""
        y = np.ascontiguousarray(block, dtype=self.dtype)
        n = self.b - self.a
        want = min(self.rows, n - self._done)
        if y.ndim != 2 or y.shape != (want, self.width):
            raise StoreError(f"chunk {self.i}: a block of {y.shape} for rows "
                             f"{self.a + self._done}:{self.a + self._done + want} of "
                             f"{self.width} values")
        j = len(self._stored)
        self._crc = _crc32(y, self._crc)
        if want < self.rows:  # an edge chunk is stored whole, padded with the fill value
            full = np.zeros((self.rows, self.width), dtype=self.dtype)
            full[:want] = y
            y = full
        body, trailer = self._encode(y, parts=True)
        key = self._md.encode_chunk_key((j, 0))
        if self._dir is not None:
            _write_file(os.path.join(self._dir, *key.split("/")), (body, trailer))
        else:
            self._puts.append((f"{self._arr.store_path.path}/{key}",
                               b"".join((body.data, trailer))))
        self._stored.append(int.from_bytes(trailer, "little"))
        self._done += want

    def commit(self, digest: str) -> ChunkMark:
        """Write the mark (``digest``: the :func:`source_digest` of the source bytes
        the rows were made from) once every row was written; the mark."""
        if self._done != self.b - self.a:
            raise StoreError(f"chunk {self.i}: {self._done} of {self.b - self.a} rows "
                             "written; not committed")
        if self._dir is None:  # Zarr's own trailers, read back from the object store
            self._put_all()
            mark = ChunkMark(self._crc & 0xFFFFFFFF, tuple(_stored_marks(self._arr)), digest)
            self._arr.update_attributes(mark.to_attrs(self.a, self.b))
            return mark
        from zarr.core.buffer import default_buffer_prototype

        mark = ChunkMark(self._crc & 0xFFFFFFFF, tuple(self._stored), digest)
        md = self._md.update_attributes(mark.to_attrs(self.a, self.b))
        _write_file(os.path.join(self._dir, "zarr.json"),
                    (md.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes(),))
        return mark

    def _put_all(self) -> None:
        import asyncio

        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        store = self._arr.store_path.store
        proto = default_buffer_prototype()

        async def _all():
            await asyncio.gather(*(store.set(k, proto.buffer.from_bytes(v))
                                   for k, v in self._puts))

        sync(_all())
        self._puts = []


def _clear_local_array(d: str) -> None:
    """Remove what a chunk array's directory ``d`` holds from an earlier, unfinished
    write: its ``zarr.json`` first (so no mark outlives the data it marked), then the
    rest; a link or a file planted at ``d`` is removed, never followed."""
    import shutil

    if os.path.islink(d) or (os.path.lexists(d) and not os.path.isdir(d)):
        os.unlink(d)
        return
    if not os.path.isdir(d):
        return
    try:
        os.unlink(os.path.join(d, "zarr.json"))
    except FileNotFoundError:
        pass
    shutil.rmtree(d)


DIRECT_ALIGN = 4096  # O_DIRECT: file offset, length and buffer address multiples of this


def aligned_empty(n: int) -> np.ndarray:
    """A new uint8 buffer of ``n`` bytes starting on a ``DIRECT_ALIGN`` boundary (for
    ``O_DIRECT`` reads and writes, here and in the converter's source reader)."""
    raw = np.empty(n + DIRECT_ALIGN, dtype=np.uint8)
    off = -raw.ctypes.data % DIRECT_ALIGN
    return raw[off:off + n]


def aligned_scratch(local: threading.local, n: int) -> np.ndarray:
    """The first ``n`` bytes of the :func:`aligned_empty` buffer kept in ``local``
    (one per thread), replaced by one a quarter larger than asked when too small:
    sizes that wander (encoded chunks, blocks read around unaligned offsets) settle
    on one buffer instead of page-faulting a new one for each new maximum."""
    buf = getattr(local, "buf", None)
    if buf is None or buf.size < n:
        buf = local.buf = aligned_empty(-(-(n + n // 4) // DIRECT_ALIGN) * DIRECT_ALIGN)
    return buf[:n]


_direct_out = threading.local()


def _aligned_scratch(n: int) -> np.ndarray:
    """This thread's scratch for :func:`_write_direct` (valid until its next call)."""
    return aligned_scratch(_direct_out, n)


def _write_all(fd: int, data) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


def _write_direct(fd: int, parts) -> bool:
    """Write ``parts`` to the new file ``fd`` bypassing the page cache (``O_DIRECT``):
    its whole blocks from an aligned copy, the last partial block buffered. False
    when the OS or the file system refuses direct I/O before any byte is written
    (the caller writes buffered)."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    import fcntl

    views = [memoryview(p).cast("B") for p in parts]
    total = sum(v.nbytes for v in views)
    whole = total - total % DIRECT_ALIGN
    if whole == 0:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | direct)
    except OSError:  # a file system without direct I/O (tmpfs, some FUSE mounts)
        return False
    buf = _aligned_scratch(total)
    at = 0
    for v in views:
        buf[at:at + v.nbytes] = np.frombuffer(v, dtype=np.uint8)
        at += v.nbytes
    data = memoryview(buf)
    done = 0
    try:
        while done < whole:
            done += os.write(fd, data[done:whole])
    except OSError:  # stricter alignment rules, or a real error: the buffered write
        pass          # of the rest then succeeds or raises it
    fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    _write_all(fd, data[done:total])
    return True


def _write_file(path: str, parts) -> None:
    """Write ``parts`` (buffers) as the file ``path``, atomically: a new temporary
    file beside it (never an existing name, never through a link), renamed over it.

    The bytes bypass the page cache where the file system allows it
    (:func:`_write_direct`): a conversion writes tens of GB once; buffered, those
    writes evict the source pages still being read, and on the project's test VM
    they cost several times the kernel CPU time (README, "Input and store")."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.urandom(8).hex()}.partial"
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_CLOEXEC", 0))
    fd = os.open(tmp, flags, 0o666)
    try:
        try:
            if not _write_direct(fd, parts):
                for p in parts:
                    _write_all(fd, memoryview(p).cast("B"))
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_chunk(path: str | Location, i: int, x: np.ndarray, a: int, b: int, dtype: str, codec: str,
                digest: str, width: int = 9) -> ChunkMark:
    """Write planned chunk ``i`` (rows ``[a, b)`` of ``width`` values) as its own
    array; mark it last.

    ``digest`` is the :func:`source_digest` of the source bytes the rows were made
    from (checked again when a conversion is resumed). The CRC-32 of the values and the
    encoding of each Zarr chunk are one pass over the rows (:class:`ChunkWriter`).
    """
    if np.shape(x) != (b - a, width):
        raise StoreError(f"chunk {i}: {np.shape(x)} rows given for rows {a}:{b} of "
                         f"{width} values")
    w = ChunkWriter(path, i, a, b, dtype, codec, width)
    for start in range(0, b - a, w.rows):
        w.write(x[start:start + w.rows])
    return w.commit(digest)


def chunk_mark(path: str | Location, i: int, a: int, b: int, dtype: str,
               codec: str, width: int = 9) -> ChunkMark | None:
    """The commit mark of chunk ``i`` if it was completely written, else None."""
    try:
        arr = _open_chunk(path, i, a, b, dtype, codec, width)
    except StoreError:
        return None  # absent or half-written: rewrite it
    attrs = dict(arr.attrs)
    try:
        digest = (str(attrs["source_digest"]) if "source_digest" in attrs
                  else f"sha256:{attrs['source_sha256']}")  # written by schema 2
        mark = ChunkMark(int(attrs["crc32"]), tuple(int(c) for c in attrs["stored_crc32c"]),
                         digest)
    except (KeyError, TypeError, ValueError):
        return None
    return mark if len(mark.stored_crc32c) == _n_zarr_chunks(b - a) else None


def check_chunk(path: str | Location, i: int, a: int, b: int, dtype: str, codec: str,
                marks: tuple[int, ...], crc32: int, width: int = 9) -> tuple[list[str], object]:
    """Every check of chunk ``i``: what :func:`read_chunk` checks plus the CRC-32 of
    its values (``crc32``, recorded). Returns (problems, values or None)."""
    try:
        y = read_chunk(path, i, a, b, dtype, codec, marks, width)
    except StoreError as exc:
        return [str(exc)], None
    crc = checksum(y)
    if crc != crc32:
        return [f"chunk {i} (rows {a}:{b}) checksum {crc:08x} != recorded {crc32:08x}"], y
    return [], y


def check_all_chunk_metadata(path: str | Location, rec: StoreRecord) -> None:
    """Open every chunk array and compare its metadata with the record (threads)."""
    from concurrent.futures import ThreadPoolExecutor

    path = location(path)

    def one(item):
        i, (a, b) = item
        _open_chunk(path, i, int(a), int(b), rec.dtype, rec.codec, rec.width)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, enumerate(rec.chunks)))


# ----------------------------------------------------------------------- the lock
def pid_alive(pid: int) -> bool:
    """Whether a process of this host with this id runs (of any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """Exclusive lock object inside the store: one writer at a time (``convert``,
    resumed or not, and ``ingest``). Taken by an exclusive create: ``O_EXCL`` on a
    local file system, a conditional write (``If-None-Match: *``) on S3. A lock left
    by a dead process on this host is taken over; any other stale lock is removed by
    hand (the message names it)."""

    def __init__(self, directory: str | Location):
        self.loc = location(directory)
        self.path = (os.path.join(self.loc.path, LOCK_NAME) if not self.loc.remote
                     else f"{self.loc.url.rstrip('/')}/{LOCK_NAME}")
        self.held = False

    def __enter__(self):
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                taken = self.loc.create_exclusive(LOCK_NAME, json.dumps(me).encode())
            except Exception as exc:  # the store refused or does not know conditional writes
                raise StoreBusyError(
                    f"could not take the lock {self.path!r} ({type(exc).__name__}: "
                    f"{str(exc)[:120]}); the store must support exclusive create "
                    "(conditional writes)"
                ) from exc
            if taken:
                self.held = True
                return self
            try:
                other = json.loads(self.loc.read_small(LOCK_NAME) or b"{}")
            except ValueError:
                other = {}
            if not isinstance(other, dict):
                other = {}
            same_host = other.get("host") == me["host"]
            try:
                pid = int(other.get("pid", -1))
            except (TypeError, ValueError):
                pid = -1
            if same_host and pid > 0 and not pid_alive(pid):
                self.loc.remove(LOCK_NAME)  # left by a dead writer: take it over
                continue
            raise StoreBusyError(
                f"another converter (pid {other.get('pid')!r} on "
                f"{other.get('host')!r}) is writing {self.loc.url!r}; "
                f"wait for it, or remove {self.path!r} if it is gone"
            )
        raise StoreBusyError(f"could not take the lock {self.path!r}")

    def __exit__(self, *exc):
        if self.held:
            self.loc.remove(LOCK_NAME)
        return False


# ------------------------------------------------------------- create, resume, commit
def create_or_resume(path: str | Location, rec: StoreRecord) -> tuple[StoreRecord | None, dict]:
    """Start or resume writing ``rec`` at ``path`` (hold :class:`StoreLock`).

    Returns
    -------
    (complete, done): the existing record if the store is already complete (nothing
    to do), else None; and ``{chunk: ChunkMark}`` of the chunks already written.

    Raises
    ------
    StoreError
        ``path`` holds something else: another source, other options, an older schema.
    """
    import zarr

    loc = location(path)
    path = loc.url
    if set(loc.listdir()) - {LOCK_NAME}:
        if not loc.exists("zarr.json"):
            raise StoreError(
                f"target {path!r} exists, is not empty and is not a filterdb store; "
                "choose another target"
            )
        try:
            attrs = dict(zarr.open_group(loc.zarr_store(), mode="r").attrs).get(ATTR_KEY)
        except Exception:
            attrs = None
        if not isinstance(attrs, dict):
            raise StoreError(f"target {path!r} is a Zarr store but not a filterdb store")
        version = attrs.get("schema_version")
        if version not in READ_SCHEMAS or isinstance(version, bool):
            raise StoreError(
                f"target {path!r} was written with store schema {version!r} (this "
                f"version writes {SCHEMA_VERSION}); delete it and convert again"
            )
        old = StoreRecord.from_attrs(attrs, path)
        if old.source.get("fingerprint") != rec.source.get("fingerprint"):
            raise StoreError(
                f"target {path!r} was converted from another source "
                f"({old.source.get('path')!r}); choose another target or delete it"
            )
        for key in ("kernel", "dtype", "codec", "chunks"):
            a, b = getattr(old, key), getattr(rec, key)
            if not np.array_equal(a, b):
                shown = a.tolist() if isinstance(a, np.ndarray) else a
                raise StoreError(
                    f"target {path!r} was started with another {key} "
                    f"({shown!r:.60}); rerun with the same options or delete it"
                )
        if old.complete:
            return old, {}
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"target {path!r} is an unfinished conversion by an older version (store "
                f"schema {version}; this version writes {SCHEMA_VERSION}); delete it and "
                "convert again"
            )
    root = zarr.open_group(loc.zarr_store(), mode="a")
    root.attrs[ATTR_KEY] = dict(rec.to_attrs(), complete=False)
    root.require_group("filters")  # the chunk arrays' parent (local writes skip Zarr's)
    done = {}
    for i, (a, b) in enumerate(rec.chunks):
        mark = chunk_mark(loc, i, int(a), int(b), rec.dtype, rec.codec, rec.width)
        if mark is not None:
            done[i] = mark
    return None, done


def commit(path: str | Location, rec: StoreRecord, marks: dict[int, ChunkMark]) -> StoreRecord:
    """Record every chunk's marks and set ``complete``: the store's last write."""
    import zarr

    loc = location(path)
    path = loc.url
    k = len(rec.chunks)
    missing = [i for i in range(k) if i not in marks]
    if missing:
        raise StoreError(f"cannot commit {path!r}: chunks {missing[:5]} were not written")
    final = StoreRecord(**{f.name: getattr(rec, f.name) for f in fields(rec)})
    final.checksums = [marks[i].crc32 for i in range(k)]
    final.stored_crc32c = [list(marks[i].stored_crc32c) for i in range(k)]
    final.source_digest = [marks[i].source_digest for i in range(k)]
    final.complete = True
    zarr.open_group(loc.zarr_store(), mode="a").attrs[ATTR_KEY] = final.to_attrs()
    return final


def append(path: str, x: np.ndarray, plan_new: np.ndarray, meta: pd.DataFrame, *,
           n_filters_seen: int, appended: list[str], unreferenced: int,
           new_store: dict | None = None) -> StoreRecord:
    """Append rows ``x`` as the planned chunks ``plan_new`` (absolute rows) and the full
    new ``meta`` (with ``start``/``stop``/``chunk``), under the lock.

    ``n_filters_seen`` is the store's size the caller planned against (refused if
    another writer changed it meanwhile). ``new_store`` gives the record's fixed
    fields (dtype, codec, target_chunk_filters, source) for a store created here.
    """
    import zarr

    if location(path).remote:
        raise StoreError(f"ingest into an object store ({path!r}) is not supported; "
                         "ingest into a local store and copy it")
    os.makedirs(path, exist_ok=True)
    with StoreLock(path):
        if new_store is not None:
            if set(os.listdir(path)) - {LOCK_NAME}:
                raise StoreError(f"target {path!r} is not empty; choose another target")
            rec = StoreRecord(n_filters=0, n_layers=0, chunks=np.zeros((0, 2), np.int64),
                              complete=True, **new_store)
            zarr.open_group(path, mode="a").require_group("filters")
        else:
            rec = read_record(path)
            if not rec.complete or rec.n_filters != n_filters_seen:
                raise StoreError(f"store {path!r} changed while models were read; retry")
        if x.ndim != 2 or x.shape[1] != rec.width:
            raise StoreError(
                f"store {path!r} holds {rec.kernel}x{rec.kernel} filters ({rec.width} "
                f"values); rows of {x.shape[1:]} values cannot be added (one kernel size "
                "per store)")
        n0 = rec.n_filters
        if len(x) != int(plan_new[-1, 1]) - n0 or int(plan_new[0, 0]) != n0:
            raise StoreError(f"appended rows {plan_new[[0, -1]].tolist()} do not follow {n0}")
        k0 = len(rec.chunks)
        marks = {i: ChunkMark(rec.checksums[i], rec.chunk_marks(i), rec.source_digest[i])
                 for i in range(k0)}
        grown = StoreRecord(**{f.name: getattr(rec, f.name) for f in fields(rec)})
        grown.chunks = np.concatenate([rec.chunks, plan_new]).astype(np.int64)
        grown.n_filters = int(grown.chunks[-1, 1])
        grown.n_layers = len(meta)
        grown.unreferenced_filters = int(unreferenced)
        grown.appended = [*rec.appended, *appended]
        grown.complete = False
        zarr.open_group(path, mode="a").attrs[ATTR_KEY] = grown.to_attrs()
        for j, (a, b) in enumerate(plan_new):
            rows = np.ascontiguousarray(x[a - n0: b - n0])
            marks[k0 + j] = write_chunk(path, k0 + j, rows, int(a), int(b), grown.dtype,
                                        grown.codec, source_digest(rows),
                                        grown.width)
        grown.meta_sha256 = write_meta(path, meta)
        return commit(path, grown, marks)


# ----------------------------------------------------------------------- meta
def _column_kind(s: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(s):
        return "bool"
    if pd.api.types.is_integer_dtype(s):
        return "int"
    if pd.api.types.is_float_dtype(s):
        return "float"
    return "str"


def _as_text(v) -> str:
    if isinstance(v, bytes | np.bytes_):
        return bytes(v).decode("utf-8", errors="replace")
    if isinstance(v, list | tuple | np.ndarray):
        return json.dumps(np.asarray(v).tolist())
    return str(v)


def _meta_digest(spec: list, index: list, arrays: dict) -> str:
    """SHA-256 of the meta table as stored: column spec, index and every value."""
    h = hashlib.sha256(json.dumps([spec, index]).encode())
    for name in sorted(arrays):
        a = arrays[name]
        h.update(name.encode() + b"\0")
        if a.dtype.kind in "OTU":
            h.update(json.dumps([str(v) for v in a.tolist()]).encode())
        else:
            h.update(str(a.dtype).encode() + np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def write_meta(path: str | Location, meta: pd.DataFrame) -> str:
    """One array per meta column; strings as UTF-8 plus a NA mask; no pickles.

    Returns the table's digest, for the record.
    """
    import zarr

    g = zarr.open_group(location(path).zarr_store(), mode="a").require_group("meta")
    spec, arrays = [], {}
    for j, name in enumerate(meta.columns):
        s = meta[name]
        kind = _column_kind(s)
        arr_name = f"c{j:03d}"
        if kind == "str":
            na = s.isna().to_numpy()
            vals = np.array(["" if m else _as_text(v) for v, m in zip(s, na, strict=True)],
                            dtype=object)
            g.create_array(arr_name, shape=vals.shape, dtype=str, overwrite=True)[...] = vals
            g.create_array(arr_name + STR_NA_SUFFIX, shape=na.shape, dtype=bool,
                           overwrite=True)[...] = na
            arrays[arr_name], arrays[arr_name + STR_NA_SUFFIX] = vals, na
        else:
            vals = s.to_numpy(dtype={"bool": bool, "int": np.int64, "float": np.float64}[kind])
            g.create_array(arr_name, shape=vals.shape, dtype=vals.dtype,
                           overwrite=True)[...] = vals
            arrays[arr_name] = vals
        spec.append({"name": str(name), "array": arr_name, "kind": kind})
    index = [n for n in meta.index.names if n is not None and n in meta.columns]
    g.attrs.update({"columns": spec, "index": index})
    return _meta_digest(spec, index, arrays)


def read_meta(path: str | Location, rec: StoreRecord) -> pd.DataFrame:
    """The meta table, checked: its digest against the record, and every layer's
    ``start``/``stop`` inside its chunk of the plan.

    Raises
    ------
    StoreError
        The table was edited or damaged, or a layer lies outside its chunk.
    """
    import zarr

    loc = location(path)
    path = loc.url
    where = f"the meta table of {path!r}"
    try:
        g = zarr.open_group(loc.zarr_store(), mode="r", path="meta")
        spec = list(g.attrs["columns"])
        index = list(g.attrs.get("index", []))
        arrays = {}
        for item in spec:
            names = [item["array"]] + ([item["array"] + STR_NA_SUFFIX]
                                       if item["kind"] == "str" else [])
            for n in names:
                arrays[n] = g[n][...]
    except Exception as exc:
        raise StoreError(f"{where} cannot be read ({type(exc).__name__}); {_REPAIR}") from exc
    if _meta_digest(spec, index, arrays) != rec.meta_sha256:
        raise StoreError(f"{where} differs from the one recorded (edited or damaged); "
                         f"{_REPAIR}")
    data = {}
    for item in spec:
        arr = arrays[item["array"]]
        if item["kind"] == "str":
            arr = np.asarray(arr, dtype=object)
            arr[arrays[item["array"] + STR_NA_SUFFIX]] = np.nan
        data[item["name"]] = arr
    df = pd.DataFrame(data)
    if index:
        df.index = pd.MultiIndex.from_frame(df[index]) if len(index) > 1 else pd.Index(
            df[index[0]], name=index[0]
        )
    validate_layers(df, rec.chunks, path)
    return df


def validate_layers(meta: pd.DataFrame, plan: np.ndarray, path: str = "") -> None:
    """Every layer's ``[start, stop)`` lies inside its chunk of ``plan`` (the kernels
    index chunk rows with these bounds: outside they would read another chunk's memory).
    """
    try:
        start, stop, chunk = (meta[c].to_numpy().astype(np.int64, casting="safe")
                              for c in ("start", "stop", "chunk"))
    except (KeyError, TypeError) as exc:
        raise StoreError(f"the meta table of {path!r} lacks int64 start/stop/chunk "
                         f"({exc}); {_REPAIR}") from exc
    ok = (chunk >= 0) & (chunk < len(plan))
    c = np.where(ok, chunk, 0)
    if len(plan):
        ok &= (plan[c, 0] <= start) & (start <= stop) & (stop <= plan[c, 1])
    bad = np.nonzero(~ok)[0]
    if len(bad):
        r = int(bad[0])
        raise StoreError(
            f"layer {r} of {path!r} (rows {start[r]}:{stop[r]}, chunk {chunk[r]}) lies "
            f"outside its chunk; {len(bad)} layer(s) out of bounds; {_REPAIR}"
        )

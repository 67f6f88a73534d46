"""Untrusted files never run code, never read other files, never exhaust the machine.

Each attack of :mod:`tests.attacks` is run through the real CLI (``convert``,
``verify STORE SOURCE``, ``ingest --into``) in a subprocess limited to 1 GiB of
address space, under the project's Python and under a venv made from the system
``/usr/bin/python3`` (a position-dependent build, where fixed addresses made the
numpy gadget run code). Each must exit 1 with one line on stderr naming the
reason, leave no marker and no complete-looking output.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import subprocess
import sys
import sysconfig
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest

from filterdb_dask.convert import safepickle
from filterdb_dask.convert.read import read_meta, read_source
from filterdb_dask.convert.safepickle import decode
from filterdb_dask.errors import InputError, UnsafePickleError
from tests import attacks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AS_LIMIT = 1 << 30
SYSTEM_PYTHON = "/usr/bin/python3"

#: what the one stderr line must say, per attack
REASONS = {
    "block-": r"/meta/block\d+_values: the stored pickle",
    "attr-axis0": r"/meta/axis0 attribute 'name': the stored pickle",
    "attr-table-kind": r"/meta/table attribute 'values_block_0_kind': the stored pickle",
    "attr-non-index": r"/meta attribute 'non_index_axes': the stored pickle names os.system",
    "external-storage": r"/filter keeps its raw data in external file",
    "virtual-dataset": r"/filter is a virtual dataset",
    "external-link-meta": r"/meta/block0_values is an external link",
    "external-link": r"/filter is an external link",
    "soft-link-loop-meta": r"/meta/axis0 is a soft or user-defined link",
    "soft-link": r"/filter is a soft or user-defined link",
    "dangling": r"/filter is a soft or user-defined link",
    "unallocated-chunks": r"declares 17,179,869,184 rows in .* chunks but only 8 chunks",
    "unallocated-contiguous": r"declares 36,000,000,000 bytes but the file stores 0",
    "compression-bomb": r"compressed 1,0\d\d:1, limit 64:1",
    "meta-node": r"/meta/axis1_level2 declares .* a meta node may hold at most",
    "ingest-target": r"\.h5' / attribute 'evil': the stored pickle names os\.system",
}


def _reason(name: str) -> str:
    return next(v for k, v in REASONS.items() if name.startswith(k))


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _cli(python: str, args: list[str], cwd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([python, "-m", "filterdb_dask.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=_limits)


# ------------------------------------------------------------------ interpreters
@pytest.fixture(scope="session")
def system_venv(tmp_path_factory):
    """A venv made from /usr/bin/python3 that sees this environment's packages.

    The packages (numpy, h5py, ...) are the same files; what differs is the
    interpreter binary, which is what the gadget's fixed addresses depend on.
    """
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip(f"{SYSTEM_PYTHON} does not exist here")
    ver = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    if ver != str(sys.version_info[:2]):
        pytest.skip(f"{SYSTEM_PYTHON} is Python {ver}; this environment's packages are "
                    f"built for {sys.version_info[:2]}")
    venv = tmp_path_factory.mktemp("sysvenv") / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = sysconfig.get_path("purelib")
    with open(os.path.join(site, "project-env.pth"), "w") as fh:
        fh.write(f"import site; site.addsitedir({ours!r})\n")
    return python


@pytest.fixture(params=["project", pytest.param("system", marks=pytest.mark.slow),
                        pytest.param("env", marks=pytest.mark.slow)])
def python(request):
    """The interpreter the CLI runs under; ``FILTERDB_TEST_PYTHON`` adds any other one."""
    if request.param == "project":
        return sys.executable
    if request.param == "env":
        other = os.environ.get("FILTERDB_TEST_PYTHON")
        if not other:
            pytest.skip("set FILTERDB_TEST_PYTHON to run the corpus under another Python")
        return other
    return request.getfixturevalue("system_venv")


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def clean_store(tmp_path_factory):
    """A converted store of a clean file (the STORE of ``verify STORE SOURCE``)."""
    from filterdb_dask.convert.write import convert

    d = tmp_path_factory.mktemp("clean")
    src = attacks.clean_file(str(d / "clean.h5"))
    convert(src, str(d / "clean.zarr"), verbosity=0)
    return str(d / "clean.zarr")


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    pytest.importorskip("onnx")
    return attacks.tiny_onnx(str(tmp_path_factory.mktemp("model") / "m.onnx"))


def _digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _store_complete(path: str) -> bool:
    meta = os.path.join(path, "zarr.json")
    if not os.path.exists(meta):
        return False
    with open(meta) as fh:
        attrs = json.load(fh).get("attributes", {})
    return any(isinstance(v, dict) and v.get("complete") for v in attrs.values())


def _assert_refused(r: subprocess.CompletedProcess, name: str, marker: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])  # not 0, not a signal
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("filterdb-dask: error: "), lines[0]
    assert "internal error" not in lines[0]
    import re

    assert re.search(_reason(name), lines[0]), lines[0]
    assert not os.path.exists(marker)


def _build(name: str, tmp_path) -> tuple[str, str]:
    marker = str(tmp_path / "PAYLOAD-RAN")
    builder = {**attacks.ATTACKS, **attacks.INGEST_ATTACKS}[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = builder(str(tmp_path), marker)
    assert not os.path.exists(marker)
    return path, marker


# ------------------------------------------------------------------ the corpus, via the CLI
#: one of each class runs in the quick suite; all of them under -m slow
QUICK = {"block-os-system", "block-dtype-flags0-scalar", "attr-axis0-name-os-system",
         "external-storage", "virtual-dataset", "external-link", "soft-link-loop",
         "unallocated-chunks", "compression-bomb"}


@pytest.mark.parametrize("name", sorted(attacks.ATTACKS))
def test_every_attack_is_refused_in_process(name, tmp_path):
    import re

    path, marker = _build(name, tmp_path)
    with pytest.raises(InputError) as info:
        read_source(path)
    assert re.search(_reason(name), str(info.value)) and "\n" not in str(info.value)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(attacks.ATTACKS)])
def test_convert_refuses(name, python, tmp_path):
    path, marker = _build(name, tmp_path)
    out = str(tmp_path / "out.zarr")
    r = _cli(python, ["convert", path, out], str(tmp_path))
    _assert_refused(r, name, marker)
    assert not _store_complete(out)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(attacks.ATTACKS))
def test_verify_refuses(name, python, tmp_path, clean_store):
    path, marker = _build(name, tmp_path)
    r = _cli(python, ["verify", clean_store, path], str(tmp_path))
    _assert_refused(r, name, marker)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(attacks.ATTACKS))
def test_ingest_into_refuses(name, python, tmp_path, model):
    path, marker = _build(name, tmp_path)
    before = _digest(path)
    r = _cli(python, ["ingest", model, "--into", path], str(tmp_path))
    _assert_refused(r, name, marker)
    assert _digest(path) == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_ingest_target_with_pytables_attribute_pickle(python, tmp_path, model):
    path, marker = _build("ingest-target-root-attr", tmp_path)
    before = _digest(path)
    r = _cli(python, ["ingest", model, "--into", path], str(tmp_path))
    _assert_refused(r, "ingest-target-root-attr", marker)
    assert _digest(path) == before
    # the file really is hostile: opening it with pandas runs the payload
    code = ("import warnings, pandas as pd; warnings.simplefilter('ignore')\n"
            f"with pd.HDFStore({path!r}, 'r') as s: s.keys()")
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120,
                   preexec_fn=_limits)
    assert os.path.exists(marker)


def test_attacks_are_well_formed_pickles():
    import io
    import pickletools

    for make in (attacks.dtype_flags0_scalar_pickle, attacks.numpy1_flags0_array_pickle,
                 attacks.structured_object_field_pickle, attacks.codecs_bomb_pickle):
        pickletools.dis(make(), out=io.StringIO())  # parses: refused for its content
    assert len(attacks.codecs_bomb_pickle()) < 1000


# ------------------------------------------------------------------ the decoder
_TRUSTED_VALUES = [
    np.array(["a", None, np.nan, b"x", [0, 1], 3, 2.5, True, np.float64(1.5), np.int64(7),
              (1, "t")], dtype=object),
    np.asfortranarray(np.array([["a", "b", "c"], ["d", "e", "f"]], dtype=object)),
    np.array([["a", "b"], ["c", None]], dtype=object),
    np.array([], dtype=object),
    np.empty((0, 3), dtype=object),
]


@pytest.mark.parametrize("protocol", range(6))
def test_decoder_equals_pickle_on_trusted_arrays(protocol):
    for value in _TRUSTED_VALUES:
        data = pickle.dumps(value, protocol)
        got, want = decode(data, where="x"), pickle.loads(data)  # trusted: made here
        assert got.dtype == object and got.shape == want.shape
        assert got.flags.f_contiguous == want.flags.f_contiguous
        assert [repr(v) for v in got.ravel(order="K")] == [repr(v) for v in want.ravel(order="K")]


@pytest.mark.parametrize("protocol", range(6))
def test_decoder_equals_pickle_on_pytables_attributes(protocol):
    info = {1: {"names": [None], "type": "Index"}, "index": {}, "values_block_0": {}}
    for value in [None, ["a", "b"], [(1, ["x", "y"])], [(0, "index")], "s", 3, -2**63, 1.5,
                  True, b"b", info, ()]:
        assert decode(pickle.dumps(value, protocol), where="x") == value


def _ops_or_error(ops, data):
    out = []
    try:
        out.extend(ops(data))
    except Exception as exc:  # the error type is part of the contract
        return out, type(exc)
    return out, None


def test_opcode_reader_equals_genops():
    """The decoder's own opcode reader gives genops' names, arguments and errors, on
    pickles of every protocol and on bytes flipped, cut or inserted in them."""
    import pickletools
    import random

    def genops(data):
        return ((op.name, arg) for op, arg, _pos in pickletools.genops(data))

    values = [*_TRUSTED_VALUES, ["a", 1, 2.0, None, (1, 2)], {"k": "v"}, "ü" * 300]
    corpus = [pickle.dumps(v, p) for v in values for p in range(6)]
    rng = random.Random(0)
    for data in list(corpus):
        for _ in range(40):
            b = bytearray(data)
            i = rng.randrange(len(b))
            kind = rng.randrange(3)
            if kind == 0:
                b[i] = rng.randrange(256)
            elif kind == 1:
                del b[i:]
            else:
                b[i:i] = bytes([rng.choice([0x8C, 0x94, 0x2E, rng.randrange(256)])])
            corpus.append(bytes(b))
    for data in corpus:  # repr: a NaN argument equals itself
        assert repr(_ops_or_error(safepickle._opcodes, data)) == repr(
            _ops_or_error(genops, data)), data


@pytest.mark.parametrize("data,match", [
    (b"\x80\x02]q\x00h\x00a.", "puts a list inside itself"),
    (b"\x80\x02]q\x00]q\x01h\x00aa.", "appends to a list after it was placed"),
    (b"\x80\x02h\x05.", "reads memo entry 5"),
    (b"\x80\x02" + b"(" * 9 + b".", "opens more than 8 MARKs"),
    (b"\x80\x02N\x85\x85\x85\x85\x85\x85\x85\x85\x85.", "nests containers more than 8 deep"),
    (b"\x80\x02\x8a\x09" + b"\x01" * 9 + b".", "holds an integer wider than 64 bits"),
    (b"\x80\x02NN.", "ends with a malformed stack"),
    (b"\x80\x02cnumpy\nndarray\n.", "ends on a numpy object"),
    (b"\x80\x02cbuiltins\nlist\n)R.", "names builtins.list"),
    (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00c__main__\nX\n)\x81.", "names __main__.X"),
    (b"\x80\x02N", "is not a well-formed pickle"),
    (b"(S'a'\nI1\ni__main__\nX\n.", "uses opcode INST"),
    (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x06\x00\x00\x00base64\x86R.",
     r"calls _codecs.encode other than \(str, 'latin1'\)"),
])
def test_decoder_refuses(data, match):
    with pytest.raises(UnsafePickleError, match=f"^node /x: the stored pickle {match}"):
        decode(data, where="node /x")


def test_decoder_limits(monkeypatch):
    big = pickle.dumps(np.array(["a"] * 1000, dtype=object), 5)
    with pytest.raises(UnsafePickleError, match=r"is 2,152 bytes \(limit 100\)"):
        decode(big, where="x", max_bytes=100)
    monkeypatch.setattr(safepickle, "MAX_ITEMS", 500)
    with pytest.raises(UnsafePickleError, match="makes more than 500 objects"):
        decode(big, where="x")
    # a 1 MiB string kept in the memo and encoded again and again: 5 MiB from 1 MiB
    text = b"X" + (1 << 20).to_bytes(4, "little") + b"a" * (1 << 20) + b"q\x00"
    again = b"c_codecs\nencode\nh\x00X\x06\x00\x00\x00latin1\x86R"
    with pytest.raises(UnsafePickleError, match="makes more bytes than it holds"):
        decode(b"\x80\x02](" + text + again * 5 + b"e.", where="x")


def test_text_attribute_ending_in_a_full_stop_stays_text(tmp_path):
    p = attacks.clean_file(str(tmp_path / "d.h5"))
    with h5py.File(p, "a") as f:
        f["meta/axis0"].attrs["name"] = np.bytes_(b"Columns.")
    assert read_source(p).meta.columns.name == "Columns."
    with h5py.File(p, "a") as f:
        f["meta/axis0"].attrs["name"] = np.bytes_(b"two\nlines.")
    with pytest.raises(UnsafePickleError, match="attribute 'name'"):
        read_source(p)


# ------------------------------------------------------------------ trusted files unchanged
def _frames(tmp_path):
    from filterdb_dask.convert.synth import synthesize

    meta = attacks.simple_meta([5, 7, 3, 10], tasks=["Semantic Segmentation", "x", "y", None],
                               extra={"op_set": [11, 11, 13, 13],
                                      "Accessible": [True, False, True, True],
                                      "share": [0.5, 0.5, 1.0, np.nan],
                                      "Paper": ["a", None, np.nan, "b"]})
    x = np.random.default_rng(1).normal(size=(25, 9)).astype(np.float32)
    out = []
    for fmt in ("fixed", "table"):
        out.append(attacks.write_h5(str(tmp_path / f"pd-{fmt}.h5"), x, meta, meta_format=fmt))
        p = str(tmp_path / f"synth-{fmt}.h5")
        synthesize(p, n_filters=20_000, n_models=4, seed=2, meta_format=fmt)
        out.append(p)
    return out


def _missing_as_none(df: pd.DataFrame) -> pd.DataFrame:
    out = df.astype(object)
    return out.where(out.notna(), None)


def test_trusted_files_read_like_pandas_and_convert_identically(tmp_path):
    from filterdb_dask.convert.write import convert
    from filterdb_dask.store import open_store

    for p in _frames(tmp_path):
        want = pd.read_hdf(p, "meta")  # trusted: written by this test
        with h5py.File(p, "r") as f:
            got = read_meta(f, p)
        # pandas 3 reads missing text as NaN in "str" columns, the reader keeps None
        pd.testing.assert_frame_equal(_missing_as_none(got), _missing_as_none(want),
                                      check_dtype=False, check_index_type=False,
                                      check_column_type=False)
        store = p.replace(".h5", ".zarr")
        convert(p, store, verbosity=0)
        st = open_store(store)
        with h5py.File(p, "r") as f:
            x = f["filter"][()].reshape(-1, 9)
        np.testing.assert_array_equal(st.filters.compute(), x)
        src = read_source(p)
        for col in want.columns:
            a = _missing_as_none(st.meta[[col]].reset_index(drop=True))
            b = _missing_as_none(src.meta[[col]].reset_index(drop=True))
            pd.testing.assert_frame_equal(a, b, check_dtype=False)


# ------------------------------------------------------------------ ingest writes with h5py only
def _spy_pytables(monkeypatch) -> list[str]:
    import tables

    opened: list[str] = []
    real = tables.open_file

    def spy(filename, *a, **k):
        opened.append(os.path.abspath(str(filename)))
        return real(filename, *a, **k)

    monkeypatch.setattr(tables, "open_file", spy)
    monkeypatch.setattr(tables.file, "open_file", spy, raising=False)
    return opened


@pytest.mark.parametrize("fmt", ["fixed", "table"])
def test_ingest_into_existing_h5_never_opens_it_with_pytables(fmt, tmp_path, model, monkeypatch):
    from filterdb_dask.convert.ingest import ingest

    target = str(tmp_path / "own.h5")
    meta = attacks.simple_meta([8 * 3]).reset_index()
    meta["filter_ids"] = ["0:23"]
    with h5py.File(target, "w") as f:
        f.create_dataset("filter", data=np.ones((24, 9), np.float32), maxshape=(None, 9),
                         chunks=(24, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta.set_index(["model_id", "conv_depth", "conv_depth_norm"]).to_hdf(
            target, key="meta", format=fmt, mode="a")
    opened = _spy_pytables(monkeypatch)
    second = attacks.tiny_onnx(str(tmp_path / "second.onnx"), seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ingest([model, second], target)
    assert os.path.abspath(target) not in opened
    assert opened  # pandas did write: into its own scratch file
    src = read_source(target)
    assert src.n_filters == 24 + 2 * 24 and len(src.meta) == 3
    with h5py.File(target, "r") as f:
        assert f["meta"].attrs["pandas_type"] == (b"frame" if fmt == "fixed" else b"frame_table")
    want = pd.read_hdf(target, "meta")  # trusted: this test made every byte of it
    assert list(want["filter_ids"]) == ["0:23", "24:47", "48:71"]
    assert list(want["model"].iloc[1:]) == ["m.onnx", "second.onnx"]


def test_new_ingest_h5_is_read_by_pandas(tmp_path, model):
    from filterdb_dask.convert.ingest import ingest

    target = str(tmp_path / "new.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ingest([model], target)
    got = read_source(target).meta
    want = pd.read_hdf(target, "meta")
    assert list(want["filter_ids"]) == list(got["filter_ids"]) == ["0:23"]


# ------------------------------------------------------------------ YAML / CSV side files
@pytest.mark.parametrize("text,match", [
    ("a: [unclosed\n", "is not readable YAML"),
    ("m.onnx: !!python/object/apply:os.system ['touch PAYLOAD']\n", "is not readable YAML"),
    ("m.onnx: {Task: [1, 2]}\n", "field 'Task' of 'm.onnx' is list"),
    ("- a\n- b\n", "must map model file names to fields"),
])
def test_bad_yaml_meta_file_is_one_line(text, match, tmp_path, capsys, monkeypatch):
    from filterdb_dask.run import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "side.yaml").write_text(text)
    rc = main(["ingest", "nothing.onnx", "--into", "x.h5", "--meta-file", "side.yaml"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "internal error" not in err[0]
    assert match in err[0]
    assert not (tmp_path / "PAYLOAD").exists()


def test_yaml_dates_become_text(tmp_path):
    from filterdb_dask.convert.ingest import load_side_info

    (tmp_path / "s.yml").write_text("m.onnx: {Paper: 2022-06-01, Task: OCR}\n")
    assert load_side_info(str(tmp_path / "s.yml")) == {
        "m.onnx": {"Paper": "2022-06-01", "Task": "OCR"}}


def test_bad_csv_meta_file(tmp_path):
    from filterdb_dask.convert.ingest import load_side_info

    (tmp_path / "s.csv").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InputError, match="is not readable CSV|needs a 'model' column"):
        load_side_info(str(tmp_path / "s.csv"))


def test_pytables_filters_attribute_decodes_to_its_settings():
    import tables

    for protocol in (0, 1):  # PyTables pickles attributes with protocol 0
        data = pickle.dumps(tables.Filters(complevel=1, complib="zlib"), protocol)
        got = decode(data, where="x")
        assert got["complevel"] == 1 and got["complib"] == "zlib"
    evil = pickle.dumps(tables.Filters(), 0).replace(b"Vcomplevel", b"V__class__")
    with pytest.raises(UnsafePickleError, match="gives tables' Filters a state other"):
        decode(evil, where="x")


def test_temporary_file_name_taken_by_a_symlink_is_not_written_through(tmp_path, model):
    from filterdb_dask.convert.ingest import ingest

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "new.h5"
    os.symlink(victim, f"{target}.tmp-{os.getpid()}")
    with pytest.raises(OSError):
        ingest([model], str(target))
    assert victim.read_text() == "keep me" and not target.exists()

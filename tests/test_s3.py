"""Stores on S3-compatible object storage, against a local S3 server (moto, 127.0.0.1).

convert → SIGKILL → resume → verify → info → analyze on ``s3://``, equal to the same
source converted and analysed on disk; the lock (a conditional write) refuses a second
converter; a public store is read anonymously.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pandas as pd
import pytest

from filterdb_dask import storeformat as fmt
from filterdb_dask.analysis import analyze
from filterdb_dask.convert.verify import verify
from filterdb_dask.convert.write import convert
from filterdb_dask.errors import StoreBusyError, StoreError
from filterdb_dask.store import open_store

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "filterdb-test"
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """A local S3 endpoint with one bucket; credentials and endpoint in the environment
    (as a user would set them), so subprocesses see them too."""
    import fsspec

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with mock.patch.dict(os.environ, {**ENV, "AWS_ENDPOINT_URL": endpoint}):
            fs = fsspec.filesystem("s3", skip_instance_cache=True)
            fs.mkdir(BUCKET)
            yield fs, endpoint
    finally:
        server.stop()


def _cli(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "filterdb_dask.run", "-q", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def _assert_same_results(a, b):
    assert a.pca_json() == b.pca_json()
    for name in ("layer_stats", "layer_hist", "density", "coef_range"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.group_hist.keys() == b.group_hist.keys()
    for k in a.group_hist:
        np.testing.assert_array_equal(a.group_hist[k], b.group_hist[k])
        pd.testing.assert_frame_equal(a.kl[k], b.kl[k])
    pd.testing.assert_frame_equal(a.quality, b.quality)


@pytest.mark.slow  # ~40 s on 2 shared cores: three CLI runs, two conversions, two analyses
def test_convert_killed_resumed_verified_analysed_equals_local(s3, tmp_path):
    from filterdb_dask.convert.synth import synthesize

    fs, _ = s3
    src = str(tmp_path / "d.h5")
    synthesize(src, n_filters=240_000, n_models=30, seed=3)
    url = f"s3://{BUCKET}/killed.zarr"
    args = ["convert", src, url, "--chunk-filters", "8000", "--scheduler", "threads"]
    proc = subprocess.Popen([sys.executable, "-m", "filterdb_dask.run", "-q", *args],
                            cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(fs.ls(f"{BUCKET}/killed.zarr/filters", refresh=True)) >= 8:
                break
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rec = fmt.read_record(url)
    assert not rec.complete, "the kill came too late to test a resume"
    done = [i for i, (a, b) in enumerate(rec.chunks)
            if fmt.chunk_mark(url, i, int(a), int(b), rec.dtype, rec.codec) is not None]
    assert 0 < len(done) < len(rec.chunks)
    assert fs.exists(f"{BUCKET}/killed.zarr/{fmt.LOCK_NAME}")  # left by the killed writer
    with pytest.raises(StoreError, match="is incomplete"):
        open_store(url)
    # resumed: the dead writer's lock is taken over, finished chunks are kept
    out = _cli(*args)
    assert f"{len(done)} already done" in out.stdout, out.stdout
    fs.invalidate_cache()
    assert not fs.exists(f"{BUCKET}/killed.zarr/{fmt.LOCK_NAME}")

    local = str(tmp_path / "local.zarr")
    convert(src, local, chunk_filters=8000, verbosity=0)
    remote, disk = open_store(url), open_store(local)
    assert remote.attrs["checksums"] == disk.attrs["checksums"]
    assert remote.attrs["stored_crc32c"] == disk.attrs["stored_crc32c"]
    pd.testing.assert_frame_equal(remote.meta, disk.meta)
    assert verify(url, src, verbosity=0).ok
    _cli("verify", url, src)
    info = json.loads(_cli("info", url, "--json").stdout)
    assert info["filters"] == 240_000 and info["store"] == url and info["size_bytes"] > 0
    _assert_same_results(analyze(remote, verbosity=0), analyze(disk, verbosity=0))
    # the CLI route, results written locally
    _cli("analyze", url, "--out", str(tmp_path / "r"), "--no-report",
         "--scheduler", "threads")
    assert os.path.exists(tmp_path / "r" / "pca.json")


def test_second_converter_is_refused(s3, tmp_path):
    from tests.conftest import simple_meta, write_h5

    x = np.random.default_rng(0).normal(size=(60, 9)).astype(np.float32)
    src = write_h5(tmp_path / "a.h5", x, simple_meta([20, 40], models=[0, 1]))
    url = f"s3://{BUCKET}/busy.zarr"
    loc = fmt.location(url)
    # the object store itself refuses the second exclusive create (If-None-Match: *)
    assert loc.create_exclusive("probe", b"1") and not loc.create_exclusive("probe", b"2")
    assert loc.read_small("probe") == b"1"
    loc.remove("probe")
    with fmt.StoreLock(url):
        with pytest.raises(StoreBusyError, match=f"another converter \\(pid {os.getpid()}"):
            convert(src, url, verbosity=0)
        out = _cli("convert", src, url, check=False)
        assert out.returncode == 1
        assert out.stderr.count("\n") == 1 and "another converter" in out.stderr
        assert not loc.exists("zarr.json")  # refused before anything was written
    convert(src, url, verbosity=0)
    np.testing.assert_array_equal(open_store(url).filters.compute(), x)


def test_public_store_read_anonymously(s3, tmp_path):
    from tests.conftest import simple_meta, write_h5

    fs, endpoint = s3
    x = np.random.default_rng(1).normal(size=(50, 9)).astype(np.float32)
    src = write_h5(tmp_path / "p.h5", x, simple_meta([25, 25], models=[0, 1]))
    url = f"s3://{BUCKET}/public.zarr"
    convert(src, url, verbosity=0)
    opts = {"anon": True, "endpoint_url": endpoint}
    with pytest.raises(StoreError):  # private objects are not readable anonymously
        open_store(url, opts)
    # published with public-read objects (moto honours object ACLs for anonymous reads)
    for key in fs.find(f"{BUCKET}/public.zarr"):
        fs.call_s3("put_object_acl", Bucket=BUCKET, Key=key.split("/", 1)[1],
                   ACL="public-read")
    st = open_store(url, opts)
    np.testing.assert_array_equal(st.filters.compute(), x)
    env = {k: v for k, v in os.environ.items() if k not in (*ENV, "AWS_ENDPOINT_URL")}
    out = subprocess.run([sys.executable, "-m", "filterdb_dask.run", "info", url,
                          "--storage-options", json.dumps(opts)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "filters    50" in out.stdout


def test_object_store_errors(s3, tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(f"s3://{BUCKET}/none.zarr")
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' .* cannot be listed"):
        fmt.location("s3://no-such-bucket/db.zarr").prepare()
    with pytest.raises(StoreError, match="`storage_options` are for object-store URLs"):
        open_store(tmp_path / "x.zarr", {"anon": True})
    with pytest.raises(StoreError, match="ingest into an object store"):
        fmt.append(f"s3://{BUCKET}/x.zarr", np.zeros((1, 9)), np.array([[0, 1]]),
                   pd.DataFrame(), n_filters_seen=0, appended=[], unreferenced=0)
    out = _cli("info", f"s3://{BUCKET}/x.zarr", "--storage-options", "[1]", check=False)
    assert out.returncode == 2 and "is not a JSON object" in out.stderr
    out = _cli("info", f"s3://{BUCKET}/none.zarr", check=False)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "does not exist" in out.stderr

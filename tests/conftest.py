from __future__ import annotations

import os
import tempfile

# dask-jobqueue writes jobqueue.yaml into Dask's config folder on import: keep the
# tests' folder apart from the user's (must happen before dask is imported)
os.environ["DASK_CONFIG"] = tempfile.mkdtemp(prefix="filterdb-dask-config-")

import dask  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")


def write_h5(path, filters, meta, *, name="filter", meta_format="fixed", shape3=False):
    """A dataset.h5 written the way the published one was: h5py + pandas HDFStore."""
    filters = np.asarray(filters)
    if shape3:
        filters = filters.reshape(len(filters), 3, 3)
    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=filters)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta.to_hdf(path, key="meta", format=meta_format, mode="a")
    return str(path)


def simple_meta(sizes, *, models=None, tasks=None, cats=None, extra=None):
    """Meta rows for consecutive layers of the given sizes."""
    sizes = list(sizes)
    models = models or [i // 3 for i in range(len(sizes))]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    depth, norm = [], []
    for i, m in enumerate(models):
        d = sum(1 for j in range(i) if models[j] == m)
        depth.append(d)
    maxd = {m: max(d for d, mm in zip(depth, models, strict=False) if mm == m) for m in set(models)}
    norm = [d / maxd[m] if maxd[m] else 0.0 for d, m in zip(depth, models, strict=False)]
    df = pd.DataFrame({
        "model_id": models,
        "conv_depth": depth,
        "conv_depth_norm": norm,
        "filter_ids": [f"{a}:{a + n - 1}" for a, n in zip(starts, sizes, strict=False)],
        "model": [f"m{m}.onnx" for m in models],
        "Task": tasks or ["Classification"] * len(sizes),
        "Visual Category": cats or ["natural"] * len(sizes),
    })
    if extra:
        for k, v in extra.items():
            df[k] = v
    return df.set_index(["model_id", "conv_depth", "conv_depth_norm"])


@pytest.fixture(autouse=True)
def _threads_by_default():
    with dask.config.set(scheduler="threads"):
        yield


@pytest.fixture(scope="session")
def synth_h5(tmp_path_factory):
    from filterdb_dask.convert.synth import synthesize

    path = str(tmp_path_factory.mktemp("synth") / "dataset.h5")
    synthesize(path, n_filters=60_000, n_models=12, seed=5)
    return path


@pytest.fixture(scope="session")
def synth_store(synth_h5, tmp_path_factory):
    from filterdb_dask.convert.write import convert

    path = str(tmp_path_factory.mktemp("store") / "store.zarr")
    with dask.config.set(scheduler="threads"):
        convert(synth_h5, path, chunk_filters=9_000, verbosity=0)
    return path


@pytest.fixture(scope="session")
def synth_reference(synth_h5):
    """The reference analysis of the session's synthetic data set."""
    from tests import reference as ref

    with h5py.File(synth_h5, "r") as f:
        x = f["filter"][:]
    meta = pd.read_hdf(synth_h5, "meta")
    xs = ref.scale(x)
    p = ref.pca(xs)
    c = p["coefs"]
    return {"x": x, "meta": meta, "pca": p, "lo": c.min(), "hi": c.max()}

"""Benchmark suite of filterdb_dask (run: python -m benchmarks --help)."""

import os


def parse_count(text: str) -> int:
    """'20M' -> 20_000_000 ('k', 'M', 'G' suffixes; plain integers too)."""
    s = str(text).strip().upper().replace("_", "")
    mult = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}
    try:
        value = int(float(s[:-1]) * mult[s[-1]]) if s and s[-1] in mult else int(s)
    except (KeyError, ValueError):
        raise ValueError(f"not a count: {text!r} (e.g. 300k, 20M)") from None
    if value < 1:
        raise ValueError(f"count must be positive, got {text!r}")
    return value


def cached_synth(directory: str, n: int) -> str:
    """A synthetic dataset.h5 of ``n`` filters in ``directory``, made once and reused
    (the project's ``synth``, seed 0, one model per ~50k filters, at least 10)."""
    from filterdb_dask.convert.synth import synthesize

    h5 = os.path.join(directory, f"synth-{n}.h5")
    if not os.path.exists(h5):
        synthesize(h5, n_filters=n, n_models=max(10, n // 50_000), seed=0)
    return h5


def cached_store(directory: str, n: int) -> str:
    """The store ``directory/synth-N.zarr`` of :func:`cached_synth`'s data set, converted
    once (default codec and chunks) and reused."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"synth-{n}.zarr")
    if not os.path.exists(path):
        from filterdb_dask.convert.write import convert

        convert(cached_synth(directory, n), path, verbosity=0)
    return path


def time_variants(variants: dict, repeat: int) -> dict:
    """Wall and CPU seconds of each variant (name -> zero-argument builder of dask
    collections), computed on the synchronous scheduler after one warm-up of all
    (numba compile, page cache), the variants alternating, ``repeat`` times."""
    import time

    import dask

    for make in variants.values():
        dask.compute(*make(), scheduler="synchronous")
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for _ in range(repeat):
        for k, make in variants.items():
            t, c = time.perf_counter(), time.process_time()
            dask.compute(*make(), scheduler="synchronous")
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {"wall_s_all": wall, "wall_s_min": {k: min(v) for k, v in wall.items()},
            "cpu_s_min": {k: min(v) for k, v in cpu.items()}}

"""Benchmark suite of filterdb_dask (run: python -m benchmarks --help)."""

"""Benchmark suite of filterdb_dask (run: python -m benchmarks --help)."""


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

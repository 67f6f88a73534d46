"""Groupings: labels in natural order, numbers numerically however they are stored."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from filterdb_dask.errors import AnalysisError
from filterdb_dask.groups import make_grouping


def _labels_and_codes(values):
    g = make_grouping(pd.DataFrame({"c": values}), "c")
    return list(g.labels), [g.labels[c] for c in g.codes]


@pytest.mark.parametrize("values, want", [
    ([10, 2, 1, 2], ["1", "2", "10"]),
    (["10", "2", "1", "2"], ["1", "2", "10"]),  # stored as text, ordered as numbers
    (["1e-2", "1e-3", "0.1"], ["1e-3", "1e-2", "0.1"]),  # learning rates
    ([0.1, 0.001, np.nan, 0.01], ["0.001", "0.01", "0.1", "nan"]),
    (["-3", "20", " 4"], ["-3", " 4", "20"]),
    (["b", "10", "a", "9"], ["9", "10", "a", "b"]),  # numbers first, then text
    (["inf", "10", "nan text"], ["10", "inf", "nan text"]),  # non-finite stays text
])
def test_numeric_columns_order_numerically(values, want):
    labels, per_row = _labels_and_codes(values)
    assert labels == want
    assert per_row == [("nan" if isinstance(v, float) and np.isnan(v) else str(v))
                       for v in values]


def test_values_that_print_alike_are_refused():
    with pytest.raises(AnalysisError, match="holds values that print alike"):
        make_grouping(pd.DataFrame({"c": pd.Series([1, "1"], dtype=object)}), "c")

"""Package defaults, defined once: ``filterdb_dask.yaml`` in Dask's configuration.

The YAML next to this module is the single owner of every default the package
uses (bins, fine bins, the 2-D density grid, the groupings, the engine, the codec,
each command's scheduler and the local cluster's settings). It is merged into
Dask's configuration under the key ``filterdb_dask`` when the package is imported
(as dask-jobqueue does with ``jobqueue``), so users override any of them the way
they configure Dask: a YAML file in ``~/.config/dask/``, ``dask.config.set`` or an
environment variable (``DASK_FILTERDB_DASK__ANALYSIS__BINS=80``). Read values
with :func:`get` at call time, never into module constants, so overrides apply.
"""

from __future__ import annotations

import os

import dask.config
import yaml

_FILE = os.path.join(os.path.dirname(__file__), "filterdb_dask.yaml")

with open(_FILE, encoding="utf-8") as _fh:
    DEFAULTS = yaml.safe_load(_fh)

dask.config.update_defaults(DEFAULTS)


def get(key: str):
    """The current value of ``filterdb_dask.<key>`` (e.g. ``'analysis.bins'``)."""
    return dask.config.get(f"filterdb_dask.{key}")

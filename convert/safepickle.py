"""Load the pickles pandas/PyTables leave in HDF5 files without running code.

``pandas.HDFStore`` keeps object (string) columns as pickled numpy object arrays,
and PyTables keeps some attributes (column lists, None) as pickles; both libraries
unpickle them on read, so a crafted ``dataset.h5`` runs arbitrary code under
``pandas.read_hdf``. This unpickler admits plain data only: builtins the pickle VM
makes by itself (str, bytes, int, float, bool, None, list, tuple, dict) and the
numpy globals needed to rebuild an array. Any other global is refused before it
is imported.
"""

from __future__ import annotations

import io
import pickle

from filterdb_dask.errors import UnsafePickleError

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # protocol-2 pickles spell bytes this way
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
}


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(f"refusing to unpickle {module}.{name}")


def safe_loads(data: bytes, *, where: str = "") -> object:
    """Unpickle ``data`` if it holds plain data only.

    Parameters
    ----------
    data : the pickle bytes.
    where : a description of where they came from, for the error message.

    Raises
    ------
    UnsafePickleError
        The pickle names a global outside the allow-list (it would run code).
    pickle.UnpicklingError, EOFError, ValueError
        Not a pickle at all.
    """
    try:
        return _PlainDataUnpickler(io.BytesIO(bytes(data))).load()
    except UnsafePickleError as exc:
        at = f" in {where}" if where else ""
        raise UnsafePickleError(
            f"{exc}{at}: the file stores a pickle that would run code when loaded; "
            "it was not loaded (re-save the meta table from trusted pandas, or obtain "
            "the file from its original source)"
        ) from None

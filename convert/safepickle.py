"""Decode the pickles pandas and PyTables leave in HDF5 files without unpickling.

``pandas.HDFStore`` keeps object (string) columns as pickled numpy object arrays,
and PyTables keeps some attributes (column lists, None) as pickles; both libraries
load them with :func:`pickle.loads`, so a crafted ``dataset.h5`` runs code under
``pandas.read_hdf``. An allow-list of globals is not enough: numpy's own
reconstructors, driven with a hand-made dtype state, hand out raw pointers.

:func:`decode` therefore never calls the unpickler and never imports or calls
anything the pickle names. It walks the opcodes (:func:`pickletools.genops`) on a
small stack machine that knows only these values:

* plain scalars: None, bool, int (64-bit), float, str, bytes;
* lists, tuples and dicts (keys: scalars) of those, nested at most :data:`MAX_DEPTH`
  deep, never cyclic (PyTables keeps pandas' ``info`` dict as a pickle);
* one numpy object array, in exactly the shape numpy pickles it
  (``_reconstruct(ndarray, (0,), b'b')`` + BUILD ``(1, shape, dtype('O8'), fortran,
  [elements])``), the dtype rebuilt from its name with the exact state numpy writes;
* numpy numeric scalars (``scalar(dtype('f8'), 8 bytes)``) of a handful of dtypes;
* protocol 0-2 bytes spelled ``_codecs.encode(str, 'latin1')``;
* PyTables' ``tables.filters.Filters`` attribute (index groups), decoded to its
  state dict of plain settings.

``numpy.core`` and ``numpy._core`` (numpy 1.x / 2.x) spellings are both read.
Every numpy object is built here from checked plain values (``np.empty(n,
object)``, ``np.frombuffer``); no pickled state ever reaches numpy. Limits bound the
input size, the number of objects made and the nesting depth, so memory stays a
small multiple of the input. Anything else raises :class:`UnsafePickleError`.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools

import numpy as np

from filterdb_dask.errors import UnsafePickleError

#: largest pickle decoded (bytes); pandas' object blocks of the published meta are far smaller
MAX_BYTES = 256 << 20
#: most objects one pickle may create (strings, numbers, containers, memo entries,
#: array elements); a decoded pickle takes at most about 100 bytes per item
MAX_ITEMS = 1 << 24
#: deepest nesting of lists/tuples (an object array of lists of str is 3 deep)
MAX_DEPTH = 8
#: most MARKs open at once
MAX_MARKS = 8

_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_OBJECT_STATE = (3, "|", None, None, None, -1, -1, 63)
_SCALAR_DTYPES = frozenset({
    "b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8",
})


class _Global:
    """A name the pickle asked for; never imported."""

    def __init__(self, kind: str):
        self.kind = kind


class _DTypeStub:
    """``numpy.dtype(name, False, True)`` awaiting its BUILD state."""

    def __init__(self, name: str):
        self.name = name
        self.dtype: np.dtype | None = None


class _ArrayStub:
    """``_reconstruct(ndarray, (0,), b'b')`` awaiting its BUILD state."""

    def __init__(self):
        self.array: np.ndarray | None = None


class _FiltersStub:
    """``copyreg._reconstructor(tables.filters.Filters, object, None)`` awaiting its state."""

    def __init__(self):
        self.state: dict | None = None


_SPECIAL = (_Global, _DTypeStub, _ArrayStub, _FiltersStub)
_FILTERS_KEYS = frozenset({"complevel", "complib", "shuffle", "bitshuffle", "fletcher32",
                           "least_significant_digit"})
_KEY_TYPES = (str, int, float, bytes, type(None))
_PLAIN = frozenset({str, int, float, bytes, bool, type(None)})


def _global(module: str, name: str) -> _Global:
    if name == "_reconstruct" and module in _NUMPY_CORE:
        return _Global("reconstruct")
    if name == "scalar" and module in _NUMPY_CORE:
        return _Global("scalar")
    if (module, name) == ("numpy", "ndarray"):
        return _Global("ndarray")
    if (module, name) == ("numpy", "dtype"):
        return _Global("dtype")
    if (module, name) == ("_codecs", "encode"):
        return _Global("encode")
    if module in ("copy_reg", "copyreg") and name == "_reconstructor":
        return _Global("reconstructor")
    if (module, name) == ("tables.filters", "Filters"):
        return _Global("filters")
    if module in ("__builtin__", "builtins") and name == "object":
        return _Global("object")
    raise _Refused(f"names {module}.{name}")


_BY_CODE = {op.code.encode("latin-1")[0]: op for op in pickletools.opcodes}
_SHORT_BINUNICODE = pickle.SHORT_BINUNICODE[0]  # opcode values only: nothing is unpickled
_MEMOIZE = pickle.MEMOIZE[0]
_STOP = pickle.STOP[0]


def _opcodes(data: bytes):
    """``(name, arg)`` of each opcode up to STOP: :func:`pickletools.genops`'s names,
    arguments and errors, with the two opcodes of a pandas string column
    (SHORT_BINUNICODE, MEMOIZE: most of a meta table's opcodes) read inline, about
    twice as fast; every other argument by genops' own readers."""
    stream = io.BytesIO(data)
    pos, n = 0, len(data)
    while True:
        if pos >= n:
            raise ValueError("pickle exhausted before seeing STOP")
        code = data[pos]
        pos += 1
        if code == _SHORT_BINUNICODE:
            if pos >= n or pos + 1 + data[pos] > n:
                raise ValueError("expected a SHORT_BINUNICODE string, got fewer bytes")
            end = pos + 1 + data[pos]
            yield "SHORT_BINUNICODE", str(data[pos + 1:end], "utf-8", "surrogatepass")
            pos = end
            continue
        if code == _MEMOIZE:
            yield "MEMOIZE", None
            continue
        op = _BY_CODE.get(code)
        if op is None:
            raise ValueError(f"at position {pos - 1}, opcode {bytes([code])!r} unknown")
        arg = None
        if op.arg is not None:
            stream.seek(pos)
            arg = op.arg.reader(stream)
            pos = stream.tell()
        yield op.name, arg
        if code == _STOP:
            return


class _Refused(Exception):
    """Internal: the reason a pickle is not plain pandas data."""


class _Machine:
    """The stack machine; see the module docstring for what it admits."""

    def __init__(self, size: int):
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}
        self.depth: dict[int, int] = {}  # id(container) -> nesting depth
        self.frozen: set[int] = set()  # containers already inside another one
        self.tainted: set[int] = set()  # tuples holding a numpy object or a name
        self.keep: list = []  # keeps ids stable while depth/frozen refer to them
        self.items = 0
        self.made_bytes = 0
        self.byte_budget = 2 * size
        self.arrays = 0

    # -------------------------------------------------------------- bookkeeping
    def _count(self, n: int = 1) -> None:
        self.items += n
        if self.items > MAX_ITEMS:
            raise _Refused(f"makes more than {MAX_ITEMS:,} objects")

    def _depth_of(self, v) -> int:
        if isinstance(v, list | tuple | dict):
            return self.depth.get(id(v), 1)
        return 0

    def _adopt(self, parent, child) -> None:
        """Record that ``child`` now sits inside ``parent`` (depth, freezing)."""
        if child is parent:
            raise _Refused("puts a list inside itself")
        if isinstance(child, list | tuple | dict):
            self.frozen.add(id(child))
        d = self._depth_of(child) + 1
        if d > self.depth.get(id(parent), 1):
            if d > MAX_DEPTH:
                raise _Refused(f"nests containers more than {MAX_DEPTH} deep")
            self.depth[id(parent)] = d

    def _new_container(self, c):
        self._count()
        self.keep.append(c)
        self.depth[id(c)] = 1
        return c

    def special(self, v) -> bool:
        """Whether ``v`` is, or holds, something that is not plain data."""
        return isinstance(v, _SPECIAL) or (isinstance(v, tuple) and id(v) in self.tainted)

    def _tuple(self, items: list) -> tuple:
        t = self._new_container(tuple(items))
        for v in items:
            self._adopt(t, v)
            if self.special(v):
                self.tainted.add(id(t))
        return t

    def _append(self, target, values: list) -> None:
        if not isinstance(target, list):
            raise _Refused("appends to something that is not a list")
        if id(target) in self.frozen:
            raise _Refused("appends to a list after it was placed in another")
        for v in values:
            if type(v) in _PLAIN:  # no depth, nothing special: the common case
                continue
            if self.special(v):
                raise _Refused("puts a numpy object inside a list")
            self._adopt(target, v)
        self._count(len(values))
        target.extend(values)

    def _setitems(self, target, values: list) -> None:
        if not isinstance(target, dict):
            raise _Refused("sets items of something that is not a dict")
        if id(target) in self.frozen:
            raise _Refused("sets items of a dict after it was placed in another")
        if len(values) % 2:
            raise _Refused("sets a key without a value")
        for key, value in zip(values[::2], values[1::2], strict=True):
            if not isinstance(key, _KEY_TYPES) or self.special(value):
                raise _Refused("puts something other than plain data in a dict")
            self._adopt(target, value)
            target[key] = value
        self._count(len(values) // 2)

    def _pop_mark(self) -> list:
        if not self.marks:
            raise _Refused("closes a MARK it never opened")
        at = self.marks.pop()
        items = self.stack[at:]
        del self.stack[at:]
        return items

    def _pop(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Refused("pops from an empty stack")
        return self.stack.pop()

    def _bytes(self, b: bytes) -> bytes:
        self.made_bytes += len(b)
        if self.made_bytes > self.byte_budget:
            raise _Refused("makes more bytes than it holds")
        return b

    # -------------------------------------------------------------- reduce / build
    def _reduce(self, fn, args):
        if not isinstance(fn, _Global) or not isinstance(args, tuple):
            raise _Refused("calls something that is not a known numpy constructor")
        if fn.kind == "reconstruct":
            if (len(args) == 3 and isinstance(args[0], _Global) and args[0].kind == "ndarray"
                    and args[1] == (0,) and type(args[1][0]) is int and args[2] == b"b"):
                self.arrays += 1
                if self.arrays > 1:
                    raise _Refused("holds more than one array")
                return _ArrayStub()
            raise _Refused("calls numpy's _reconstruct with unusual arguments")
        if fn.kind == "dtype":
            if (len(args) == 3 and type(args[0]) is str and args[1] is False
                    and args[2] is True and (args[0] == "O8" or args[0] in _SCALAR_DTYPES)):
                return _DTypeStub(args[0])
            raise _Refused(f"asks for numpy dtype {str(args[:1])[:40]}")
        if fn.kind == "encode":
            if (len(args) == 2 and type(args[0]) is str and args[1] == "latin1"):
                try:
                    return self._bytes(args[0].encode("latin-1"))
                except UnicodeEncodeError as exc:
                    raise _Refused("encodes text that is not latin-1") from exc
            raise _Refused("calls _codecs.encode other than (str, 'latin1')")
        if fn.kind == "scalar":
            if (len(args) == 2 and isinstance(args[0], _DTypeStub)
                    and args[0].dtype is not None and args[0].name != "O8"
                    and type(args[1]) is bytes and len(args[1]) == args[0].dtype.itemsize):
                return np.frombuffer(args[1], dtype=args[0].dtype)[0]
            raise _Refused("calls numpy's scalar other than on a number dtype and its bytes")
        if fn.kind == "reconstructor":
            if (len(args) == 3 and isinstance(args[0], _Global) and args[0].kind == "filters"
                    and isinstance(args[1], _Global) and args[1].kind == "object"
                    and args[2] is None):
                return _FiltersStub()
            raise _Refused("calls copyreg._reconstructor other than for tables' Filters")
        raise _Refused(f"calls {fn.kind} directly")

    def _build(self, obj, state) -> None:
        if isinstance(obj, _DTypeStub) and obj.dtype is None:
            self._build_dtype(obj, state)
        elif isinstance(obj, _ArrayStub) and obj.array is None:
            self._build_array(obj, state)
        elif isinstance(obj, _FiltersStub) and obj.state is None:
            if not (isinstance(state, dict) and set(state) <= _FILTERS_KEYS
                    and all(v is None or isinstance(v, str | int | float)
                            for v in state.values())):
                raise _Refused("gives tables' Filters a state other than its settings")
            obj.state = dict(state)
        else:
            raise _Refused("sets the state of something other than a new dtype or array")

    @staticmethod
    def _build_dtype(stub: _DTypeStub, state) -> None:
        if stub.name == "O8":
            if state != _OBJECT_STATE or type(state[7]) is not int:
                raise _Refused("gives the object dtype a state numpy never writes")
            stub.dtype = np.dtype(object)
            return
        base = np.dtype(stub.name)
        orders = ("|",) if base.itemsize == 1 else ("<", ">")
        if (not isinstance(state, tuple) or len(state) != 8 or state[0] != 3
                or state[1] not in orders or state[2:] != (None, None, None, -1, -1, 0)):
            raise _Refused(f"gives dtype {stub.name!r} a state numpy never writes")
        stub.dtype = base.newbyteorder(state[1]) if state[1] != "|" else base

    def _build_array(self, stub: _ArrayStub, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise _Refused("gives an array a state numpy never writes")
        _, shape, dtype, fortran, data = state
        if not (isinstance(shape, tuple) and len(shape) <= 2
                and all(type(s) is int and s >= 0 for s in shape)):
            raise _Refused("gives an array an unusual shape")
        if not (isinstance(dtype, _DTypeStub) and dtype.name == "O8" and dtype.dtype is not None):
            raise _Refused("builds an array that is not a plain object array")
        if type(fortran) is not bool or not isinstance(data, list):
            raise _Refused("gives an object array data that is not a list")
        n = math.prod(shape)
        if n != len(data):
            raise _Refused(f"declares {n} array elements but holds {len(data)}")
        for v in data:
            if self.special(v):
                raise _Refused("puts a numpy object inside an array")
        self._count(n)
        flat = np.empty(n, dtype=object)
        for i, v in enumerate(data):
            flat[i] = v  # one by one: a list element stays a list
        # numpy lists object elements in C order even for a Fortran array
        stub.array = flat.reshape(shape)
        if fortran:
            stub.array = np.asfortranarray(stub.array)

    # -------------------------------------------------------------- run
    def run(self, data: bytes):  # noqa: C901 - one branch per opcode is the clearest form
        push = self.stack.append
        for name, arg in _opcodes(data):
            # the opcodes of a string column first: most of a meta table's opcodes
            if name in ("UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"):
                self._count()
                push(arg)
                continue
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                if not self.stack:
                    raise _Refused("memoizes from an empty stack")
                key = len(self.memo) if name == "MEMOIZE" else arg
                self._count()  # a memo entry costs memory like an object
                self.memo[key] = self.stack[-1]
                continue
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                if self.marks or len(self.stack) != 1:
                    raise _Refused("ends with a malformed stack")
                return self.stack[0]
            if name == "MARK":
                if len(self.marks) >= MAX_MARKS:
                    raise _Refused(f"opens more than {MAX_MARKS} MARKs")
                self.marks.append(len(self.stack))
            elif name == "NONE":
                push(None)
            elif name in ("NEWTRUE", "NEWFALSE"):
                push(name == "NEWTRUE")
            elif name in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"):
                if type(arg) is int and not -(1 << 63) <= arg < (1 << 64):
                    raise _Refused("holds an integer wider than 64 bits")
                self._count()
                push(arg)
            elif name in ("FLOAT", "BINFLOAT"):
                self._count()
                push(float(arg))
            elif name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
                if not (isinstance(arg, str) and arg.isascii()):
                    raise _Refused("holds a Python 2 str that is not ASCII")
                self._count()
                push(arg)
            elif name in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8"):
                self._count()
                push(bytes(arg))
            elif name == "EMPTY_LIST":
                push(self._new_container([]))
            elif name == "LIST":
                lst = self._new_container([])
                self._append(lst, self._pop_mark())
                push(lst)
            elif name in ("APPEND", "APPENDS"):
                values = self._pop_mark() if name == "APPENDS" else [self._pop()]
                if not self.stack:
                    raise _Refused("appends to nothing")
                self._append(self.stack[-1], values)
            elif name == "EMPTY_DICT":
                push(self._new_container({}))
            elif name == "DICT":
                d = self._new_container({})
                self._setitems(d, self._pop_mark())
                push(d)
            elif name in ("SETITEM", "SETITEMS"):
                if name == "SETITEMS":
                    values = self._pop_mark()
                else:
                    value = self._pop()
                    values = [self._pop(), value]
                if not self.stack:
                    raise _Refused("sets items of nothing")
                self._setitems(self.stack[-1], values)
            elif name == "EMPTY_TUPLE":
                push(self._tuple([]))
            elif name == "TUPLE":
                push(self._tuple(self._pop_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                k = int(name[-1])
                items = [self._pop() for _ in range(k)][::-1]
                push(self._tuple(items))
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in self.memo:
                    raise _Refused(f"reads memo entry {arg} that was never written")
                push(self.memo[arg])
            elif name == "GLOBAL":
                module, _, attr = arg.partition(" ")
                push(_global(module, attr))
            elif name == "STACK_GLOBAL":
                attr, module = self._pop(), self._pop()
                if type(module) is not str or type(attr) is not str:
                    raise _Refused("names a global with something other than text")
                push(_global(module, attr))
            elif name == "REDUCE":
                args = self._pop()
                fn = self._pop()
                push(self._reduce(fn, args))
            elif name == "BUILD":
                state = self._pop()
                if not self.stack:
                    raise _Refused("sets a state on nothing")
                self._build(self.stack[-1], state)
            else:
                raise _Refused(f"uses opcode {name}")
        raise _Refused("has no STOP")


def _finish(machine: _Machine, value):
    """The decoded value with stubs resolved; refuses unfinished numpy objects."""
    if isinstance(value, _ArrayStub):
        if value.array is None:
            raise _Refused("leaves an array without its data")
        return value.array
    if isinstance(value, _FiltersStub) and value.state is not None:
        return value.state
    if machine.special(value):
        raise _Refused("ends on a numpy object that is not an array")
    return value


def decode(data: bytes, *, where: str, max_bytes: int = MAX_BYTES) -> object:
    """Decode a pickle written by pandas/PyTables into plain data, without unpickling.

    Parameters
    ----------
    data : the pickle bytes.
    where : the HDF5 node (and attribute) they came from, for the error message.
    max_bytes : refuse longer input.

    Returns
    -------
    A plain value (None, bool, int, float, str, bytes, lists/tuples of those) or a
    numpy object array of such values.

    Raises
    ------
    UnsafePickleError
        Not a pickle, or one that is not plain pandas/PyTables data.

    Examples
    --------
    >>> decode(b"(lp0\\nVa\\np1\\na.", where="/meta attribute 'levels'")
    ['a']
    """
    data = bytes(data)
    try:
        if len(data) > max_bytes:
            raise _Refused(f"is {len(data):,} bytes (limit {max_bytes:,})")
        machine = _Machine(len(data))
        return _finish(machine, machine.run(data))
    except _Refused as exc:
        reason = str(exc)
    except (ValueError, TypeError, EOFError, OverflowError, UnicodeDecodeError,
            RecursionError, MemoryError) as exc:
        reason = f"is not a well-formed pickle ({type(exc).__name__}: {str(exc)[:80]})"
    raise UnsafePickleError(
        f"{where}: the stored pickle {reason}; it is not plain pandas data and was not "
        "loaded (re-save the meta table from trusted pandas, or get the file from its "
        "original source)"
    ) from None

"""How Python objects travel: JSON scalars as they are, everything else pickled.

Functions and objects are pickled with cloudpickle (protocol 5), so lambdas, closures and
functions defined in a notebook travel by value; buffers such as a NumPy array's data are
pickled out of band and travel as raw bytes beside the pickle, never copied into it. A value
crosses into the native client as a JSON scalar, or as ``(pickle, buffers, repr)``.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import sys
import sysconfig
import types
import weakref

import cloudpickle

from . import _starling
from .error import SerializationError

_LARGE = _starling.LARGE_BUFFER

PYTHON = "{}.{}".format(*sys.version_info[:2])

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


class Reference:
    """A name in each engine's namespace, standing in for an argument.

    ``v.apply(f, Reference('a'))`` calls ``f`` with that engine's own ``a``, as in
    ipyparallel."""

    def __init__(self, name: str):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a Reference names a variable, not {name!r}")
        self.name = name

    def __repr__(self) -> str:
        return f"Reference({self.name!r})"

    def __reduce__(self):
        return (_KernelReference, (self.name,))


# The kernel defines `starling_kernel.Reference`; a Reference pickles as a call to it. A
# module of that name exists here only so that pickle can name the class.
class _KernelReference:
    def __init__(self, name):
        self.name = name


_kernel_module = types.ModuleType("starling_kernel")
_kernel_module.Reference = _KernelReference
_KernelReference.__module__ = "starling_kernel"
_KernelReference.__qualname__ = _KernelReference.__name__ = "Reference"
sys.modules.setdefault("starling_kernel", _kernel_module)


def _dumps(obj, what: str):
    bufs = []

    def keep(pb):
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: stays inside the pickle
            return True
        if raw.nbytes < _LARGE:
            bufs.append(bytes(raw))
        else:
            # Copied once, into the native client's memory (on huge pages, reused once
            # freed), which it then sends as it is.
            buf = _starling.large_buffer(raw.nbytes)
            memoryview(buf).cast("B")[:] = raw
            bufs.append(buf)
        return False

    try:
        data = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep)
    except Exception as e:  # noqa: BLE001 - every pickling failure is the user's to see
        raise SerializationError(
            f"cannot send {what} ({type(obj).__name__}) to the engines: it cannot be pickled "
            f"({type(e).__name__}: {e}); send something picklable, e.g. the data it holds"
        ) from e
    return data, bufs


def pack(obj, what: str = "an argument"):
    """One value for the wire."""
    t = type(obj)
    if obj is None or t is str or t is bool:
        return obj
    if t is int and _INT_MIN <= obj <= _INT_MAX:
        return obj
    if t is float and math.isfinite(obj):
        return obj
    data, bufs = _dumps(obj, what)
    return (data, bufs, "")


_installed = tuple(
    os.path.realpath(p) + os.sep
    for p in {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
)
_by_value = set()


def _travel_by_value(f) -> None:
    """Functions from the user's own modules (not installed packages, not the standard
    library) travel by value, like those defined in a notebook: the engines need not have the
    module."""
    name = getattr(f, "__module__", None)
    if not name or name == "__main__" or name in _by_value:
        return
    top = name.split(".")[0]
    module = sys.modules.get(top)
    path = getattr(module, "__file__", None)
    if module is None or path is None or top == "starling":
        return
    if os.path.realpath(path).startswith(_installed):
        return
    cloudpickle.register_pickle_by_value(module)
    _by_value.add(name)


def pack_func(f, args=(), kwargs=None):
    """A callable with its arguments bound, for the wire: ``(pickle, buffers, python)``."""
    if not callable(f):
        raise TypeError(f"{f!r} is not callable")
    state = None
    if not args and not kwargs and type(f) is types.FunctionType:
        hit = _packed.get(id(f))
        last = hit[1] if hit is not None and hit[0]() is f else None
        state = _stateless(f, last)
        if state is not None and state == last:
            return hit[2]
    _travel_by_value(f)
    if args or kwargs:
        f = functools.partial(f, *args, **(kwargs or {}))
    data, bufs = _dumps(f, "the function")
    packed = (data, bufs, PYTHON)
    if state is not None:
        key = id(f)
        _packed[key] = (weakref.ref(f, lambda _, key=key: _packed.pop(key, None)), state, packed)
    return packed


# Functions defined interactively, by id: (a weak reference to the function, what it was
# pickled from, the pickle). A function sent again unchanged is not pickled again (cloudpickle
# takes tens of microseconds for a lambda).
_packed = {}
_ATOMS = (type(None), bool, int, float, complex, str, bytes)
_ABSENT = object()


def _stateless(f, last):
    """What a notebook function's pickle is made of, if every part of it is immutable: its
    code, names, defaults, and the globals its code names (atoms and modules, by identity);
    else None. The same state pickles the same, so the pickle can be sent again. ``last``: the
    state it had when it was last pickled, if any (its code's names are reused)."""
    if f.__module__ != "__main__" or f.__closure__ is not None:
        return None
    if f.__kwdefaults__ or f.__dict__ or f.__annotations__:
        return None
    defaults = f.__defaults__
    if defaults is not None and not all(type(d) in _ATOMS for d in defaults):
        return None
    code = f.__code__
    names = last[1] if last is not None and last[0] is code else _global_names(code)
    g = f.__globals__
    registry = None  # modules that travel by value: read (a copy) only if a module is named
    seen = []
    packages = False
    for name in names:
        v = g.get(name, _ABSENT)
        if v is _ABSENT or type(v) in _ATOMS:
            seen.append(v)
        elif type(v) is types.ModuleType:
            if registry is None:
                registry = cloudpickle.list_registry_pickle_by_value()
            if not _by_reference(v, registry):
                return None
            seen.append(v)
            packages = packages or bool(getattr(v, "__package__", None))
        else:
            return None
    # cloudpickle also sends the submodules of a package the code names that are imported
    # at the time (`np.linalg`): an import since the last pickle makes a new one.
    imported = len(sys.modules) if packages else 0
    return (
        code,
        names,
        f.__name__,
        f.__qualname__,
        f.__doc__,
        id(defaults),
        defaults,
        imported,
        tuple(map(id, seen)),
        tuple(seen),
    )


def _by_reference(module, registry) -> bool:
    """Whether cloudpickle pickles this module by name (not in the ``registry`` of modules
    that travel by value)."""
    name = module.__name__
    return sys.modules.get(name) is module and not any(
        name == r or name.startswith(r + ".") for r in registry
    )


def _global_names(code) -> tuple:
    """Every name a code object (and the code nested in it) looks up: a superset of the globals
    it uses."""
    found = set(code.co_names)
    for c in code.co_consts:
        if type(c) is types.CodeType:
            found.update(_global_names(c))
    return tuple(sorted(found))


class Opaque:
    """A value an engine could show but not pickle: only its ``repr`` came back."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def unpack(v):
    """A value from the wire."""
    if type(v) is not tuple:
        return v
    data, bufs, text = v
    if data is None:
        return Opaque(text)
    try:
        return pickle.loads(data, buffers=bufs)
    except Exception as e:  # noqa: BLE001 - say which value and why
        raise SerializationError(
            f"a result ({text[:200]}) cannot be unpickled here: {type(e).__name__}: {e}; "
            "install on the client what the engines used to make it, or return plain data"
        ) from e

"""Views: ``DirectView`` (work on chosen engines) and ``LoadBalancedView`` (work wherever
there is room), with ipyparallel's names, flags and return types."""

from __future__ import annotations

import builtins
import collections
import concurrent.futures
import contextlib
import copy
import functools
import itertools
import sys

from . import _serialize
from .asyncresult import AsyncMapResult, AsyncResult, collect
from .dependency import as_dependency
from .error import RemoteError


def _name(f) -> str:
    return getattr(f, "__name__", type(f).__name__)


class View:
    """What both views share: the ``block`` flag, ``set_flags``, ``temp_flags``, ``apply``
    and ``map`` in their sync and async forms."""

    _flag_names = ("block", "track")

    def __init__(self, client, *, block: bool = False):
        self.client = client
        self.block = block
        # Accepted for ipyparallel's sake: a call that sends buffers has copied or sent them
        # by the time it returns, so there is nothing to track.
        self.track = False
        self.after = None
        self.timeout = None
        self.label = None

    def _options(self) -> dict:
        """The scheduler flags, as the native client takes them."""
        return {
            "after": as_dependency(self.after),
            "follow": as_dependency(getattr(self, "follow", None)),
            "retries": getattr(self, "retries", 0),
            "timeout": self.timeout,
            "label": self.label,
        }

    def set_flags(self, **kwargs) -> None:
        """Sets flags for calls on this view: ``block``, ``after`` (jobs to wait for),
        ``timeout`` (seconds a task may take once it could start) and ``label`` (the last three
        for ``apply``, ``map`` and ``execute``); ``targets`` on a DirectView; ``chunksize``,
        ``ordered``, ``follow`` (run where these jobs ran) and ``retries`` on a
        LoadBalancedView."""
        for k, v in kwargs.items():
            if k not in self._flag_names:
                raise KeyError(
                    f"{type(self).__name__} has no flag {k!r}; its flags are {', '.join(self._flag_names)}"
                )
            setattr(self, k, v)

    @contextlib.contextmanager
    def temp_flags(self, **kwargs):
        """Flags for the calls inside a ``with`` block only."""
        saved = {k: getattr(self, k) for k in kwargs if k in self._flag_names}
        self.set_flags(**kwargs)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(self, k, v)

    def _apply(self, f, args, kwargs, wait=False):
        native, single = self._apply_native(f, args, kwargs, wait)
        return AsyncResult(self.client, native, fname=_name(f), single=single)

    def _blocks(self, block) -> bool:
        """Whether a call blocks. One that does passes ``wait`` to the native call, which then
        submits and waits for the job's end in one go; ``get()`` finds it ended."""
        return bool(self.block if block is None else block)

    @staticmethod
    def _finish(ar: AsyncResult, block: bool):
        return ar.get() if block else ar

    def _apply_and_finish(self, f, args, kwargs, block):
        block = self._blocks(block)
        return self._finish(self._apply(f, args, kwargs, wait=block), block)

    def apply(self, f, *args, **kwargs):
        """``f(*args, **kwargs)``: the result if ``block``, else an AsyncResult."""
        return self._apply_and_finish(f, args, kwargs, None)

    def apply_sync(self, f, *args, **kwargs):
        # The job has ended when the native call returns: its values are taken at once, with
        # no AsyncResult (a Future) made only to be dropped; the job still joins the history.
        native, single = self._apply_native(f, args, kwargs, wait=True)
        self.client.history.append(native.job)
        if not native.ready():
            native.wait(None)  # the connection was lost: this raises, naming the job
        return collect(native, single)

    def apply_async(self, f, *args, **kwargs):
        return self._apply(f, args, kwargs)

    def map(self, f, *sequences, block=None, **kwargs):
        """``f`` over the sequences' items (several sequences: ``f(a[i], b[i])``). With
        ``return_exceptions=True`` a failed item's RemoteError takes its place in the results
        instead of being raised."""
        block = self._blocks(block)
        return self._finish(self._map(f, sequences, wait=block, **kwargs), block)

    def map_sync(self, f, *sequences, **kwargs):
        return self._map(f, sequences, wait=True, **kwargs).get()

    def map_async(self, f, *sequences, **kwargs):
        return self._map(f, sequences, **kwargs)

    def imap(self, f, *sequences, **kwargs):
        """Like ``map``, yielding results as they arrive."""
        return iter(self._map(f, sequences, **kwargs))

    def _submit_map(self, f, sequences, wait, shown, **where):
        """Submits a map of ``f`` over the sequences (``where``: balanced and its targets or
        chunksize, as the native call takes them); its AsyncMapResult gets ``shown``."""
        items, star = self._items(sequences)
        native = self.client._native.map(
            _serialize.pack_func(f), items, star=star, options=self._options(), wait=wait, **where
        )
        return AsyncMapResult(self.client, native, fname=_name(f), **shown)

    def _items(self, sequences):
        if not sequences:
            raise TypeError("map needs at least one sequence")
        if len(sequences) == 1:
            return [_serialize.pack(x, "a map item") for x in sequences[0]], False
        rows = list(zip(*sequences))
        return [_serialize.pack(row, "a map item") for row in rows], True

    def remote(self, block=None):
        """A decorator: calling the function runs it remotely, like ``apply``."""

        def wrap(f):
            @functools.wraps(f)
            def call(*args, **kwargs):
                return self._apply_and_finish(f, args, kwargs, block)

            return call

        return wrap

    def parallel(self, dist: str = "b", block=None):
        """A decorator, as ipyparallel's: ``f(seq)`` (or ``f(seq_a, seq_b, ...)``) cuts the
        sequences into contiguous parts (one per engine on a DirectView, ``chunksize`` items
        each on a LoadBalancedView, 1 by default), calls ``f`` on each part (with its part of
        each sequence) and concatenates the results; ``f.map(seq)`` maps ``f`` over the
        items. With ``block=False`` a call returns an AsyncMapResult."""
        if dist != "b":
            raise ValueError("only dist='b' (contiguous parts) is supported")
        return lambda f: ParallelFunction(self, f, block)


class DirectView(View):
    """Work on a fixed set of engines: ``targets`` is ``'all'``, an id or a list of ids."""

    _flag_names = ("block", "track", "targets", "after", "timeout", "label")

    def __init__(self, client, targets="all", *, block: bool = False):
        super().__init__(client, block=block)
        self.targets = targets

    def __repr__(self) -> str:
        return f"<DirectView {self.targets!r}>"

    def __len__(self) -> int:
        return len(self._ids())

    def _native_targets(self):
        t = self.targets
        if t is None or t == "all":
            return None
        if isinstance(t, int):
            return [t]
        return list(t)

    def _ids(self):
        t = self._native_targets()
        return self.client.ids if t is None else t

    @property
    def _single(self) -> bool:
        return isinstance(self.targets, int)

    def _apply_native(self, f, args, kwargs, wait):
        func = _serialize.pack_func(f, args, kwargs)
        native = self.client._native.apply(
            func, [], targets=self._native_targets(), options=self._options(), wait=wait
        )
        return native, self._single

    def _map(self, f, sequences, wait=False, reshape=None, return_exceptions=False, **kwargs):
        if kwargs:
            raise TypeError(
                f"DirectView.map takes no {', '.join(kwargs)}; a LoadBalancedView takes chunksize and ordered"
            )
        return self._submit_map(
            f,
            sequences,
            wait,
            dict(reshape=reshape, return_exceptions=return_exceptions),
            balanced=False,
            targets=self._native_targets(),
        )

    def activate(self, suffix: str = "") -> None:
        """Points ``%px``, ``%%px``, ``%pxresult``, ``%pxconfig`` and ``%autopx`` at this view's
        engines (with its ``block`` flag) — or, with a suffix, magics of their own:
        ``rc[::2].activate('_even')`` makes ``%px_even`` and the rest, as in ipyparallel."""
        from IPython import get_ipython

        ip = get_ipython()
        if ip is None:
            raise RuntimeError("the magics work inside IPython or Jupyter only")
        from .magics import activate

        activate(ip, self, suffix)

    def _on(self, targets):
        """This view, or one like it on other engines: the ``targets=`` of a single call."""
        if targets is None:
            return self
        view = copy.copy(self)
        view.targets = self.client.direct_view(targets).targets
        return view

    def execute(self, code: str, silent: bool = True, targets=None, block=None):
        """Runs Python code on each engine, in that engine's namespace (what ``%px`` does).
        Each task's result is the value of a final expression (or None). Returns the
        AsyncResult, as ipyparallel does; with ``block``, once the code has run (raising what
        it raised)."""
        if targets is not None:
            return self._on(targets).execute(code, silent, block=block)
        block = self._blocks(block)
        native = self.client._native.execute(
            self._native_targets(), code, self._options(), wait=block
        )
        ar = AsyncResult(self.client, native, fname="execute", single=self._single)
        if block:
            ar.get()
        return ar

    def run(self, filename: str, targets=None, block=None):
        """Runs a local Python file's code on each engine; returns the AsyncResult."""
        with open(filename, encoding="utf-8") as f:
            code = f.read()
        return self.execute(code, targets=targets, block=block)

    def push(self, ns: dict, targets=None, block=None, track=None):
        """Sets names in each engine's namespace from a dict."""
        if targets is not None:
            return self._on(targets).push(ns, block=block)
        if not isinstance(ns, dict):
            raise TypeError(f"push takes a dict of names to values, not {type(ns).__name__}")
        values = [(k, _serialize.pack(v, f"the value of {k!r}")) for k, v in ns.items()]
        block = self._blocks(block)
        native = self.client._native.push(self._native_targets(), values, wait=block)
        return self._finish(
            AsyncResult(self.client, native, fname="push", single=self._single), block
        )

    def pull(self, names, targets=None, block=None):
        """Each engine's value of a name (or a list of values for a list of names)."""
        if targets is not None:
            return self._on(targets).pull(names, block=block)
        several = not isinstance(names, str)
        wanted = list(names) if several else [names]
        reshape = None
        if several and len(wanted) == 1:
            # A list of one name: a list of values, as for several names.
            reshape = (lambda vs: [vs[0]]) if self._single else (lambda vs: [[v] for v in vs])
        block = self._blocks(block)
        return self._finish(self._pull(wanted, "pull", reshape, block), block)

    def _pull(self, names, fname, reshape, wait):
        native = self.client._native.pull(self._native_targets(), names, wait=wait)
        return AsyncResult(self.client, native, fname=fname, single=self._single, reshape=reshape)

    def __setitem__(self, name, value):
        self.push({name: value}, block=True)

    def __getitem__(self, name):
        if isinstance(name, str):
            return self.pull(name, block=True)
        raise TypeError("view[...] takes a variable name; use client[...] to choose engines")

    def update(self, ns: dict):
        self.push(ns, block=True)

    get = __getitem__

    def scatter(self, key: str, seq, targets=None, block=None, track=None):
        """Splits ``seq`` into one contiguous part per engine and sets ``key`` to it there."""
        if targets is not None:
            return self._on(targets).scatter(key, seq, block=block)
        items = [_serialize.pack(x, "a scattered item") for x in seq]
        block = self._blocks(block)
        native = self.client._native.scatter(self._native_targets(), key, items, wait=block)
        return self._finish(AsyncResult(self.client, native, fname="scatter"), block)

    def gather(self, key: str, targets=None, block=None):
        """The parts of ``key`` on each engine, concatenated in engine order."""
        if targets is not None:
            return self._on(targets).gather(key, block=block)
        block = self._blocks(block)
        return self._finish(self._pull([key], "gather", _concatenated, block), block)

    def clear(self, targets=None, block=None):
        """Empties each engine's namespace; returns the AsyncResult (its values are None)."""
        # A statement, not an expression: nothing of the namespace comes back.
        return self.execute(
            "for _k in [k for k in globals() if not k.startswith('__')] + ['_k']:\n"
            "    globals().pop(_k, None)\n",
            targets=targets,
            block=block,
        )

    @contextlib.contextmanager
    def sync_imports(self, local: bool = True, quiet: bool = False):
        """Imports made inside the ``with`` block happen on the engines too::

        with view.sync_imports():
            import numpy
        """
        done = []
        real = builtins.__import__
        caller = sys._getframe(2)

        def hooked(name, globals=None, locals=None, fromlist=(), level=0):
            if sys._getframe(1) is caller and level == 0:
                done.append((name, tuple(fromlist or ())))
            if local:
                return real(name, globals, locals, fromlist, level)
            return None

        builtins.__import__ = hooked
        try:
            yield
        finally:
            builtins.__import__ = real
        for name, fromlist in done:
            if fromlist:
                stmt = f"from {name} import {', '.join(fromlist)}"
            else:
                stmt = f"import {name}"
            if not quiet:
                print(
                    f"importing {', '.join(fromlist) + ' from ' if fromlist else ''}{name} on engine(s)"
                )
            self.execute(stmt, block=True)

    def _part_bounds(self, n: int) -> list:
        """Where ``@parallel`` cuts a sequence of ``n`` items: one contiguous part per engine
        (fewer if there are fewer items)."""
        k = len(self._ids())
        bounds, start = [], 0
        for i in range(min(k, n)):
            size = n // k + (1 if i < n % k else 0)
            bounds.append((start, start + size))
            start += size
        return bounds


class ParallelFunction:
    """What ``@view.parallel()`` makes: calling it runs the function on parts of its
    sequences (see ``View.parallel``); ``.map`` maps it over their items."""

    def __init__(self, view: View, f, block):
        self.view, self.f, self.block = view, f, block
        functools.update_wrapper(self, f)

    def __call__(self, *sequences):
        if not sequences:
            raise TypeError(f"{_name(self.f)} takes one or more sequences to split")
        seqs = [s if _sliceable(s) else list(s) for s in sequences]
        n = len(seqs[0])
        if any(len(s) != n for s in seqs):
            raise ValueError(
                f"the sequences passed to {_name(self.f)} differ in length: "
                f"{', '.join(str(len(s)) for s in seqs)}"
            )
        bounds = self.view._part_bounds(n)
        parts = [[s[a:b] for a, b in bounds] for s in seqs]
        block = self.view._blocks(self.block)
        ar = self.view._map(self.f, parts, wait=block, reshape=_joined)
        return ar.get() if block else ar

    def map(self, *sequences):
        return self.view.map(self.f, *sequences, block=self.block)


def _sliceable(seq) -> bool:
    """Whether ``seq[a:b]`` is a part of it (a list, tuple, range, string, NumPy array)."""
    return hasattr(seq, "__len__") and hasattr(seq, "__getitem__") and not isinstance(seq, dict)


def _joined(results):
    """What ``@parallel`` returns: the parts' results concatenated. A list or tuple adds its
    items, NumPy arrays are concatenated, anything else is one item."""
    np = sys.modules.get("numpy")
    if np is not None and results and all(isinstance(r, np.ndarray) for r in results):
        return np.concatenate(results)
    out = []
    for r in results:
        if isinstance(r, (list, tuple)):
            out.extend(r)
        else:
            out.append(r)
    return out


def _concatenated(parts):
    """A gather: the engines' parts, one after the other."""
    return [x for part in parts for x in part]


class LoadBalancedView(View):
    """Work wherever there is room: each ``apply`` on the first free engine, each ``map``
    split into chunks handed out as engines free up."""

    _flag_names = (
        "block",
        "track",
        "targets",
        "chunksize",
        "ordered",
        "after",
        "follow",
        "retries",
        "timeout",
        "label",
    )

    def __init__(self, client, targets=None, *, block: bool = False):
        super().__init__(client, block=block)
        self.targets = targets
        self.chunksize = None
        self.ordered = True
        self.follow = None
        self.retries = 0

    def __repr__(self) -> str:
        return (
            "<LoadBalancedView>" if self.targets is None else f"<LoadBalancedView {self.targets!r}>"
        )

    def _ids(self) -> list:
        """The engines it may use: its targets (as ``direct_view`` takes them), or all."""
        if self.targets is None or self.targets == "all":
            return self.client.ids
        return self.client.direct_view(self.targets)._ids()

    def _options(self) -> dict:
        # Its targets go as they are: the controller resolves them (no round trip per call).
        engines = None if self.targets is None or self.targets == "all" else self.targets
        return {**super()._options(), "engines": engines}

    def _apply_native(self, f, args, kwargs, wait):
        native = self.client._native.apply(
            _serialize.pack_func(f, args, kwargs),
            [],
            balanced=True,
            options=self._options(),
            wait=wait,
        )
        return native, True

    def _map(
        self,
        f,
        sequences,
        wait=False,
        reshape=None,
        return_exceptions=False,
        chunksize=None,
        ordered=None,
    ):
        ordered = self.ordered if ordered is None else ordered
        return self._submit_map(
            f,
            sequences,
            wait,
            dict(ordered=ordered, reshape=reshape, return_exceptions=return_exceptions),
            balanced=True,
            chunksize=self.chunksize if chunksize is None else chunksize,
        )

    def _part_bounds(self, n: int) -> list:
        """Where ``@parallel`` cuts a sequence of ``n`` items: ``chunksize`` items a part."""
        c = max(1, self.chunksize or 1)
        return [(i, min(i + c, n)) for i in range(0, n, c)]

    def imap(self, f, *sequences, ordered=True, max_outstanding="auto", return_exceptions=False):
        """Like ``map``, but lazy, as ipyparallel's: items are taken from the sequences (which
        may be endless generators) only as results come back, at most ``max_outstanding``
        in flight (``'auto'``: two per engine); results are yielded in item order, or as they
        complete with ``ordered=False``. With ``return_exceptions`` a failed item yields its
        RemoteError instead of raising it."""
        if not sequences:
            raise TypeError("imap needs at least one sequence")
        if max_outstanding == "auto":
            max_outstanding = 2 * max(1, len(self._ids()))
        if not isinstance(max_outstanding, int) or max_outstanding < 1:
            raise ValueError(
                f"max_outstanding must be 'auto' or an int >= 1, not {max_outstanding!r}"
            )
        rows = zip(*sequences) if len(sequences) > 1 else ((x,) for x in sequences[0])
        return self._imap(f, rows, ordered, max_outstanding, return_exceptions)

    def _imap(self, f, rows, ordered, max_outstanding, return_exceptions):
        in_flight = collections.deque()

        def fill():
            for args in itertools.islice(rows, max_outstanding - len(in_flight)):
                in_flight.append(self._apply(f, args, {}))

        def value(ar):
            try:
                return ar.get()
            except RemoteError as e:
                if return_exceptions:
                    return e
                raise

        fill()
        while in_flight:
            if ordered:
                ar = in_flight.popleft()
                ar.wait()
            else:
                done, _ = concurrent.futures.wait(
                    in_flight, return_when=concurrent.futures.FIRST_COMPLETED
                )
                ar = next(a for a in in_flight if a in done)
                in_flight.remove(ar)
            fill()
            yield value(ar)

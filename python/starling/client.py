"""``Client``: a connection to a starling cluster, as ipyparallel's ``Client`` is to its hub."""

from __future__ import annotations

import builtins
import datetime
import json
import os
import signal
import time
import weakref

from . import _starling
from .asyncresult import AsyncMapResult, AsyncResult
from .error import TimeoutError
from .view import DirectView, LoadBalancedView


class Client:
    """Connects to a cluster: ``Client()`` (the only cluster there is, or ``STARLING_CLUSTER``),
    ``Client("path/to/connection.json")`` or ``Client(cluster="science")``.

    ``rc.ids``, ``rc[:]`` (a DirectView on every engine), ``rc[0]``, ``rc[::2]``,
    ``rc[[0, 2]]``, ``rc.load_balanced_view()``; ``with Client() as rc:`` closes it after."""

    def __init__(
        self, url_file=None, *, cluster: str | None = None, timeout: float = 30, **_ignored
    ):
        if url_file is not None:
            url_file = os.fspath(os.path.expanduser(os.fspath(url_file)))
        self._native = _starling.connect(url_file, cluster, timeout)
        self._pid = os.getpid()
        self._results = weakref.WeakValueDictionary()
        self.history = []
        self._closed = False
        _register_magics(self)

    # ---- engines ------------------------------------------------------------------------

    @property
    def ids(self) -> list:
        """The registered engine ids, ascending."""
        return self._native.ids()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key) -> DirectView:
        if isinstance(key, slice) and key == slice(None):
            return self.direct_view("all")
        return self.direct_view(key)

    def __iter__(self):
        for i in self.ids:
            yield self.direct_view(i)

    def direct_view(self, targets="all") -> DirectView:
        """A view on ``targets``: ``'all'`` (every engine, also ones that join later), an id
        (negative ones count from the end), a list of ids, or a slice of the ids."""
        if isinstance(targets, slice):
            targets = self.ids[targets]
        if isinstance(targets, int):
            ids = self.ids
            if targets not in ids:
                if -len(ids) <= targets < 0:
                    targets = ids[targets]
                else:
                    raise IndexError(f"there is no engine {targets}; the engines are {ids}")
        elif targets != "all" and targets is not None:
            targets = list(targets)
            ids = self.ids
            missing = [t for t in targets if t not in ids]
            if missing:
                raise IndexError(f"there is no engine {missing[0]}; the engines are {ids}")
            if not targets:
                raise IndexError("the targets select no engine")
        return DirectView(self, "all" if targets is None else targets)

    def activate(self, targets="all", suffix: str = "") -> DirectView:
        """Points the magics (``%px``, ... or, with a suffix, ``%px{suffix}``, ...) at a
        blocking view on ``targets``; returns that view."""
        view = self.direct_view(targets)
        view.block = True
        view.activate(suffix)
        return view

    def load_balanced_view(self, targets=None) -> LoadBalancedView:
        """A view that sends each task to whichever engine is free first: of all of them, or
        of ``targets`` (as ``direct_view`` takes them; the controller keeps its work there)."""
        return LoadBalancedView(self, targets)

    def wait_for_engines(self, n: int, timeout: float = -1, block: bool = True):
        """Waits until at least ``n`` engines are registered; raises ``TimeoutError`` after
        ``timeout`` seconds."""
        try:
            return self._native.wait_for_engines(
                n, None if timeout is None or timeout < 0 else timeout
            )
        except builtins.TimeoutError as e:
            raise TimeoutError(str(e)) from None

    # ---- jobs ---------------------------------------------------------------------------

    def _track(self, ar: AsyncResult) -> None:
        self._results[ar.job_id] = ar
        self.history.append(ar.job_id)

    @property
    def outstanding(self) -> set:
        """Ids of this client's jobs that are not finished."""
        return {j for j, ar in list(self._results.items()) if not ar.ready()}

    def wait(self, jobs=None, timeout: float = -1) -> bool:
        """Waits for jobs (AsyncResults or ids; default: every job of this client); returns
        whether all are done."""
        if jobs is None:
            pending = list(self._results.values())
        else:
            jobs = jobs if isinstance(jobs, (list, tuple, set)) else [jobs]
            pending = [j if isinstance(j, AsyncResult) else self.get_result(j) for j in jobs]
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        for ar in pending:
            left = -1 if deadline is None else max(0.0, deadline - time.monotonic())
            if not ar.wait(left):
                return False
        return True

    def get_result(self, job, block=None) -> AsyncResult:
        """Any job by id — also one submitted by the CLI or by another client."""
        if isinstance(job, AsyncResult):
            return job
        ar = self._results.get(job)
        if ar is None:
            native = self._native.result(int(job))
            cls = AsyncMapResult if native.kind == "map" else AsyncResult
            ar = cls(self, native)
        if block:
            ar.wait()
        return ar

    def abort(self, jobs=None, targets=None, block=None, interrupt: bool = False) -> None:
        """Drops the tasks of jobs (AsyncResults or ids; default: this client's unfinished
        ones) that have not started: they fail as ``TaskAborted``. With ``interrupt``, their
        running tasks are interrupted too."""
        if targets is not None:
            raise ValueError(
                "abort takes jobs; to stop what engines run, use send_signal(signal.SIGINT, targets)"
            )
        if jobs is None:
            jobs = self.outstanding
        elif not isinstance(jobs, (list, tuple, set)):
            jobs = [jobs]
        for j in jobs:
            self._native.abort(getattr(j, "job_id", j), interrupt)

    def send_signal(self, sig=signal.SIGINT, targets=None, block=None) -> list:
        """Interrupts what engines run (``SIGINT``: it raises ``KeyboardInterrupt`` there);
        returns the engines signalled."""
        if sig not in (signal.SIGINT, "SIGINT", int(signal.SIGINT)):
            raise ValueError("engines take SIGINT only; `starling down` stops a cluster")
        if targets is None or targets == "all":
            native_targets = None
        elif isinstance(targets, int):
            native_targets = [targets]
        else:
            native_targets = list(targets)
        return self._native.interrupt(native_targets)

    # ---- the task store -----------------------------------------------------------------

    def db_query(self, query: dict, keys=None, limit: int = 1000) -> list:
        """Jobs in the cluster's task store, newest first (ipyparallel's ``db_query``).

        ``query`` maps keys to values or to ``{operator: value}`` with ``$lt``, ``$lte``,
        ``$gt``, ``$gte``, ``$eq``, ``$ne``, ``$in``, ``$nin`` and ``$exists``; datetimes may
        stand for times. The keys: ``job``, ``submitted``, ``completed``, ``submitter``,
        ``kind``, ``label``, ``status``, ``error``, ``items``, ``retries``, ``timeout``,
        ``engine`` (jobs that ran a task there), ``attempts``, ``spec``. ``keys`` chooses the
        keys of each returned record (all by default; ``job`` always)."""
        if not isinstance(query, dict):
            raise TypeError(f"a query is a dict, not {type(query).__name__}")
        records = json.loads(self._native.history(json.dumps(_micros(query)), int(limit)))
        out = []
        for r in records:
            for k in ("submitted", "completed"):
                if r.get(k) is not None:
                    r[k] = datetime.datetime.fromtimestamp(r[k] / 1e6, datetime.timezone.utc)
            if keys is not None:
                r = {k: r[k] for k in ["job", *keys] if k in r}
            out.append(r)
        return out

    def hub_history(self) -> list:
        """Every job id in the task store, oldest first."""
        return sorted(r["job"] for r in self.db_query({}, keys=[], limit=2**31))

    def resubmit(self, jobs, block=None):
        """Submits a job from the store again, as a new job; its AsyncResult."""
        if isinstance(jobs, (list, tuple)):
            return [self.resubmit(j, block=block) for j in jobs]
        native = self._native.resubmit(getattr(jobs, "job_id", jobs))
        cls = AsyncMapResult if native.kind == "map" else AsyncResult
        ar = cls(self, native)
        if block:
            ar.wait()
        return ar

    def purge_results(self, jobs="all", targets=None, before=None) -> int:
        """Deletes finished jobs from the task store: ``'all'``, a list of jobs, or those
        submitted ``before`` a datetime. Returns how many."""
        if targets is not None:
            raise ValueError("purge_results takes jobs or before=, not targets")
        query = {}
        if jobs != "all":
            jobs = jobs if isinstance(jobs, (list, tuple, set)) else [jobs]
            query["job"] = {"$in": [getattr(j, "job_id", j) for j in jobs]}
        if before is not None:
            query["submitted"] = {"$lt": before}
        return self._native.purge(json.dumps(_micros(query)))

    # ---- life ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    @property
    def cluster(self) -> str:
        """The cluster's name."""
        return self._native.cluster

    @property
    def connection_file(self) -> str:
        return os.fspath(self._native.connection_file)

    def shutdown(self, hub: bool = True, block=None) -> None:
        """Stops the cluster's engines and controller (``starling down`` also removes its files)."""
        self._native.shutdown()

    def close(self) -> None:
        """Closes the connection; jobs already submitted keep running on the cluster."""
        self._closed = True
        self._native = _Closed()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return "<Client (closed)>"
        return f"<Client cluster={self.cluster!r}: {len(self.ids)} engines>"


def _micros(v):
    """A query with datetimes turned into the store's microseconds since the epoch."""
    if isinstance(v, datetime.datetime):
        if v.tzinfo is None:
            v = v.astimezone()
        return int(v.timestamp() * 1e6)
    if isinstance(v, dict):
        return {k: _micros(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_micros(x) for x in v]
    return v


class _Closed:
    def __getattr__(self, name):
        raise RuntimeError("this Client is closed; create a new one")


def _register_magics(client: Client) -> None:
    """Inside IPython, a new Client makes %px and friends use its engines."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    ip = get_ipython()
    if ip is None:
        return
    from . import magics

    magics.register(ip, client)

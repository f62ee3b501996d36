"""``AsyncResult``: a job in flight or done, as in ipyparallel.

It is a ``concurrent.futures.Future``: ``add_done_callback`` and ``asyncio.wrap_future`` work,
and ``result()`` is ``get()``. The native result underneath is filled by the Rust client as
results arrive; waiting releases the GIL and Ctrl-C interrupts it.
"""

from __future__ import annotations

import datetime
import sys
import threading
import time
from concurrent.futures import Future

from . import _serialize
from .error import CompositeError, RemoteError, TimeoutError

_UNSET = object()

# What ``AsyncResult.metadata`` tells of each task.
_METADATA = (
    "engine_id",
    "submitted",
    "started",
    "completed",
    "status",
    "execution_count",
    "attempts",
    "stdout",
    "stderr",
)


def _when(seconds):
    """A time in seconds since the epoch as ipyparallel gives it: a datetime in UTC."""
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


def _timeout(timeout):
    return None if timeout is None or timeout < 0 else float(timeout)


def collect(native, single: bool, reshape=None, return_exceptions=False):
    """What a finished job gives: its values (one, if ``single``), or its errors raised; with
    ``return_exceptions``, a failed task's (or item's) RemoteError in place of its value."""
    values, errors = [], []
    for slot in native.slots():
        if slot is None:
            job = native.job
            raise RemoteError(
                "Disconnected",
                f"the connection to the controller was lost (or the client closed) before job "
                f"{job} finished; the job is in the cluster's task store: rc.get_result({job}) "
                "waits for it; if the controller is down, `starling restart` starts it again",
            )
        ok, payload, engine = slot
        if ok:
            values.append(payload)
        else:
            errors.append(RemoteError(*payload, engine_id=engine))
            values.append(errors[-1])
    if errors and not return_exceptions:
        if single and len(errors) == 1:
            raise errors[0]
        n = len(errors)
        per_item = native.kind == "map"
        raise CompositeError(
            f"one or more exceptions raised in {n} {'item' if per_item else 'task'}{'s' if n > 1 else ''}",
            errors,
        )
    out = [v if isinstance(v, RemoteError) else _serialize.unpack(v) for v in values]
    if reshape is not None:
        return reshape(out)
    return out[0] if single else out


class AsyncResult(Future):
    """A submitted job: ``ready()``, ``wait()``, ``get()``, timings, outputs and metadata.

    ``single`` results (``apply`` on one engine, a load-balanced ``apply``) are one value;
    otherwise ``get()`` returns a list: one entry per engine for direct work, one per item for
    maps."""

    def __init__(
        self,
        client,
        native,
        *,
        fname: str | None = None,
        single: bool = False,
        ordered: bool = True,
        reshape=None,
        return_exceptions: bool = False,
    ):
        # Set before Future.__init__, whose `self._waiters = []` goes through the property.
        self._settled = False
        self._watching = False
        super().__init__()
        self._client = client
        self._native = native
        self._fname = fname or native.kind
        self._single = single
        self._ordered = ordered
        # What get() makes of the list of values, if not that list (or its one value when
        # `single`): a gather concatenates the engines' parts.
        self._reshape = reshape
        self._return_exceptions = return_exceptions
        self._lock = threading.Lock()
        client._track(self)

    # ---- the Future -----------------------------------------------------------------------
    #
    # A Future is told of its end by a background thread only when someone listens for it:
    # a done callback (asyncio.wrap_future adds one), or a waiter that
    # concurrent.futures.wait / as_completed put in `_waiters`. Blocking calls settle the
    # Future themselves, so a plain `get()` costs no thread and no fight for the GIL.

    def _watch(self):
        if not self._watching and not self._settled:
            self._watching = True
            self._native.on_done(self._settle)

    @property
    def _waiters(self):
        self._watch()
        return self._waiter_list

    @_waiters.setter
    def _waiters(self, waiters):
        self._waiter_list = waiters

    def add_done_callback(self, fn):
        self._watch()
        super().add_done_callback(fn)

    def done(self) -> bool:
        if not self._settled and self._native.ended():
            self._settle()
        return super().done()

    def cancel(self) -> bool:
        """A job on the cluster is not cancelled as a Future is: ``abort()`` drops its tasks
        that have not started. Like a running Future, this returns False."""
        return False

    # ---- identity -----------------------------------------------------------------------

    @property
    def job_id(self) -> int:
        """The job's id: ``Client.get_result(job_id)`` or ``starling result JOB`` finds it."""
        return self._native.job

    msg_ids = property(lambda self: [self.job_id])

    def abort(self, interrupt: bool = False) -> None:
        """Drops this job's tasks that have not started (they fail as ``TaskAborted``); with
        ``interrupt``, its running tasks are interrupted too. A finished job raises."""
        self._client._native.abort(self.job_id, interrupt)

    def __repr__(self) -> str:
        state = "finished" if self.ready() else "pending"
        return f"<{type(self).__name__}({self._fname}): {state}>"

    def __len__(self) -> int:
        return self._native.progress()[1]

    # ---- waiting ------------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether every task (or item) has finished."""
        return self._native.ready()

    def wait(self, timeout: float = -1) -> bool:
        """Waits at most ``timeout`` seconds (forever if negative); returns ``ready()``."""
        return self._native.wait(_timeout(timeout))

    def get(self, timeout: float = -1):
        """The results, once ready; raises ``TimeoutError`` if not ready within ``timeout``
        seconds, and ``RemoteError`` / ``CompositeError`` if tasks raised."""
        if not self.wait(timeout):
            raise TimeoutError(f"result of job {self.job_id} not ready after {timeout} s")
        self._settle()
        return super().result()

    def result(self, timeout=None):
        return self.get(-1 if timeout is None else timeout)

    def exception(self, timeout=None):
        if not self.wait(-1 if timeout is None else timeout):
            raise TimeoutError(f"result of job {self.job_id} not ready after {timeout} s")
        self._settle()
        return super().exception()

    def successful(self) -> bool:
        """Whether every task succeeded; the job must be finished."""
        if not self.ready():
            raise ValueError(f"job {self.job_id} is not finished yet")
        return all(s is not None and s[0] for s in self._native.slots())

    def _settle(self):
        with self._lock:
            if self._settled or super().done():
                return
            self._settled = True
        try:
            value = self._collect()
        except BaseException as e:  # noqa: BLE001 - the future carries any failure
            self.set_exception(e)
        else:
            self.set_result(value)

    def _collect(self):
        return collect(self._native, self._single, self._reshape, self._return_exceptions)

    def get_dict(self, timeout: float = -1) -> dict:
        """``{engine_id: result}`` for work that ran once per engine."""
        results = self.get(timeout)
        engines = self.engine_ids
        if self._single:
            results = [results]
        if len(set(engines)) != len(engines) or len(engines) != len(results):
            raise ValueError(
                "get_dict needs one result per engine; this job's results are per item"
            )
        return dict(zip(engines, results))

    # ---- iteration ----------------------------------------------------------------------

    def __iter__(self):
        """Results as they arrive: in order (the default), or as they complete for an
        unordered map; raises the first remote error met."""
        total = len(self)
        if self._single and total == 1:
            yield self.get()
            return
        for i in range(total):
            index = self._wait_slot(i)
            ok, payload, engine = self._native.slot(index)
            if ok:
                yield _serialize.unpack(payload)
            elif self._return_exceptions:
                yield RemoteError(*payload, engine_id=engine)
            else:
                raise RemoteError(*payload, engine_id=engine)

    def _wait_slot(self, i: int) -> int:
        while True:
            if self._ordered:
                if self._native.slot(i) is not None:
                    return i
            else:
                order = self._native.completion_order()
                if i < len(order):
                    return order[i]
            done = self._native.progress()[0]
            self._native.wait_count(done + 1, None)

    # ---- timings and progress -----------------------------------------------------------

    @property
    def progress(self) -> int:
        """How many tasks (or items) have finished."""
        return self._native.progress()[0]

    @property
    def elapsed(self) -> float:
        """Seconds from submission to the last result (or to now, while running)."""
        return self._native.elapsed()

    @property
    def wall_time(self) -> float:
        """Seconds from submission to the last result; the job must be finished."""
        if not self.ready():
            raise ValueError(
                f"job {self.job_id} is not finished yet; `elapsed` tells the time so far"
            )
        return self._native.elapsed()

    @property
    def serial_time(self) -> float:
        """Seconds the engines spent computing, summed: compare with ``elapsed``."""
        return self._native.serial_time()

    @property
    def sent(self) -> bool:
        return True

    # ---- outputs and metadata -----------------------------------------------------------

    def _tasks(self):
        return sorted(self._native.tasks(), key=lambda t: t["first"])

    @property
    def engine_ids(self) -> list:
        """The engine of each result, in result order."""
        return [s[2] if s is not None else None for s in self._native.slots()]

    @property
    def metadata(self):
        """Per task, as in ipyparallel: ``engine_id``, ``submitted``, ``started``,
        ``completed`` (datetimes, UTC), ``status`` (``'ok'``, ``'error'``), ``execution_count``,
        ``attempts``, ``stdout``, ``stderr``; a task not finished yet has None for what is not
        known. One dict for a single result, else a list: per engine for direct work, per
        finished chunk for a load-balanced map."""
        submitted = _when(self._native.submitted)

        def known(t):
            return {
                "engine_id": t["engine_id"],
                "submitted": submitted,
                "started": _when(t["started"]),
                "completed": _when(t["completed"]),
                "status": t["status"],
                "execution_count": t["execution_count"],
                "attempts": t["attempts"],
                "stdout": t["stdout"],
                "stderr": t["stderr"],
            }

        def pending(engine):
            return dict.fromkeys(_METADATA, None) | {"engine_id": engine, "submitted": submitted}

        tasks = self._tasks()
        engines = self._native.engines
        if engines:
            by_slot = {t["first"]: t for t in tasks}
            out = [known(by_slot[i]) if i in by_slot else pending(e) for i, e in enumerate(engines)]
        else:
            out = [known(t) for t in tasks]
        if self._single:
            return out[0] if out else pending(None)
        return out

    def __getitem__(self, key):
        """As in ipyparallel: an int or a slice indexes the results (``get()``), a string
        names a metadata key (its value per task, for several)."""
        if isinstance(key, str):
            md = self.metadata
            return md[key] if isinstance(md, dict) else [m[key] for m in md]
        if not self.ready():
            raise TimeoutError(f"result of job {self.job_id} not ready; ar.get() waits for it")
        return self.get()[key]

    def __getattr__(self, name):
        # Metadata keys read as attributes (ar.engine_id, ar.started), as in ipyparallel.
        if name in _METADATA:
            return self[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def stdout(self):
        """What each task printed (one string for a single result)."""
        out = [t["stdout"] for t in self._tasks()]
        return out[0] if self._single and len(out) == 1 else out

    @property
    def stderr(self):
        out = [t["stderr"] for t in self._tasks()]
        return out[0] if self._single and len(out) == 1 else out

    @property
    def execution_count(self):
        out = [t["execution_count"] for t in self._tasks()]
        return out[0] if self._single and len(out) == 1 else out

    def display_outputs(self, groupby: str = "type", result_only: bool = False) -> None:
        """Prints each task's stdout, stderr, error and final value as ``%px`` does:
        grouped by ``type`` (all stdout, then stderr, errors, values) or by ``engine``; with
        ``result_only``, the final values alone."""
        show_outputs(self, groupby, ("out",) if result_only else _SHOWN)

    def wait_interactive(self, interval: float = 0.1, timeout: float = -1) -> None:
        """Waits with a progress bar: a widget-free bar in Jupyter, a line in a terminal."""
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        handle = None
        try:
            from IPython import get_ipython
            from IPython.display import display

            ip = get_ipython()
            if ip is not None and type(ip).__name__ == "ZMQInteractiveShell":
                handle = display(self._bar(), display_id=True)
        except ImportError:
            pass
        while not self.ready():
            if deadline is not None and time.monotonic() >= deadline:
                break
            self.wait(interval)
            if handle is not None:
                handle.update(self._bar())
            else:
                print("\r" + self._bar(), end="", file=sys.stderr, flush=True)
        if handle is not None:
            handle.update(self._bar())
        else:
            print("\r" + self._bar(), file=sys.stderr, flush=True)

    def _bar(self) -> str:
        done, total = self._native.progress()
        width = 30
        filled = width * done // total if total else width
        return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} tasks finished after {self.elapsed:4.0f} s"


# ---- showing outputs ------------------------------------------------------------------


def show_streamed(pieces, streamed: dict) -> None:
    """Prints output that running tasks wrote — ``(engine, task, stdout, stderr)`` pieces from
    ``native.streamed`` — and counts in ``streamed`` how much of each task's was shown."""
    for engine, task, out, err in pieces:
        _labelled(f"stdout:{engine}", out, sys.stdout)
        _labelled(f"stderr:{engine}", err, sys.stderr)
        o, e = streamed.get(task, (0, 0))
        streamed[task] = (o + len(out), e + len(err))
    if pieces:
        sys.stdout.flush()
        sys.stderr.flush()


def _labelled(label: str, text: str, file) -> None:
    text = text[:-1] if text.endswith("\n") else text
    if text:
        print(f"[{label}] {text}", file=file)


def _error_of(ar, task) -> RemoteError | None:
    slot = ar._native.slot(task["first"])
    if slot is None or slot[0]:
        return None
    return RemoteError(*slot[1], engine_id=slot[2])


_SHOWN = ("stdout", "stderr", "error", "out")


def show_task(ar, t, what=_SHOWN, skip=(0, 0)) -> None:
    """Prints one finished task's outputs as ``%px`` shows them: ``[stdout:0] ...``,
    ``[stderr:0] ...``, ``[0:error] ...`` with the remote traceback, ``Out[0:3]: ...``;
    ``skip``: how much of its stdout and stderr was shown already, while it ran."""
    engine = t["engine_id"]
    if "stdout" in what:
        _labelled(f"stdout:{engine}", t["stdout"][skip[0] :], sys.stdout)
    if "stderr" in what:
        _labelled(f"stderr:{engine}", t["stderr"][skip[1] :], sys.stderr)
    if "error" in what and t["status"] == "error":
        e = _error_of(ar, t)
        if e is not None:
            print(f"[{engine}:error] {e.ename}: {e.evalue}")
            tb = e.traceback.rstrip()
            if tb:
                print(tb)
    if "out" in what and t["display"] is not None:
        prompt = f"Out[{engine}:{t['execution_count']}]: "
        text = t["display"]
        print(prompt + ("\n" if "\n" in text else "") + text)
    sys.stdout.flush()
    sys.stderr.flush()


def _tasks_in_engine_order(ar) -> list:
    return sorted(ar._native.tasks(), key=lambda t: t["first"])


def show_outputs(ar, groupby: str = "engine", shown=_SHOWN, streamed=None) -> None:
    """Prints a finished job's outputs (those ``shown``): per engine (``engine``), or all
    stdout, then all stderr, errors and values (``type``/``order``). ``streamed``: per task id,
    how much of its stdout and stderr was shown while it ran (left out here)."""
    tasks = _tasks_in_engine_order(ar)
    streamed = streamed or {}
    if groupby == "engine":
        for t in tasks:
            show_task(ar, t, shown, streamed.get(t["task"], (0, 0)))
        return
    for what in shown:
        for t in tasks:
            show_task(ar, t, (what,), streamed.get(t["task"], (0, 0)))


class AsyncMapResult(AsyncResult):
    """A map's result: iterating yields item results as they arrive."""

"""The Python client on a real local cluster: every call compared with Python's own answer."""

import asyncio
import datetime
import itertools
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import run_python

import starling
from starling import CompositeError, Reference, RemoteError, SerializationError, TimeoutError


def square(x):
    return x * x


def interactive(expr: str):
    """A function as if typed in a notebook: defined in `__main__`, so its global names
    resolve in each engine's namespace."""
    ns = {"__name__": "__main__"}
    exec(f"f = {expr}", ns)
    return ns["f"]


def add(a, b=10):
    return a + b


# ---- the client and its views ----------------------------------------------------------


def test_ids_and_views(rc):
    assert rc.ids == [0, 1]
    assert len(rc) == 2
    assert rc.cluster == "pytest"
    assert rc[:].targets == "all"
    assert rc[0].targets == 0
    assert rc[-1].targets == 1
    assert rc[::2].targets == [0]
    assert rc[[0, 1]].targets == [0, 1]
    assert len(rc[:]) == 2
    with pytest.raises(IndexError, match="there is no engine 7; the engines are \\[0, 1\\]"):
        rc[7]
    assert "pytest" in repr(rc) and "2 engines" in repr(rc)


def test_connect_by_path_and_as_context_manager(cluster):
    with starling.Client(cluster.connection_file) as c:
        assert c.ids == [0, 1]
    with pytest.raises(RuntimeError, match="closed"):
        _ = c.ids
    with pytest.raises(RuntimeError, match="there is no cluster 'nosuch'"):
        starling.Client(cluster="nosuch")


def test_wait_for_engines(rc):
    assert rc.wait_for_engines(2, timeout=5) == [0, 1]
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        rc.wait_for_engines(5, timeout=0.3)
    assert time.monotonic() - t0 < 5


# ---- apply ------------------------------------------------------------------------------


def test_apply_everywhere_and_on_one(rc):
    assert rc[:].apply_sync(lambda: 6 * 7) == [42, 42]
    assert rc[1].apply_sync(add, 1) == 11
    assert rc[0].apply_sync(add, 1, b=2) == 3
    pids = rc[:].apply_sync(os.getpid)
    assert len(set(pids)) == 2 and os.getpid() not in pids
    ar = rc[:].apply_async(square, 9)
    assert isinstance(ar, starling.AsyncResult)
    assert ar.get() == [81, 81]
    assert ar.get_dict() == {0: 81, 1: 81}


def test_closures_and_module_functions_travel_by_value(rc):
    k = 5

    def scale(x):
        return k * x

    assert rc[0].apply_sync(scale, 3) == 15
    # This test module is not importable on the engines: its functions travel by value.
    assert rc[:].apply_sync(square, 4) == [16, 16]


def test_load_balanced_apply(rc):
    lv = rc.load_balanced_view()
    assert lv.apply_sync(add, 2, b=3) == 5
    ar = lv.apply_async(square, 12)
    assert ar.get(timeout=30) == 144
    assert ar.metadata["engine_id"] in (0, 1)


def test_a_load_balanced_view_on_some_engines_keeps_to_them(rc):
    lv = rc.load_balanced_view(targets=[1])
    ar = lv.map_async(square, range(20), chunksize=1)
    assert ar.get() == [x * x for x in range(20)]
    assert set(ar.engine_ids) == {1}
    one = rc.load_balanced_view(targets=0).apply_async(square, 3)
    assert one.get() == 9 and one.engine_id == 0
    # As direct_view takes them: a negative id, a slice.
    for targets in (-1, slice(1, None)):
        last = rc.load_balanced_view(targets=targets).apply_async(square, 4)
        assert last.get() == 16 and last.engine_id == 1
    with pytest.raises(RuntimeError, match="there is no engine 5; the engines are"):
        rc.load_balanced_view(targets=5).apply_sync(square, 3)


def test_interactive_functions_resolve_globals_on_the_engines(rc):
    ns = {"__name__": "__main__"}
    exec("def total():\n    return int(np.sum(a))\n", ns)
    v = rc[:]
    v.execute("import numpy as np", block=True)
    v.push({"a": np.arange(6)}, block=True)
    assert v.apply_sync(ns["total"]) == [15, 15]
    # A name the engines lack comes with the function, as it was when sent.
    exec("offset = 100\ndef shifted(x):\n    return x + offset\n", ns)
    assert v.apply_sync(ns["shifted"], 1) == [101, 101]


def test_a_function_sent_again_is_pickled_again_only_when_it_changed():
    import pickle

    from starling import _serialize

    ns = {"__name__": "__main__"}
    exec("import math\nscale = 2\ndef f(x=1):\n    return math.floor(x * scale)\n", ns)
    f = ns["f"]
    first = _serialize.pack_func(f)
    assert _serialize.pack_func(f) is first, "unchanged: the same pickle"

    def result(packed):
        data, bufs, _ = packed
        return pickle.loads(data, buffers=bufs)()

    # Every part it is made of, changed, makes a new pickle with the change in it.
    ns["scale"] = 3
    assert result(_serialize.pack_func(f)) == 3
    f.__defaults__ = (5,)
    assert result(_serialize.pack_func(f)) == 15
    del ns["scale"]
    with pytest.raises(NameError):
        result(_serialize.pack_func(f))
    ns["scale"] = True
    assert result(_serialize.pack_func(f)) == 5
    f.__code__ = (lambda x=1: -x).__code__
    assert result(_serialize.pack_func(f)) == -5

    # What can change inside (a list, a closure, attributes, mutable defaults) is pickled anew
    # each time.
    exec("items = [1]\ndef g():\n    return len(items)\n", ns)
    g = ns["g"]
    assert _serialize.pack_func(g) is not _serialize.pack_func(g)
    ns["items"].append(2)
    assert result(_serialize.pack_func(g)) == 2
    for h in (interactive("lambda y=[]: y"), interactive("(lambda z: lambda: z)(1)")):
        assert _serialize.pack_func(h) is not _serialize.pack_func(h)
    f.attr = 1
    assert _serialize.pack_func(f) is not _serialize.pack_func(f)


def test_engines_run_a_function_sent_again_as_they_ran_it_first(rc):
    v = rc[:]
    appends = interactive("lambda y=[]: y.append(1) or len(y)")
    assert v.apply_sync(appends) == [1, 1]
    assert v.apply_sync(appends) == [1, 1], "a mutable default is fresh for every call"
    # A name the engines lack comes with the function each time it is sent, also after the
    # engines dropped it.
    ns = {"__name__": "__main__"}
    exec("brought = 41\ndef plus_one():\n    return brought + 1\n", ns)
    assert v.apply_sync(ns["plus_one"]) == [42, 42]
    v.execute("del brought", block=True)
    assert v.apply_sync(ns["plus_one"]) == [42, 42]
    # A name the engines have wins, as the first time.
    v.push({"brought": 1}, block=True)
    assert v.apply_sync(ns["plus_one"]) == [2, 2]


def test_reference_arguments(rc):
    rc[0]["ref_me"] = 7
    rc[1]["ref_me"] = 8
    assert rc[:].apply_sync(add, Reference("ref_me"), 1) == [8, 9]
    with pytest.raises(ValueError, match="names a variable"):
        Reference("not a name")


def test_block_flag_and_temp_flags(rc):
    v = rc[:]
    assert v.block is False
    assert isinstance(v.apply(square, 2), starling.AsyncResult)
    with v.temp_flags(block=True):
        assert v.apply(square, 2) == [4, 4]
    assert v.block is False
    v.set_flags(block=True, targets=[1])
    assert v.apply(square, 3) == [9]
    with pytest.raises(KeyError, match="no flag 'color'"):
        v.set_flags(color="red")


def test_remote_and_parallel_decorators(rc):
    v = rc[:]

    @v.remote(block=True)
    def where():
        import os

        return os.getpid()

    assert len(set(where())) == 2

    @v.parallel(block=True)
    def doubled(xs):
        return [2 * x for x in xs]

    assert doubled(range(7)) == [2 * x for x in range(7)]

    @v.parallel(block=True)
    def tripled(x):
        return 3 * x

    assert tripled.map(range(5)) == [3 * x for x in range(5)]

    # Not blocking: an AsyncMapResult whose get() joins the parts. Several sequences are cut
    # alike and their parts passed side by side; a NumPy array's parts are arrays.
    @v.parallel(block=False)
    def summed(xs, ys):
        return [x + y for x, y in zip(xs, ys)]

    ar = summed(range(5), range(10, 15))
    assert isinstance(ar, starling.AsyncMapResult)
    assert ar.get() == [x + y for x, y in zip(range(5), range(10, 15))]

    @v.parallel(block=True)
    def halved(a):
        assert isinstance(a, np.ndarray)
        return a / 2

    got = halved(np.arange(9.0))
    assert isinstance(got, np.ndarray) and got.tolist() == (np.arange(9.0) / 2).tolist()
    with pytest.raises(ValueError, match="differ in length: 2, 3"):
        summed([1, 2], [1, 2, 3])

    # On a load-balanced view, parts of `chunksize` items (1 by default).
    lv = rc.load_balanced_view()
    lv.chunksize = 3

    @lv.parallel(block=True)
    def sizes(xs):
        return [len(xs)]

    assert sizes(range(7)) == [3, 3, 1]


# ---- maps -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "f, items",
    [
        (square, range(100)),
        (lambda x: x + 0.5, range(50)),
        (str.upper, ["a", "bc", "ünï"]),
        (lambda t: (t, -t), range(10)),
        (lambda x: {"x": x}, range(5)),
        (math.sqrt, [0.0, 1.0, 2.0]),
        (lambda x: x, []),
        (lambda x: None, range(3)),
    ],
)
def test_maps_equal_pythons_own(rc, f, items):
    want = list(map(f, items))
    assert rc.load_balanced_view().map_sync(f, items) == want
    assert rc[:].map_sync(f, items) == want
    assert rc.load_balanced_view().map_sync(f, items, chunksize=1) == want


def test_map_of_many_items_and_several_sequences(rc):
    lv = rc.load_balanced_view()
    assert lv.map_sync(square, range(100_000)) == [x * x for x in range(100_000)]
    assert lv.map_sync(add, range(10), range(10, 20)) == [
        a + b for a, b in zip(range(10), range(10, 20))
    ]
    assert rc[:].map_sync(add, [1, 2, 3], [4, 5, 6]) == [5, 7, 9]


def test_imap_is_lazy_and_errors_can_be_returned(rc):
    lv = rc.load_balanced_view()
    taken = []

    def endless():
        for i in itertools.count():
            taken.append(i)
            yield i

    it = lv.imap(square, endless(), max_outstanding=3)
    assert [next(it) for _ in range(5)] == [0, 1, 4, 9, 16]
    # Items are taken as results come back: never more than 3 beyond those yielded.
    assert len(taken) <= 5 + 3, taken
    it.close()
    assert sorted(lv.imap(square, range(12), ordered=False)) == [x * x for x in range(12)]

    def inverse(x):
        return 1 / x

    got = list(lv.imap(inverse, [1, 0, 4], return_exceptions=True))
    assert got[0] == 1.0 and got[2] == 0.25
    assert isinstance(got[1], RemoteError) and got[1].ename == "ZeroDivisionError"
    with pytest.raises(RemoteError, match="ZeroDivisionError"):
        list(lv.imap(inverse, [1, 0, 4]))
    got = lv.map_sync(inverse, [2, 0], return_exceptions=True)
    assert got[0] == 0.5 and isinstance(got[1], RemoteError)
    got = rc[:].map_sync(inverse, [0, 5], return_exceptions=True)
    assert isinstance(got[0], RemoteError) and got[1] == 0.2


def test_unordered_iteration_and_imap(rc):
    lv = rc.load_balanced_view()
    ar = lv.map_async(square, range(40), ordered=False, chunksize=1)
    got = list(ar)
    assert sorted(got) == [x * x for x in range(40)]
    assert list(lv.imap(square, range(30))) == [x * x for x in range(30)]


def test_seed_sleep_map(rc):
    v = rc[:]
    with v.sync_imports(quiet=True):
        import time as _time  # noqa: F401

    def f(x):
        import time

        time.sleep(0.2)
        return x * x

    r = v.map(f, range(6))
    assert r.ready() is False
    assert r.get() == [x * x for x in range(6)]
    # 3 items per engine, 2 engines in parallel
    assert 0.55 < r.elapsed < 1.2, r.elapsed
    assert 1.1 < r.serial_time < 1.6, r.serial_time
    assert r.wall_time == r.elapsed


# ---- data ------------------------------------------------------------------------------


def test_push_pull_and_item_access(rc):
    v = rc[:]
    v.push({"a": 1, "b": [1, 2, 3], "t": (1, "x"), "s": {3, 4}}, block=True)
    assert v.pull("a", block=True) == [1, 1]
    assert v.pull(["a", "b"], block=True) == [[1, [1, 2, 3]], [1, [1, 2, 3]]]
    assert v.pull("t", block=True) == [(1, "x"), (1, "x")]
    assert v.pull("s", block=True) == [{3, 4}, {3, 4}]
    v["c"] = "hello"
    assert v["c"] == ["hello", "hello"]
    assert rc[1]["c"] == "hello"
    assert rc[1].pull(["b"], block=True) == [[1, 2, 3]]
    assert v.pull(["b"], block=True) == [[[1, 2, 3]], [[1, 2, 3]]]
    with pytest.raises(CompositeError) as e:
        v.pull("nosuchname", block=True)
    assert e.value.elist[0].ename == "NameError"


def test_numpy_round_trip(rc):
    a = np.arange(1_000_000, dtype=np.float64).reshape(1000, 1000)
    v = rc[:]
    v.push({"arr": a}, block=True)
    assert v.apply_sync(interactive("lambda: float(arr.sum())")) == [a.sum(), a.sum()]
    back = rc[0]["arr"]
    assert isinstance(back, np.ndarray) and back.dtype == np.float64 and back.shape == (1000, 1000)
    assert np.array_equal(back, a)
    back[0, 0] = -1.0  # a pulled array is writable
    rc[1]["again"] = back  # and travels again
    assert rc[1].apply_sync(interactive("lambda: float(again[0, 0])")) == -1.0
    del back
    assert rc[1].apply_sync(lambda x: x * 2, np.ones(3)).tolist() == [2.0, 2.0, 2.0]
    views = rc[:].apply_sync(lambda: np.arange(4)[::2])  # not contiguous: pickled in band
    assert [x.tolist() for x in views] == [[0, 2], [0, 2]]
    # A large pickle of its own (not out of band) comes back whole.
    big = rc[0].apply_sync(lambda: b"\x01" * (6 << 20))
    assert isinstance(big, bytes) and big == b"\x01" * (6 << 20)
    # The kernels' malloc puts large blocks on huge pages; what their tasks start sees the
    # environment as the engine had it.
    env = v.apply_sync(
        lambda: [
            "glibc.malloc.hugetlb=1" in open("/proc/self/environ").read(),
            os.environ.get("GLIBC_TUNABLES"),
            "STARLING_GLIBC_TUNABLES" in os.environ,
        ]
    )
    assert env == [[True, os.environ.get("GLIBC_TUNABLES"), False]] * 2


def test_scatter_and_gather(rc):
    v = rc[:]
    v.scatter("part", list(range(11)), block=True)
    assert v.apply_sync(interactive("lambda: len(part)")) == [6, 5]
    assert v.gather("part", block=True) == list(range(11))
    assert rc[1].gather("part", block=True) == list(range(6, 11))
    v.execute("part = [p * 2 for p in part]", block=True)
    assert v.gather("part", block=True) == [2 * x for x in range(11)]


def test_execute_run_and_clear(rc, tmp_path):
    v = rc[:]
    ar = v.execute("import os\nprint('pid', os.getpid())\n21 * 2", block=False)
    assert ar.get() == [42, 42]
    assert all(s.startswith("pid ") for s in ar.stdout)
    meta = ar.metadata
    assert {m["engine_id"] for m in meta} == {0, 1}
    assert all(m["status"] == "ok" and m["started"] <= m["completed"] for m in meta)
    # Blocking, execute returns its AsyncResult once the code has run, as in ipyparallel.
    done = v.execute("x = 5\nx * 2", block=True)
    assert isinstance(done, starling.AsyncResult) and done.ready()
    assert done.get() == [10, 10]
    assert v.execute("x + 1", targets=1, block=True).get() == 6
    script = tmp_path / "script.py"
    script.write_text("from_file = 'yes'\n")
    assert v.run(str(script), block=True).get() == [None, None]
    assert v["from_file"] == ["yes", "yes"]
    # clear() empties the namespaces and brings none of them back.
    v.push({"big": np.zeros(1000)}, block=True)
    assert v.clear(block=True).get() == [None, None]
    with pytest.raises(CompositeError):
        v.pull("from_file", block=True)
    left = "sorted(k for k in globals() if not k.startswith('__'))"
    assert v.execute(left, block=True).get() == [[], []]


def test_targets_of_one_call(rc):
    v = rc[:]
    v.push({"where": "here"}, targets=0, block=True)
    assert v.pull("where", targets=0, block=True) == "here"
    with pytest.raises(RemoteError, match="NameError"):
        v.pull("where", targets=1, block=True)
    v.scatter("part", list(range(6)), targets=[1], block=True)
    assert v.gather("part", targets=[1], block=True) == list(range(6))
    assert v.targets == "all"  # the view itself is unchanged
    v.set_flags(track=True)  # ipyparallel's flag is taken, and changes nothing
    v.push({"tracked": 1}, block=True)
    assert v["tracked"] == [1, 1]


def test_metadata_reads_as_ipyparallels(rc):
    ar = rc[:].apply_async(lambda: __import__("time").sleep(0.5) or 1)
    with pytest.raises(TimeoutError, match="not ready"):
        ar[0]
    pending = ar.metadata
    assert [m["engine_id"] for m in pending] == [0, 1]
    assert all(m["completed"] is None and m["status"] is None for m in pending)
    assert isinstance(pending[0]["submitted"], datetime.datetime)
    assert ar.get() == [1, 1]
    done = ar.metadata
    assert all(m["status"] == "ok" for m in done)
    assert all((m["completed"] - m["started"]).total_seconds() >= 0.5 for m in done)
    assert done[0]["submitted"].tzinfo is datetime.timezone.utc
    # Metadata keys read as attributes and items; ints and slices index the results.
    assert ar.engine_id == [0, 1] and ar["status"] == ["ok", "ok"]
    assert ar[0] == 1 and ar[:] == [1, 1]
    one = rc.load_balanced_view().apply_async(square, 3)
    assert isinstance(one.metadata, dict)
    assert one.get() == 9 and one.engine_id in (0, 1) and one.status == "ok"
    with pytest.raises(AttributeError):
        _ = one.no_such_key


def test_cli_and_python_share_one_namespace(rc, cli):
    cli("px", "shared_from_cli = 41")
    assert rc[:]["shared_from_cli"] == [41, 41]
    rc[:]["shared_from_py"] = {"k": [1, 2]}
    out = cli("pull", "shared_from_py").stdout
    assert "[0] shared_from_py = {'k': [1, 2]}" in out
    # A job submitted by the CLI, re-attached from Python.
    out = cli("px", "--noblock", "6 * 7").stdout
    job = int(re.search(r"job (\d+)", out).group(1))
    assert rc.get_result(job).get() == [42, 42]


# ---- results ---------------------------------------------------------------------------


def test_async_result_is_a_future(rc):
    ar = rc[:].apply_async(square, 3)
    seen = threading.Event()
    ar.add_done_callback(lambda fut: seen.set())
    assert ar.result() == [9, 9]
    assert seen.wait(10)
    assert ar.done() and ar.successful()
    assert not ar.cancel() and ar.result() == [9, 9], "a finished job stays finished"
    # A done-callback may itself wait for the cluster (it runs on a thread of the runtime's).
    called = []
    again = threading.Event()
    nested = rc[0].apply_async(square, 5)
    nested.add_done_callback(lambda fut: (called.append(rc[1].apply_sync(square, 6)), again.set()))
    assert again.wait(30) and called == [36] and nested.result() == 25
    # Unwatched until asked: done() alone settles a finished job.
    quiet = rc[:].apply_async(square, 4)
    deadline = time.monotonic() + 30
    while not quiet.done():
        assert time.monotonic() < deadline, "done() never turned true"
        time.sleep(0.01)
    assert quiet.result() == [16, 16]

    async def main():
        return await asyncio.wrap_future(rc.load_balanced_view().apply_async(square, 5))

    assert asyncio.run(main()) == 25


def test_timeouts_and_progress(rc):
    ar = rc[0].apply_async(lambda: __import__("time").sleep(0.5) or "slept")
    assert not ar.ready()
    with pytest.raises(TimeoutError):
        ar.get(timeout=0.05)
    assert ar.wait(30) is True
    assert ar.get() == "slept" and ar.progress == 1 and len(ar) == 1
    assert rc.wait([ar], timeout=1) is True
    assert ar.job_id in rc.history


def test_remote_errors(rc):
    with pytest.raises(RemoteError) as e:
        rc[0].apply_sync(lambda: 1 / 0)
    err = e.value
    assert (
        err.ename == "ZeroDivisionError" and err.evalue == "division by zero" and err.engine_id == 0
    )
    assert err.traceback.startswith("Traceback") and "in <lambda>" in err.traceback
    assert str(err) == "[Engine 0] ZeroDivisionError: division by zero"
    with pytest.raises(CompositeError) as e:
        rc[:].execute("raise ValueError('bad')", block=True)
    assert [x.engine_id for x in e.value.elist] == [0, 1]
    assert "ValueError" in str(e.value)

    def maybe(x):
        if x == 3:
            raise KeyError(x)
        return x

    ar = rc.load_balanced_view().map_async(maybe, range(6))
    with pytest.raises(CompositeError) as e:
        ar.get()
    assert [x.ename for x in e.value.elist] == ["KeyError"]
    assert not ar.successful()


def test_what_cannot_be_pickled_or_unpickled(rc):
    with pytest.raises(SerializationError, match="cannot be pickled"):
        rc[0].apply_sync(square, threading.Lock())
    # A class defined only on the engine: its instances cannot be unpickled here.
    rc[0].execute("class OnlyThere:\n    pass\nobj = OnlyThere()", block=True)
    with pytest.raises(SerializationError, match="cannot be unpickled here"):
        rc[0]["obj"]
    # The same value is still shown by its repr in the CLI's world: nothing else broke.
    assert rc[0].apply_sync(lambda: 1) == 1


def test_python_version_mismatch_is_named(rc):
    import cloudpickle

    func = (cloudpickle.dumps(lambda: 1), [], "2.7")
    ar = starling.AsyncResult(rc, rc._native.apply(func, [], targets=[0]), single=True)
    with pytest.raises(RemoteError) as e:
        ar.get()
    assert (
        "the client runs Python 2.7 and this engine Python {}.{}".format(*sys.version_info[:2])
        in e.value.evalue
    )


def test_engines_without_cloudpickle_say_what_to_install(tmp_path):
    # A venv of the same Python with nothing installed: kernels that lack cloudpickle.
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True
    )
    c = starling.Cluster(
        n=1, name="bare", python=str(tmp_path / "bare" / "bin" / "python"), shutdown_atexit=False
    )
    c.start()
    try:
        with starling.Client(cluster="bare") as r:
            assert r[0].execute("1 + 1", block=True).get() == 2  # code still runs
            with pytest.raises(RemoteError, match="lacks cloudpickle.*pip install cloudpickle"):
                r[0].apply_sync(lambda: 1)
    finally:
        c.stop()


# ---- behaving well inside Python ------------------------------------------------------


def test_waiting_releases_the_gil(rc):
    count = 0
    stop = threading.Event()

    def spin():
        nonlocal count
        while not stop.is_set():
            count += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        rc[0].apply_sync(lambda: __import__("time").sleep(0.5))
    finally:
        stop.set()
        t.join()
    assert count > 100_000, count


def test_a_call_that_waits_reads_its_own_reply_and_results_in_python_hands_still_arrive(cluster):
    # In a process of its own: which thread drives the client's runtime depends on what else
    # the process has in flight.
    code = f"""
import os, time, starling

def switches(name):
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{{task}}/comm") as f:
            if f.read().strip() != name:
                continue
        with open(f"/proc/self/task/{{task}}/status") as f:
            return sum(int(l.split()[1]) for l in f if l.split(":")[0].endswith("ctxt_switches"))
    raise SystemExit("no thread " + name)

def sockets():
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink("/proc/self/fd/" + fd).startswith("socket:")
        except OSError:  # the fd of the listing itself, gone by now
            pass
    return n

rc = starling.Client({cluster.connection_file!r})
assert rc[:].apply_sync(lambda: 1) == [1, 1]
before = switches("starling-client")
for i in range(200):
    assert rc[:].apply_sync(lambda x: x * x, i) == [i * i, i * i]
print("background thread woken", switches("starling-client") - before, "times in 200 calls")

ar = rc[0].apply_async(lambda: 7 * 7)
deadline = time.monotonic() + 30
while not ar.ready():
    assert time.monotonic() < deadline, "an AsyncResult nobody waits on never got its result"
    time.sleep(0.01)
print("unwaited", ar.get())

open_before = sockets()
other = starling.Client({cluster.connection_file!r})
assert other.ids == [0, 1] and sockets() == open_before + 1
in_flight = other[0].apply_async(time.sleep, 0.5)
other.close()
try:
    in_flight.get(timeout=30)
except RuntimeError as e:
    says = "this client was closed" in str(e) and f"rc.get_result({{in_flight.job_id}})" in str(e)
    print("closed midway, the error names the job:", says)
deadline = time.monotonic() + 30
while sockets() != open_before:
    assert time.monotonic() < deadline, "a closed client kept its connection"
    time.sleep(0.01)
before = switches("starling-client")
for i in range(50):
    assert rc[:].apply_sync(lambda x: x + 1, i) == [i + 1, i + 1]
print("then woken", switches("starling-client") - before, "times in 50 calls")
"""
    p = run_python(code, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    woken = int(lines[0].split()[3])
    # Each call waits in the runtime itself: the reply wakes the caller, not a second thread.
    assert woken < 20, lines[0]
    assert lines[1:3] == ["unwaited 49", "closed midway, the error names the job: True"]
    # Closing a client with a job in flight leaves nothing for the background thread to do.
    assert int(lines[3].split()[2]) < 10, lines[3]


def test_ctrl_c_interrupts_a_wait_and_leaves_the_client_usable(cluster, tmp_path):
    started = tmp_path / "started"
    code = f"""
import sys, time, starling
rc = starling.Client({cluster.connection_file!r})
print("ready", flush=True)

def task():
    open({str(started)!r}, "w").close()  # the engine runs it: the client is waiting
    time.sleep(3)

t0 = time.monotonic()
try:
    rc[0].apply_sync(task)
except KeyboardInterrupt:
    print("interrupted after %.2f s" % (time.monotonic() - t0), flush=True)
print("ids", rc.ids, flush=True)
"""
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout.readline().strip() == "ready"
        # The interrupt must land inside the wait: the task has started, so it was submitted.
        deadline = time.monotonic() + 30
        while not started.exists():
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.01)
        sent = time.monotonic()
        p.send_signal(signal.SIGINT)
        line = p.stdout.readline()
        took = time.monotonic() - sent
        assert line.startswith("interrupted"), line + p.stderr.read()
        assert took < 0.5, took
        assert p.stdout.readline().strip() == "ids [0, 1]"
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_forked_child_gets_a_clear_error(rc):
    assert rc.ids == [0, 1]  # the runtime exists
    pid = os.fork()
    if pid == 0:
        try:
            _ = rc.ids
        except RuntimeError as e:
            os._exit(0 if "forked" in str(e) else 2)
        except BaseException:  # noqa: BLE001
            os._exit(3)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_the_interpreter_exits_promptly_and_leaves_nothing(cluster):
    p = run_python(
        f"import starling\nrc = starling.Client({cluster.connection_file!r})\nprint(rc[:].apply_sync(lambda: 1))\n",
        timeout=30,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[1, 1]"


def test_cluster_from_python_leaves_nothing(_home):
    with starling.Cluster(n=1, name="ctx", shutdown_atexit=False) as c:
        assert c.ids == [0]
        assert c[:].apply_sync(lambda: "hi") == ["hi"]
        path = c.connection_file
        assert os.path.exists(path)
    assert not os.path.exists(path)
    assert not os.path.exists(os.path.join(_home, "clusters", "ctx", "local.json"))


def test_a_cluster_from_a_spec_and_the_only_cluster_found_by_client(tmp_path):
    spec = tmp_path / "science.yaml"
    spec.write_text(
        f"name: science\nprovider: local\nengines_per_node: 2\npython: {sys.executable}\n"
    )
    code = f"""
import starling
with starling.Cluster(spec={str(spec)!r}, shutdown_atexit=False) as rc:
    print(rc.ids, rc[:].apply_sync(lambda: 6 * 7))
    other = starling.Client()  # no argument: the only cluster there is
    print(other.cluster, other.ids)
    other.close()
try:
    starling.Client()
except Exception as e:  # noqa: BLE001
    print("after:", e)
"""
    home = tmp_path / "home"
    p = run_python(code, env={**os.environ, "STARLING_HOME": os.fspath(home)}, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[:2] == ["[0, 1] [42, 42]", "science [0, 1]"], p.stdout
    assert lines[2].startswith("after: ") and "starling up" in lines[2], lines[2]
    assert not (home / "clusters" / "science" / "local.json").exists()

    # A spec with a key it does not know is refused, naming the key and what to read.
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nprovider: local\nengines_per_nod: 2\n")
    with pytest.raises(ValueError, match="unknown field `engines_per_nod`.*spec reference"):
        starling.Cluster(spec=bad, shutdown_atexit=False).start()


def test_wait_and_wait_interactive(rc, capsys):
    assert rc.wait() is True  # nothing outstanding... or all of it done
    slow = rc[:].apply_async(lambda: __import__("time").sleep(0.5))
    assert rc.wait([slow], timeout=0.05) is False
    slow.wait_interactive(interval=0.05)
    assert slow.ready()
    bar = capsys.readouterr().err
    assert "2/2 tasks finished" in bar, bar
    assert rc.wait([slow], timeout=0) is True


def test_display_outputs_prints_as_px_does(rc, capsys):
    ar = rc[:].execute("print('hi')\n5", block=False)
    assert ar.get() == [5, 5]
    ar.display_outputs()
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["[stdout:0] hi", "[stdout:1] hi"]
    assert [line.split("]: ")[1] for line in out[2:]] == ["5", "5"]
    assert out[2].startswith("Out[0:") and out[3].startswith("Out[1:")
    ar.display_outputs(result_only=True)
    only = capsys.readouterr().out.splitlines()
    assert [line.split("]: ")[1] for line in only] == ["5", "5"]
    bad = rc[:].execute("1/0", block=False)
    bad.wait()
    bad.display_outputs(groupby="engine")
    text = capsys.readouterr().out
    assert "[0:error] ZeroDivisionError: division by zero" in text and "Traceback" in text

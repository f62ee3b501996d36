#!/usr/bin/env python3
"""The Python half of bench/compare.sh: the workloads of benches/throughput.rs through
ipyparallel, dask.distributed and multiprocessing, each on 2 workers on this machine.

    python bench/compare.py [--runs N] [multiprocessing] [ipyparallel] [dask]

With no framework named, all three run, one after the other. Each framework's block starts with
a line `# <framework> <version>`, then one line per workload, as the Rust benchmark prints them:

    name<TAB>count<TAB>seconds<TAB>per_second

`seconds` is the best of N runs (default 3), except `montecarlo`, which runs once as in
benches/throughput.rs; `per_second` is count / seconds (samples/s for montecarlo).

Workloads, with each framework's equivalent:

- lb_default: a load-balanced map of trivial items with the framework's default settings.
  ipyparallel `load_balanced_view().map_sync(f, xs)` (default chunksize 1) and dask
  `client.map(f, xs)` + `gather` run 10,000 items instead of 100,000: at one task per item a run
  takes tens of seconds; the rates are comparable. multiprocessing `pool.map(f, xs)` runs all
  100,000 with its default chunksize (len / (4 * processes), here 12,500).
- lb_chunk1: 10,000 tasks of one item: ipyparallel `map_sync(f, xs, chunksize=1)`, dask
  `client.map(f, xs)`, multiprocessing `pool.map(f, xs, chunksize=1)`.
- lb_chunk100: 10,000 items in tasks of 100: ipyparallel `chunksize=100`; dask 100 tasks each
  mapping a `range` of 100 items (ipyparallel too ships slices of a `range` as ranges);
  multiprocessing `chunksize=100`.
- direct_map: a DirectView map of 100,000 items: ipyparallel `rc[:].map_sync(f, xs)` (one
  contiguous block per engine). Neither dask nor multiprocessing has a DirectView; their natural
  equivalent is used, one contiguous block per worker: dask submits one task per worker, pinned to
  it with `workers=[address]`, each mapping its half of the items (a `range`, as ipyparallel
  ships it); multiprocessing runs
  `pool.map(f, xs, chunksize=len(xs) // 2)` (two chunks; the pool decides which process takes
  which).
- montecarlo: pi from 2*10^7 samples in 200 tasks of 100,000 samples, the computation of the
  MONTECARLO kernel of benches/throughput.rs (examples/montecarlo.py: random.Random(seed), count
  the points inside the quarter circle), mapped with each framework's default load-balanced map.

Everything listens on 127.0.0.1 only, and every process started here is stopped here, also when a
workload fails (try/finally; SIGTERM is turned into SystemExit so that the finally blocks run).
"""

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time

N_DEFAULT = 100_000
N_DEFAULT_SLOW = 10_000  # lb_default for ipyparallel and dask: one task per item
N_TASKS = 10_000
N_DIRECT = 100_000
MC_TASKS = 200
MC_SAMPLES = 100_000
LOOPBACK = "127.0.0.1"


def identity(x):
    return x


def map_chunk(chunk):
    return [identity(x) for x in chunk]


def hits(args):
    # The computation of examples/montecarlo.py (the MONTECARLO kernel of benches/throughput.rs),
    # with the sample count passed in; `import random` is inside the function so that it also
    # works where only the function's code is shipped (ipyparallel).
    import random

    seed, n = args
    r = random.Random(seed)
    rnd = r.random
    return sum(1 for _ in range(n) if rnd() ** 2 + rnd() ** 2 <= 1.0)


def report(name, count, seconds):
    print(f"{name}\t{count}\t{seconds:.4f}\t{count / seconds:.0f}", flush=True)


def best(runs, fn):
    """The fastest of `runs` calls of fn, in seconds."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def check(out, n):
    if list(out) != list(range(n)):
        raise AssertionError(f"wrong map result for {n} items")


def montecarlo(map_fn):
    tasks = [(seed, MC_SAMPLES) for seed in range(MC_TASKS)]
    t = time.perf_counter()
    total = sum(map_fn(tasks))
    seconds = time.perf_counter() - t
    pi = 4.0 * total / (MC_TASKS * MC_SAMPLES)
    if abs(pi - 3.14159) > 0.01:
        raise AssertionError(f"montecarlo gave pi ~ {pi}")
    print(f"montecarlo: pi ~ {pi:.5f}", file=sys.stderr)
    report("montecarlo", MC_TASKS * MC_SAMPLES, seconds)


def run_ipyparallel(runs):
    # Keep the profile (connection files, logs) out of ~/.ipython: a private IPYTHONDIR, which
    # the controller and engines inherit.
    ipython_dir = tempfile.mkdtemp(prefix="starling-bench-ipython-")
    os.environ["IPYTHONDIR"] = ipython_dir
    import ipyparallel as ipp

    print(f"# ipyparallel {ipp.__version__}", flush=True)
    cluster = ipp.Cluster(n=2, controller_ip=LOOPBACK, log_level=30)
    rc = None
    try:
        t = time.perf_counter()
        rc = cluster.start_and_connect_sync(activate=False)
        rc.wait_for_engines(2, timeout=120)
        print(f"ipyparallel: 2 engines up in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        lb = rc.load_balanced_view()

        def lb_map(n, **kw):
            check(lb.map_sync(identity, range(n), **kw), n)

        report("lb_default", N_DEFAULT_SLOW, best(runs, lambda: lb_map(N_DEFAULT_SLOW)))
        report("lb_chunk1", N_TASKS, best(runs, lambda: lb_map(N_TASKS, chunksize=1)))
        report("lb_chunk100", N_TASKS, best(runs, lambda: lb_map(N_TASKS, chunksize=100)))
        dv = rc[:]
        report(
            "direct_map",
            N_DIRECT,
            best(runs, lambda: check(dv.map_sync(identity, range(N_DIRECT)), N_DIRECT)),
        )
        montecarlo(lambda tasks: lb.map_sync(hits, tasks))
    finally:
        try:
            if rc is not None:
                rc.close()
        finally:
            cluster.stop_cluster_sync()
            shutil.rmtree(ipython_dir, ignore_errors=True)


def run_dask(runs):
    import dask
    from distributed import Client, LocalCluster

    print(f"# dask {dask.__version__}", flush=True)
    scratch = tempfile.mkdtemp(prefix="starling-bench-dask-")
    cluster = client = None
    try:
        t = time.perf_counter()
        cluster = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host=LOOPBACK,
            dashboard_address=None,
            worker_dashboard_address=None,
            # No dashboard, and the scheduler's remaining HTTP routes (health, metrics) on a free
            # loopback port rather than the fixed 8787.
            scheduler_kwargs={"dashboard": False, "dashboard_address": f"{LOOPBACK}:0"},
            local_directory=scratch,
        )
        client = Client(cluster)
        client.wait_for_workers(2, timeout=120)
        print(f"dask: 2 workers up in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        # pure=False everywhere: every run gets fresh keys, so no result of an earlier run that
        # the scheduler still holds is reused.

        def per_item(n):
            check(client.gather(client.map(identity, range(n), pure=False)), n)

        def chunked(n, size):
            chunks = [range(i, min(i + size, n)) for i in range(0, n, size)]
            out = client.gather(client.map(map_chunk, chunks, pure=False))
            check([x for part in out for x in part], n)

        workers = sorted(client.scheduler_info()["workers"])

        def direct(n):
            step = -(-n // len(workers))
            futures = [
                client.submit(
                    map_chunk, range(i * step, min((i + 1) * step, n)), workers=[w], pure=False
                )
                for i, w in enumerate(workers)
            ]
            check([x for part in client.gather(futures) for x in part], n)

        report("lb_default", N_DEFAULT_SLOW, best(runs, lambda: per_item(N_DEFAULT_SLOW)))
        report("lb_chunk1", N_TASKS, best(runs, lambda: per_item(N_TASKS)))
        report("lb_chunk100", N_TASKS, best(runs, lambda: chunked(N_TASKS, 100)))
        report("direct_map", N_DIRECT, best(runs, lambda: direct(N_DIRECT)))
        montecarlo(lambda tasks: client.gather(client.map(hits, tasks, pure=False)))
    finally:
        try:
            if client is not None:
                client.close()
        finally:
            if cluster is not None:
                cluster.close()
            shutil.rmtree(scratch, ignore_errors=True)


def run_multiprocessing(runs):
    import multiprocessing
    import platform

    print(f"# multiprocessing python-{platform.python_version()}", flush=True)
    pool = multiprocessing.Pool(2)
    try:

        def mp_map(n, **kw):
            check(pool.map(identity, range(n), **kw), n)

        report("lb_default", N_DEFAULT, best(runs, lambda: mp_map(N_DEFAULT)))
        report("lb_chunk1", N_TASKS, best(runs, lambda: mp_map(N_TASKS, chunksize=1)))
        report("lb_chunk100", N_TASKS, best(runs, lambda: mp_map(N_TASKS, chunksize=100)))
        report(
            "direct_map", N_DIRECT, best(runs, lambda: mp_map(N_DIRECT, chunksize=N_DIRECT // 2))
        )
        montecarlo(lambda tasks: pool.map(hits, tasks))
    finally:
        pool.terminate()
        pool.join()


# multiprocessing first: its pool forks, best before the other two have started threads.
FRAMEWORKS = {
    "multiprocessing": run_multiprocessing,
    "ipyparallel": run_ipyparallel,
    "dask": run_dask,
}


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("frameworks", nargs="*", metavar="FRAMEWORK", help=", ".join(FRAMEWORKS))
    parser.add_argument("--runs", type=int, default=3, help="runs per workload; the best counts")
    args = parser.parse_args()
    unknown = sorted(set(args.frameworks) - set(FRAMEWORKS))
    if unknown:
        parser.error(f"unknown framework(s) {', '.join(unknown)}; known: {', '.join(FRAMEWORKS)}")
    signal.signal(signal.SIGTERM, _sigterm)
    failed = []
    for name in args.frameworks or list(FRAMEWORKS):
        try:
            FRAMEWORKS[name](args.runs)
        except Exception as e:  # noqa: BLE001 - report, go on with the next framework, fail at the end
            import traceback

            traceback.print_exc()
            print(f"{name}: failed: {e!r}", file=sys.stderr)
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

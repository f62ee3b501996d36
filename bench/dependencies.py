#!/usr/bin/env python3
"""Dependent tasks: starling and ipyparallel side by side, 2 engines each, in one run.

    PROFILE=release scripts/python.sh build
    .venv-python/bin/pip install ipyparallel==9.2.0
    .venv-python/bin/python bench/dependencies.py [--n 10000] [starling] [ipyparallel]

Workloads, the same calls on both systems (a load-balanced view, `lambda: 1` as the task):

- chain: N tasks, each submitted with `after=` the one before: `lview.temp_flags(after=[prev])`
  then `apply_async`. Tasks/s from the first submission to the last result.
- fan_in: N independent tasks, then one task with `after=` all N of them. Tasks/s (N + 1) from
  the first submission to the last result.

Progress goes to stderr, `system<TAB>workload<TAB>tasks_per_s` lines and then a table to stdout.
Everything listens on 127.0.0.1; each cluster is stopped again, also on failure or SIGTERM.
starling's state goes to a temporary STARLING_HOME, ipyparallel's profile to a temporary
IPYTHONDIR; both are removed at the end.
"""

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback

from compare import _sigterm  # SIGTERM becomes SystemExit, so the clusters are stopped

LOOPBACK = "127.0.0.1"
TIMEOUT = 900

one = lambda: 1  # noqa: E731 - the trivial task, the same object for both systems

results = {}


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def chain(lview, n):
    t = time.perf_counter()
    prev = lview.apply_async(one)
    for _ in range(n - 1):
        with lview.temp_flags(after=[prev]):
            prev = lview.apply_async(one)
    if prev.get(TIMEOUT) != 1:
        raise AssertionError("the chain's last task gave the wrong answer")
    return n / (time.perf_counter() - t)


def fan_in(lview, n):
    t = time.perf_counter()
    parents = [lview.apply_async(one) for _ in range(n)]
    with lview.temp_flags(after=parents):
        join = lview.apply_async(one)
    if join.get(TIMEOUT) != 1 or sum(p.get(TIMEOUT) for p in parents) != n:
        raise AssertionError("the fan-in gave the wrong answer")
    return (n + 1) / (time.perf_counter() - t)


def run(system, lview, n):
    for name, fn in (("chain", chain), ("fan_in", fan_in)):
        log(f"== {system}: {name} of {n}")
        try:
            per_s = fn(lview, n)
        except Exception as e:  # noqa: BLE001 - report, go on
            traceback.print_exc()
            log(f"== {system}: {name} FAILED: {e!r}")
            continue
        results[system, name] = per_s
        print(f"{system}\t{name}\t{per_s:.0f}", flush=True)


def run_starling(n):
    import starling

    cluster = starling.Cluster(n=2, name="deps-bench")
    try:
        rc = cluster.start_and_connect()
        rc.wait_for_engines(2, timeout=120)
        run("starling", rc.load_balanced_view(), n)
    finally:
        log(cluster.stop())


def run_ipyparallel(n):
    import ipyparallel as ipp

    cluster = ipp.Cluster(n=2, controller_ip=LOOPBACK, log_level=30)
    rc = None
    try:
        rc = cluster.start_and_connect_sync(activate=False)
        rc.wait_for_engines(2, timeout=120)
        run("ipyparallel", rc.load_balanced_view(), n)
    finally:
        try:
            if rc is not None:
                rc.close()
        finally:
            cluster.stop_cluster_sync()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("systems", nargs="*", metavar="SYSTEM", help="starling, ipyparallel")
    p.add_argument("--n", type=int, default=10_000, help="tasks in the chain and the fan-in")
    args = p.parse_args()
    systems = args.systems or ["starling", "ipyparallel"]
    signal.signal(signal.SIGTERM, _sigterm)
    scratch = tempfile.mkdtemp(prefix="starling-deps-bench-")
    os.environ["STARLING_HOME"] = os.path.join(scratch, "starling")
    os.environ["IPYTHONDIR"] = os.path.join(scratch, "ipython")
    try:
        if "starling" in systems:
            run_starling(args.n)
        if "ipyparallel" in systems:
            run_ipyparallel(args.n)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(f"| workload ({args.n:,} tasks) | starling | ipyparallel | starling vs ipyparallel |")
    print("|---|---:|---:|---:|")
    for name, label in (
        ("chain", "chain, each `after` the last"),
        ("fan_in", "fan-in, 1 `after` all"),
    ):
        s, i = results.get(("starling", name)), results.get(("ipyparallel", name))
        fmt = lambda v: "-" if v is None else f"{v:,.0f}/s"  # noqa: E731
        ratio = f"{s / i:.1f}x" if s and i else "-"
        print(f"| {label} | {fmt(s)} | {fmt(i)} | {ratio} |")
    return 0 if all((s, w) in results for s in systems for w in ("chain", "fan_in")) else 1


if __name__ == "__main__":
    sys.exit(main())

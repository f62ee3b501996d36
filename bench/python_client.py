#!/usr/bin/env python3
"""starling's Python client side by side with ipyparallel, 2 engines each, in one run.

    PATH=target/debug:$PATH STARLINGD=target/debug/starlingd \\
        .venv-python/bin/python bench/python_client.py [--runs N] [starling] [ipyparallel]

With no system named, both run, one after the other (never both clusters at once). Progress and
one line per figure, `system<TAB>workload<TAB>figure<TAB>value`, go to stderr; the table of
figures goes to stdout, headed by the versions and the profile starling was built with (read
from its binaries: the dev profile keeps line tables, release strips them).

Workloads, the same calls on both systems (`lambda: 1` and `lambda x: x` as the functions):

- apply: `rc[:].apply_sync(lambda: 1)`, 300 calls of warm-up, then 2,000 timed one by one:
  median and p99 (nearest rank) of the round trip, in ms. (On a 2-core VM the median of
  consecutive 250-call windows moves between two levels, ~0.2 and ~0.3 ms for starling, as the
  scheduler places seven processes on two CPUs; 2,000 calls span several of them.)
- lb_default: `lview.map_sync(f, range(100_000))` with default settings, items/s. ipyparallel's
  default is one task per item (chunksize 1), so it maps 2,000 items there (a run of 100,000
  would take minutes); it also runs `chunksize=1000`, its best, with 100,000 items.
- lb_chunk1: `lview.map_sync(f, range(10_000), chunksize=1)`, tasks/s.
  For the maps, the best of N runs (default 3), as in bench/compare.py.
- push / pull: a float64 NumPy array of 100 MB (12,500,000 values) pushed to both engines,
  `rc[:].push({'a': arr}, block=True)`, and pulled back from both, `rc[:].pull('a',
  block=True)`; MB/s = array bytes x 2 engines / seconds, MB = 10^6 bytes; median of 5 after
  one untimed round (which also checks that the values come back equal). starling's default
  frame limit is 64 MiB, so its cluster starts from a spec with `max_frame_mb: 512`.
- seed (starling only): the README's `v = rc[:]; v.map(f, range(10))` with `f` sleeping 1 s, on
  a separate cluster of 4 engines: `elapsed` and `serial_time` of the run with the median
  elapsed of 3.

Everything listens on 127.0.0.1 only. Every cluster started here is stopped here, also when a
workload fails (try/finally; SIGTERM is turned into SystemExit so that the finally blocks run):
starling's by `Cluster.stop()` (what `starling down` does), ipyparallel's by
`stop_cluster_sync()`. starling's state goes to a temporary STARLING_HOME, ipyparallel's
profile to a temporary IPYTHONDIR; both are removed at the end.
"""

import argparse
import os
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
import traceback

from compare import _sigterm, best, check  # the same timing, checks and SIGTERM as compare.py

LOOPBACK = "127.0.0.1"
APPLY_WARMUP = 300
APPLY_CALLS = 2_000
N_MAP = 100_000
N_MAP_IPP_DEFAULT = 2_000  # ipyparallel's default map: one task per item
IPP_BEST_CHUNK = 1000
N_TASKS = 10_000
ARRAY_VALUES = 12_500_000  # float64: 100 MB
TRANSFER_RUNS = 5
SEED_ENGINES = 4
SEED_ITEMS = 10
SEED_RUNS = 3
TIMEOUT = 600  # seconds: the most any one call may take before the benchmark gives up

one = lambda: 1  # noqa: E731 - the issue's trivial function, the same object for both systems
identity = lambda x: x  # noqa: E731

# (system, workload, figure) -> number; failures: (system, workload) -> short error
results = {}
failures = {}


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def record(system, workload, figure, value):
    results[system, workload, figure] = value
    log(f"{system}\t{workload}\t{figure}\t{value:.6g}")


def attempt(system, workload, fn):
    """Runs one workload; a failure is reported (with its traceback) and the next one runs."""
    log(f"== {system}: {workload}")
    t = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - report, go on, fail at the end
        traceback.print_exc()
        failures[system, workload] = (
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        )
        log(f"== {system}: {workload} FAILED: {e!r}")
    log(f"== {system}: {workload} took {time.perf_counter() - t:.1f} s")


def p99(samples):
    """The 99th percentile by nearest rank."""
    ordered = sorted(samples)
    return ordered[max(0, -(-len(ordered) * 99 // 100) - 1)]


# ---- the workloads both systems run ----------------------------------------------------------


def bench_apply(system, dv):
    def run():
        for _ in range(APPLY_WARMUP):
            dv.apply_sync(one)
        times = []
        for _ in range(APPLY_CALLS):
            t = time.perf_counter()
            out = dv.apply_sync(one)
            times.append(time.perf_counter() - t)
        if list(out) != [1] * len(dv):
            raise AssertionError(f"apply_sync(lambda: 1) gave {out!r}")
        record(system, "apply", "median_ms", statistics.median(times) * 1e3)
        record(system, "apply", "p99_ms", p99(times) * 1e3)

    attempt(system, "apply", run)


def bench_map(system, lb, workload, n, runs, **kw):
    def run():
        def once():
            check(lb.map_sync(identity, range(n), **kw), n)

        record(system, workload, "per_s", n / best(runs, once))
        results[system, workload, "n"] = n

    attempt(system, workload, run)


def bench_transfer(system, dv, engines, block_get):
    """push and pull of a 100 MB array; block_get(async_result) waits with a timeout."""
    import numpy as np

    arr = np.random.default_rng(7).random(ARRAY_VALUES)
    volume = arr.nbytes * engines / 1e6  # MB moved by one push or one pull

    def push():
        # One untimed round, bounded by TIMEOUT, so that a hang shows as a failure.
        block_get(dv.push({"a": arr}, block=False))
        times = []
        for _ in range(TRANSFER_RUNS):
            t = time.perf_counter()
            dv.push({"a": arr}, block=True)
            times.append(time.perf_counter() - t)
        record(system, "push", "MB_per_s", volume / statistics.median(times))

    def pull():
        back = block_get(dv.pull("a", block=False))
        if len(back) != engines or not all(np.array_equal(b, arr) for b in back):
            raise AssertionError("the pulled arrays differ from the pushed one")
        del back
        times = []
        for _ in range(TRANSFER_RUNS):
            t = time.perf_counter()
            back = dv.pull("a", block=True)
            times.append(time.perf_counter() - t)
            del back
        record(system, "pull", "MB_per_s", volume / statistics.median(times))

    attempt(system, "push", push)
    attempt(system, "pull", pull)


# ---- starling ----------------------------------------------------------------------------------


def _elf_has_line_tables(path):
    """Whether an ELF file has a .debug_line section (None: not an ELF file we can read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
                return None
            e = "<" if head[5] == 1 else ">"
            (shoff,) = struct.unpack_from(e + "Q", head, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", head, 0x3A)
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            str_off, str_size = struct.unpack_from(e + "QQ", table, shstrndx * shentsize + 24)
            f.seek(str_off)
            strtab = f.read(str_size)
            for i in range(shnum):
                (name,) = struct.unpack_from(e + "I", table, i * shentsize)
                if strtab[name : strtab.index(b"\0", name)] == b".debug_line":
                    return True
            return False
    except (OSError, struct.error, ValueError):
        return None


def starling_profile():
    """`dev`, `release` or `unknown`, with the binaries it was read from."""
    import starling
    from starling import _starling

    daemon = os.environ.get("STARLINGD") or os.path.join(
        os.path.dirname(starling.__file__), "bin", "starlingd"
    )
    seen = {}
    for what, path in (("starlingd", daemon), ("native client", _starling.__file__)):
        lines = _elf_has_line_tables(path)
        seen[what] = (path, {True: "dev", False: "release", None: "unknown"}[lines])
    profiles = {p for _, p in seen.values()}
    profile = profiles.pop() if len(profiles) == 1 else "mixed"
    detail = "; ".join(f"{w} {p}: {path}" for w, (path, p) in seen.items())
    return profile, detail


def write_spec(directory, name, engines):
    path = os.path.join(directory, f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(
            f"name: {name}\n"
            "provider: local\n"
            f"engines_per_node: {engines}\n"
            "max_frame_mb: 512\n"
            f"python: {sys.executable}\n"
        )
    return path


def starling_get(ar):
    return ar.get(TIMEOUT)


def run_starling(runs, scratch):
    import starling

    spec = write_spec(scratch, "bench", 2)
    cluster = starling.Cluster(spec=spec)
    try:
        t = time.perf_counter()
        rc = cluster.start_and_connect()
        rc.wait_for_engines(2, timeout=120)
        log(f"starling: {len(rc.ids)} engines up in {time.perf_counter() - t:.1f} s")
        dv = rc[:]
        lb = rc.load_balanced_view()
        bench_apply("starling", dv)
        bench_map("starling", lb, "lb_default", N_MAP, runs)
        bench_map("starling", lb, "lb_chunk1", N_TASKS, runs, chunksize=1)
        bench_transfer("starling", dv, len(rc.ids), starling_get)
    finally:
        log(cluster.stop())

    def seed():
        cluster = starling.Cluster(n=SEED_ENGINES, name="bench4")
        try:
            rc = cluster.start_and_connect()
            rc.wait_for_engines(SEED_ENGINES, timeout=120)
            v = rc[:]
            # The README's `with v.sync_imports(): import time`, which is
            # `v.execute("import time", block=True)`, here with a bound: it once hung (see
            # bench/README.md).
            v.execute("import time", block=False).get(60)

            def f(x):
                time.sleep(1)
                return x * x

            done = []
            for _ in range(SEED_RUNS):
                r = v.map(f, range(SEED_ITEMS), block=False)
                out = r.get(TIMEOUT)
                if out != [x * x for x in range(SEED_ITEMS)]:
                    raise AssertionError(f"seed map gave {out!r}")
                done.append((r.elapsed, r.serial_time))
            elapsed, serial = sorted(done)[len(done) // 2]
            record("starling", "seed", "elapsed_s", elapsed)
            record("starling", "seed", "serial_s", serial)
        finally:
            log(cluster.stop())

    attempt("starling", "seed", seed)


# ---- ipyparallel -------------------------------------------------------------------------------


def ipp_get(ar):
    return ar.get(TIMEOUT)


def run_ipyparallel(runs, scratch):
    import ipyparallel as ipp

    cluster = ipp.Cluster(n=2, controller_ip=LOOPBACK, log_level=30)
    rc = None
    try:
        t = time.perf_counter()
        rc = cluster.start_and_connect_sync(activate=False)
        rc.wait_for_engines(2, timeout=120)
        log(f"ipyparallel: {len(rc.ids)} engines up in {time.perf_counter() - t:.1f} s")
        dv = rc[:]
        lb = rc.load_balanced_view()
        bench_apply("ipyparallel", dv)
        bench_map("ipyparallel", lb, "lb_default", N_MAP_IPP_DEFAULT, runs)
        bench_map("ipyparallel", lb, "lb_chunk1000", N_MAP, runs, chunksize=IPP_BEST_CHUNK)
        bench_map("ipyparallel", lb, "lb_chunk1", N_TASKS, runs, chunksize=1)
        bench_transfer("ipyparallel", dv, len(rc.ids), ipp_get)
    finally:
        try:
            if rc is not None:
                rc.close()
        finally:
            cluster.stop_cluster_sync()


# ---- the table ---------------------------------------------------------------------------------

# (workload, figure, label, unit, target, higher_is_better)
ROWS = [
    ("apply", "median_ms", "`rc[:].apply_sync(lambda: 1)`, median", "ms", 0.3, False),
    ("apply", "p99_ms", "`rc[:].apply_sync(lambda: 1)`, p99", "ms", None, False),
    (
        "lb_default",
        "per_s",
        "`lview.map_sync(f, range(100_000))`, default",
        "items/s",
        500_000,
        True,
    ),
    ("lb_chunk1000", "per_s", "same, `chunksize=1000`", "items/s", None, True),
    (
        "lb_chunk1",
        "per_s",
        "`lview.map_sync(f, range(10_000), chunksize=1)`",
        "tasks/s",
        50_000,
        True,
    ),
    ("push", "MB_per_s", "push 100 MB array to 2 engines, median of 5", "MB/s", 1_000, True),
    ("pull", "MB_per_s", "pull it back from 2 engines, median of 5", "MB/s", None, True),
    (
        "seed",
        "elapsed_s",
        "seed `v.map(f, range(10))`, sleep 1 s, 4 engines: elapsed",
        "s",
        3.1,
        False,
    ),
    ("seed", "serial_s", "same: `serial_time`", "s", None, None),
]
SYSTEMS = ["starling", "ipyparallel"]
SKIPPED = {("starling", "lb_chunk1000"), ("ipyparallel", "seed")}  # workloads a system skips
NOTES = {("ipyparallel", "lb_default"): "chunksize 1"}


def number(value, unit):
    if unit in ("ms", "s"):
        return f"{value:.3f} {unit}" if value < 10 else f"{value:.2f} {unit}"
    return f"{value:,.0f}/s" if unit.endswith("/s") and unit != "MB/s" else f"{value:,.0f} {unit}"


def cell(system, workload, figure, unit, ran):
    if (system, workload) in SKIPPED:
        return "-"
    if (system, workload) in failures:
        return "failed"
    value = results.get((system, workload, figure))
    if value is None:
        return "not run" if system not in ran else "failed"
    text = number(value, unit)
    n = results.get((system, workload, "n"))
    notes = []
    if n is not None and workload == "lb_default" and n != N_MAP:
        notes.append(f"n={n:,}")
    if (system, workload) in NOTES:
        notes.append(NOTES[system, workload])
    return f"{text} ({', '.join(notes)})" if notes else text


def table(ran):
    header = [
        "workload",
        "starling",
        "ipyparallel",
        "target (starling)",
        "meets",
        "starling vs ipp",
    ]
    rows = []
    for workload, figure, label, unit, target, higher in ROWS:
        s = results.get(("starling", workload, figure))
        i = results.get(("ipyparallel", workload, figure))
        if target is None:
            goal = meets = ""
        else:
            goal = ("≥ " if higher else "≤ ") + number(target, unit)
            meets = (
                "-" if s is None else ("yes" if (s >= target if higher else s <= target) else "no")
            )
        if s is None or i is None or higher is None:
            ratio = ""
        else:
            ratio = f"{(s / i if higher else i / s):,.1f}x"
        rows.append(
            [label, *(cell(x, workload, figure, unit, ran) for x in SYSTEMS), goal, meets, ratio]
        )
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]

    def fmt(r):
        return (
            "| "
            + " | ".join(
                c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))
            )
            + " |"
        )

    print(fmt(header))
    print("|" + "|".join("-" * (w + 1) + (":" if k else "-") for k, w in enumerate(widths)) + "|")
    for r in rows:
        print(fmt(r))
    print()
    print(
        "f = `lambda x: x`. n= where fewer items ran than for starling (one task per item). MB/s:"
    )
    print("array bytes x 2 engines / seconds, MB = 10^6 bytes. `starling vs ipp`: how many times")
    print("faster starling is (ratio of throughputs, or of times for apply).")
    print("`meets`: whether starling's figure meets the target.", flush=True)


# ---- main --------------------------------------------------------------------------------------

RUNNERS = {"starling": run_starling, "ipyparallel": run_ipyparallel}


def _load():
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("systems", nargs="*", metavar="SYSTEM", help=", ".join(RUNNERS))
    parser.add_argument("--runs", type=int, default=3, help="runs per map; the best counts (3)")
    args = parser.parse_args()
    unknown = sorted(set(args.systems) - set(RUNNERS))
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(RUNNERS)}")
    systems = args.systems or list(RUNNERS)
    signal.signal(signal.SIGTERM, _sigterm)

    scratch = tempfile.mkdtemp(prefix="starling-bench-py-")
    # starling's clusters, connection files and logs: here, never in the user's STARLING_HOME.
    os.environ["STARLING_HOME"] = os.path.join(scratch, "starling-home")
    # ipyparallel's profile (connection files, logs) out of ~/.ipython, as in bench/compare.py;
    # set before ipyparallel is imported.
    os.environ["IPYTHONDIR"] = os.path.join(scratch, "ipython")
    failed = []
    try:
        import platform

        profile, detail = starling_profile()
        try:
            from importlib.metadata import version

            versions = f"starling-cluster {version('starling-cluster')}"
        except Exception:  # noqa: BLE001 - a version is nice to have, not needed
            versions = "starling-cluster (version unknown)"
        try:
            import ipyparallel

            versions += f", ipyparallel {ipyparallel.__version__}"
        except ImportError:
            versions += ", ipyparallel not installed"
        print(
            f"# starling's Python client vs ipyparallel: 2 engines each, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}; {versions}"
        )
        print(f"# starling built with profile: {profile} ({detail})", flush=True)
        print(
            f"# load average at the start: {_load()} (other work on this machine skews the figures)"
        )
        if profile != "release":
            print(
                "# not an optimised build: starling's figures are slower than a release build's "
                "(`PROFILE=release scripts/python.sh build`)",
                flush=True,
            )
        for name in systems:
            try:
                RUNNERS[name](args.runs, scratch)
            except Exception as e:  # noqa: BLE001 - report, go on with the next system
                traceback.print_exc()
                log(f"{name}: failed: {e!r}")
                failed.append(name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    table(systems)
    print(f"load average at the end: {_load()}")
    for (system, workload), error in sorted(failures.items()):
        print(f"failed: {system} {workload}: {error}")
    failed += [f"{s} {w}" for s, w in sorted(failures)]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""MPI on a local starling cluster of 4 engines whose kernels are one MPI world, in one run:

    scripts/python.sh build        # the venv with mpi4py and NumPy; Open MPI on the PATH
    .venv-python/bin/python bench/mpi.py [--samples 200000000] [--calls 10000]

- allreduce: `c.allreduce(1.0)` of one float across the 4 engines, timed inside `px` on each
  engine over --calls calls; microseconds per call (the slowest engine's figure).
- pi: 2e8 samples three ways, side by side: examples/montecarlo_mpi.py run by `starling
  mpirun` (4 ranks, mpi4py `reduce`), `starling map hits_np` (200 tasks of 1e6 samples,
  load-balanced over the 4 engines) and the same `hits_np` in one process (serial). Wall time
  of each, and each estimate.

Everything runs on this machine (Open MPI kept on loopback); the cluster lives in a temporary
STARLING_HOME and is taken down at the end, also on failure.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))


def starling(*args, **kw):
    return subprocess.run(
        ["starling", *args], check=True, capture_output=True, text=True, **kw
    ).stdout


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=200_000_000)
    p.add_argument("--calls", type=int, default=10_000)
    a = p.parse_args()
    home = tempfile.mkdtemp(prefix="starling-bench-mpi-")
    os.environ["STARLING_HOME"] = home
    os.environ.pop("STARLING_CLUSTER", None)
    spec = os.path.join(home, "mpi.yaml")
    with open(spec, "w") as f:
        f.write(f"name: bench-mpi\npython: {sys.executable}\nmpi: true\nengines_per_node: 4\n")
    try:
        print(starling("up", "-f", spec).strip(), file=sys.stderr)
        code = (
            "import time\nfrom mpi4py import MPI\nc = MPI.COMM_WORLD\nc.Barrier()\n"
            f"t = time.perf_counter()\nfor _ in range({a.calls}):\n    c.allreduce(1.0)\n"
            f"(time.perf_counter() - t) / {a.calls} * 1e6"
        )
        out = json.loads(starling("px", "--output", "json", code))
        allreduce = max(r["value"] for r in out)
        print(f"allreduce of one float, 4 engines: {allreduce:.1f} us per call")

        import montecarlo

        tasks = a.samples // montecarlo.SAMPLES_PER_TASK_NP
        samples = tasks * montecarlo.SAMPLES_PER_TASK_NP
        t = time.perf_counter()
        mpi = starling(
            "mpirun",
            "--",
            sys.executable,
            os.path.join(ROOT, "examples/montecarlo_mpi.py"),
            str(samples),
            cwd=ROOT,
        ).strip()
        mpi_s = time.perf_counter() - t
        with open(os.path.join(ROOT, "examples/montecarlo.py")) as f:
            source = f.read()
        t = time.perf_counter()
        hits = json.loads(
            starling(
                "map",
                "hits_np",
                "--def",
                source,
                "--range",
                str(tasks),
                "--output",
                "json",
            )
        )
        map_s = time.perf_counter() - t
        t = time.perf_counter()
        serial = sum(montecarlo.hits_np(i) for i in range(tasks // 10)) * 10
        serial_s = (time.perf_counter() - t) * 10
        print(f"pi, {samples:,} samples:")
        print(f"  mpi4py reduce, starling mpirun, 4 ranks: {mpi_s:6.2f} s  ({mpi})")
        print(
            f"  starling map hits_np, {tasks} tasks, 4 engines: {map_s:6.2f} s  "
            f"(pi ~ {4 * sum(hits) / samples:.6f})"
        )
        print(
            f"  serial, one process (a tenth, times 10): {serial_s:6.2f} s  "
            f"(pi ~ {4 * serial / samples:.6f})"
        )
    finally:
        subprocess.run(["starling", "down", "bench-mpi"], check=False, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Controller memory: under large results, and with a million finished tasks in its store.

    bench/controller_memory.py [--jobs 100] [--mb 30]
    bench/controller_memory.py --tasks 1000000 [--per-map 100000]

Runs the real `starling` CLI from target/release (or $STARLING_BIN).

Large results: `up --local -n 1`, then N × `px --noblock 'b"x" * (MB << 20)'` (waiting for the
queue to drain every 10 jobs and printing the controller's RSS then), then `down`. The
controller keeps 128 MiB of finished results; the store keeps the rest.

Many tasks (`--tasks`): `up --local -n 2`, then load-balanced maps of `--per-map` items at
chunksize 1 (one task per item) until the store holds `--tasks` finished tasks, printing after
each map its tasks/s, the controller's RSS and the store's task count, then `down`.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--mb", type=int, default=30)
    ap.add_argument(
        "--tasks",
        type=int,
        default=0,
        help="finished tasks to reach (0: large results)",
    )
    ap.add_argument("--per-map", type=int, default=100_000)
    args = ap.parse_args()
    binary = os.environ.get("STARLING_BIN", str(ROOT / "target/release/starling"))
    home = tempfile.mkdtemp(prefix="starling-bench-")
    env = dict(os.environ, STARLING_HOME=home)

    def starling(*a: str) -> str:
        return subprocess.run(
            [binary, *a], env=env, check=True, capture_output=True, text=True
        ).stdout

    try:
        if args.tasks:
            return many_tasks(starling, home, args.tasks, args.per_map)
        return large_results(starling, args.jobs, args.mb)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def large_results(starling, jobs: int, mb: int) -> int:
    starling("up", "--local", "-n", "1", "--name", "memory")
    try:
        status = json.loads(starling("status", "--output", "json"))
        pid = status["controller_pid"]
        print(f"controller pid {pid}: {rss_mib(pid):.0f} MiB at start")
        started = time.perf_counter()
        for job in range(1, jobs + 1):
            starling("px", "--noblock", f'b"x" * ({mb} << 20)')
            if job % 10 == 0:
                while True:
                    st = json.loads(starling("status", "--output", "json"))
                    if st["running"] == 0 and st["queued"] == 0:
                        break
                    time.sleep(0.05)
                print(
                    f"after {job:4d} jobs of {mb} MB results: "
                    f"controller RSS {rss_mib(pid):6.0f} MiB"
                )
        print(f"{jobs} jobs in {time.perf_counter() - started:.1f} s")
    finally:
        starling("down", "--cluster", "memory")
    return 0


def many_tasks(starling, home: str, tasks: int, per_map: int) -> int:
    import sqlite3

    starling("up", "--local", "-n", "2", "--name", "memory")
    try:
        status = json.loads(starling("status", "--output", "json"))
        pid = status["controller_pid"]
        store = max(Path(home, "history", "memory").glob("*.db"))
        print(f"controller pid {pid}: {rss_mib(pid):.0f} MiB at start; store {store}")
        done = 0
        while done < tasks:
            t = time.perf_counter()
            out = starling(
                "map",
                "lambda x: x",
                "--range",
                str(per_map),
                "--chunksize",
                "1",
                "--output",
                "json",
            )
            seconds = time.perf_counter() - t
            if json.loads(out) != list(range(per_map)):
                raise AssertionError("wrong map result")
            done += per_map
            with sqlite3.connect(store) as db:
                stored = db.execute("SELECT count(*) FROM tasks").fetchone()[0]
            print(
                f"{done:9,d} tasks: {per_map / seconds:8,.0f} tasks/s, "
                f"controller RSS {rss_mib(pid):5.0f} MiB, store {stored:,} task rows "
                f"({store.stat().st_size >> 20} MiB)"
            )
    finally:
        starling("down", "--cluster", "memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())

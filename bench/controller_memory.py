"""Controller memory under large results: RSS of the controller of a local cluster after N jobs
that each return a 30 MB value, against the bound it keeps (128 MiB of finished results).

    bench/controller_memory.py [--jobs 100] [--mb 30]

Runs the real `starling` CLI from target/release (or $STARLING_BIN): `up --local -n 1`, then
N × `px --noblock 'b"x" * (MB << 20)'` (waiting for the queue to drain every 10 jobs and
printing the controller's RSS then), then `down`.
"""

import argparse
import json
import os
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
    args = ap.parse_args()
    binary = os.environ.get("STARLING_BIN", str(ROOT / "target/release/starling"))
    home = tempfile.mkdtemp(prefix="starling-bench-")
    env = dict(os.environ, STARLING_HOME=home)

    def starling(*a: str) -> str:
        return subprocess.run(
            [binary, *a], env=env, check=True, capture_output=True, text=True
        ).stdout

    starling("up", "--local", "-n", "1", "--name", "memory")
    try:
        status = json.loads(starling("status", "--output", "json"))
        pid = status["controller_pid"]
        print(f"controller pid {pid}: {rss_mib(pid):.0f} MiB at start")
        started = time.perf_counter()
        for job in range(1, args.jobs + 1):
            starling("px", "--noblock", f'b"x" * ({args.mb} << 20)')
            if job % 10 == 0:
                while True:
                    st = json.loads(starling("status", "--output", "json"))
                    if st["running"] == 0 and st["queued"] == 0:
                        break
                    time.sleep(0.05)
                print(
                    f"after {job:4d} jobs of {args.mb} MB results: "
                    f"controller RSS {rss_mib(pid):6.0f} MiB"
                )
        print(f"{args.jobs} jobs in {time.perf_counter() - started:.1f} s")
    finally:
        starling("down", "--cluster", "memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())

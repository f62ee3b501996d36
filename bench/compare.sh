#!/usr/bin/env bash
# Map throughput of starling against ipyparallel, dask.distributed and multiprocessing, each with
# 2 workers on this machine, on the workloads of benches/throughput.rs. Prints one table.
#
#   bench/compare.sh [--runs N]     # N: runs per workload for the Python side, best counts (3)
#   bench/compare.sh --python-client [--runs N]
#                                   # starling's Python client against ipyparallel instead:
#                                   # apply, maps, push/pull, the seed (bench/python_client.py)
#
# Creates bench/.venv (git-ignored) with the pinned frameworks of bench/requirements.txt on first
# use. Takes about 6 minutes on 2 cores once the release build is warm. Everything listens on
# 127.0.0.1 only and every process started is stopped again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

runs=3
python_client=0
while (($#)); do
  case "$1" in
    --runs) runs="${2:?--runs needs a number}"; shift 2 ;;
    --python-client) python_client=1; shift ;;
    *) echo "bench/compare.sh: unknown argument '$1' (use --runs N, --python-client)" >&2; exit 2 ;;
  esac
done

if ((python_client)); then
  # The package built optimised into .venv-python (what `scripts/python.sh build` makes, with
  # the release profile), ipyparallel beside it in the same venv, then both systems in one run.
  PROFILE=release scripts/python.sh build
  .venv-python/bin/python -m pip install --quiet --disable-pip-version-check \
    "$(grep '^ipyparallel==' bench/requirements.txt)"
  exec .venv-python/bin/python bench/python_client.py --runs "$runs"
fi

venv=bench/.venv
if [[ ! -x "$venv/bin/python" ]]; then
  echo "== creating $venv" >&2
  python3 -m venv "$venv"
fi
echo "== installing bench/requirements.txt into $venv" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt

out="$(mktemp -d "${TMPDIR:-/tmp}/starling-bench.XXXXXX")"
trap 'rm -rf "$out"' EXIT
failed=()

step() { # step NAME COMMAND...: run COMMAND, its stdout into $out/NAME.tsv and shown on stderr
  local name="$1" start=$SECONDS
  shift
  echo "== $name: $*" >&2
  if ! "$@" >"$out/$name.tsv"; then
    failed+=("$name")
    echo "== $name FAILED" >&2
  fi
  cat "$out/$name.tsv" >&2
  echo "== $name took $((SECONDS - start)) s" >&2
}

step starling cargo bench --bench throughput
for fw in ipyparallel dask multiprocessing; do
  step "$fw" "$venv/bin/python" bench/compare.py --runs "$runs" "$fw"
done

"$venv/bin/python" - "$out" <<'PY'
import os, re, sys

out = sys.argv[1]
frameworks = ["starling", "ipyparallel", "dask", "multiprocessing"]
workloads = ["lb_default", "lb_chunk1", "lb_chunk100", "direct_map", "montecarlo"]
line = re.compile(r"^([a-z0-9_]+)\t(\d+)\t([0-9.]+)\t(\d+)$")
results = {}  # (framework, workload) -> (count, seconds, per_second)
for fw in frameworks:
    path = os.path.join(out, f"{fw}.tsv")
    if os.path.exists(path):
        for text in open(path):
            m = line.match(text.strip())
            if m:
                results[fw, m[1]] = (int(m[2]), float(m[3]), float(m[4]))

def cell(fw, wl):
    r = results.get((fw, wl))
    if r is None:
        return "failed"
    count, seconds, rate = r
    text = f"{seconds:.2f} s" if wl == "montecarlo" else f"{rate:,.0f}/s"
    ref = results.get(("starling", wl))
    if ref is not None and ref[0] != count:
        text += f" (n={count:,})"
    return text

def ratio(wl):
    s, i = results.get(("starling", wl)), results.get(("ipyparallel", wl))
    if s is None or i is None:
        return "-"
    return f"{s[2] / i[2]:,.1f}x"

header = ["workload", *frameworks, "starling/ipyparallel"]
rows = [[wl, *(cell(fw, wl) for fw in frameworks), ratio(wl)] for wl in workloads]
widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
def fmt(r):
    return "| " + " | ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    ) + " |"
print(fmt(header))
print("|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|")
for r in rows:
    print(fmt(r))
print()
print("items/s (montecarlo: seconds for 2*10^7 samples); n= where fewer items ran than for starling;")
print("starling/ipyparallel is the ratio of throughputs (montecarlo: of samples/s), >1 = starling faster.")
PY

if ((${#failed[@]})); then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi

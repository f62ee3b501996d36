#!/usr/bin/env bash
# Builds starling, starts a local cluster of 4 engines, runs a first `px` on every engine and
# takes the cluster down again (so the README's session starts from a clean slate); then builds
# the Python package into .venv-python and says how to use it from IPython.
set -euo pipefail
cd "$(dirname "$0")/.."
# The examples too: with the dev-dependencies' features in this one build, `cargo run --release
# --example hello` afterwards compiles only the example.
cargo build --release --bins --examples
BIN="${CARGO_TARGET_DIR:-$PWD/target}/release"
export PATH="$BIN:$PATH"
starling up --local -n 4 --name quickstart
trap 'starling down quickstart >/dev/null' EXIT
starling px --cluster quickstart 'import os; print(os.getpid()); sum(range(101))'
starling down quickstart
trap - EXIT
PROFILE=release scripts/python.sh build
echo
echo "starling works. Add $BIN to your PATH, then try the README's session:"
echo "  starling up --local -n 4        starling px 'x = 1'        starling down"
echo "From Python: .venv-python/bin/ipython, then"
echo "  from starling import Cluster; cluster = Cluster(n=4); rc = cluster.start_and_connect()"
echo "  %px x                    and when done: cluster.stop()"
echo "For Jupyter: .venv-python/bin/pip install jupyterlab && .venv-python/bin/jupyter lab"

#!/usr/bin/env bash
# Builds starling, starts a local cluster of 4 engines and runs a first `px` on every engine;
# then builds the Python package into .venv-python and says how to use it from IPython.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
export PATH="$PWD/target/release:$PATH"
starling up --local -n 4
starling px 'import os; print(os.getpid()); sum(range(101))'
PROFILE=release scripts/python.sh build
echo
echo "The cluster is up. Add $PWD/target/release to your PATH, then try:"
echo "  starling status        starling px 'x = 1'        starling down"
echo "From Python: .venv-python/bin/ipython, then"
echo "  from starling import Client; rc = Client(); %px x"
echo "For Jupyter: .venv-python/bin/pip install jupyterlab && .venv-python/bin/jupyter lab"

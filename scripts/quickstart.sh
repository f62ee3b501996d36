#!/usr/bin/env bash
# Builds starling, starts a local cluster of 4 engines and runs a first `px` on every engine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
export PATH="$PWD/target/release:$PATH"
starling up --local -n 4
starling px 'import os; print(os.getpid()); sum(range(101))'
echo
echo "The cluster is up. Add $PWD/target/release to your PATH, then try:"
echo "  starling status        starling px 'x = 1'        starling down"

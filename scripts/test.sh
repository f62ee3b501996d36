#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then checks formatting,
# lints, and runs every test: unit tests, integration tests that start real starlingd processes
# with real python3 kernels on loopback, and the end-to-end suite (LocalStack's EC2 API and a
# real sshd in a private network namespace; tests/e2e/run.sh installs and starts them).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
command -v bash >/dev/null || need_apt+=(bash)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# MPI engines and `starling mpirun` (tests/local/mpi.rs, the end-to-end MPI cluster).
command -v mpiexec >/dev/null || need_apt+=(openmpi-bin)
command -v ssh-keygen >/dev/null || need_apt+=(openssh-client)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "installing: ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --features starling/e2e --locked -- -D warnings
echo "== Python: build the package (maturin) into .venv-python"
# Installs maturin, cloudpickle, pytest, IPython, nbclient, mpi4py, ... into .venv-python
# itself; the Rust tests of MPI engines use that venv's Python (it has mpi4py and NumPy).
# Every build here is `--workspace`: the dependencies' features are then the same in each (the
# Python crate's included), so aws-sdk-ec2 and its stack are compiled once, not once per build.
scripts/python.sh wheel
echo "== cargo test"
# A hung test fails here, loudly and in time, instead of running into CI's limit.
timeout 1800 cargo test --locked --workspace
echo "== Python: ruff, pytest"
# The package, and the scripts beside it (benchmarks, examples, the rig's helper) under the
# same settings (ruff.toml extends python/pyproject.toml). src/engine/kernel.py is left out:
# it keeps %-formatting.
.venv-python/bin/ruff check python bench examples tests/e2e
.venv-python/bin/ruff format --check python bench examples tests/e2e
timeout 1200 scripts/python.sh test
echo "== end-to-end: EC2 (LocalStack) and SSH clusters"
timeout 1800 tests/e2e/run.sh

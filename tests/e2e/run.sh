#!/usr/bin/env bash
# The end-to-end suite: LocalStack's EC2 API and a real OpenSSH server in a private network
# namespace that has nothing but loopback, so no test traffic can leave this machine.
#
#   tests/e2e/run.sh            # install what is missing, build, run the suite
#   tests/e2e/run.sh CMD ...    # the same rig, running CMD instead (benchmarks, a shell)
#
# Needs root (unshare -n, sshd). Everything is installed and built *before* entering the
# namespace: there is no registry in there.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

if [ "$(id -u)" != 0 ]; then
    echo "tests/e2e/run.sh needs root (a network namespace and sshd); run it with sudo" >&2
    exit 1
fi

# What the rig runs on.
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null || need+=(openssh-client)
command -v ip >/dev/null || need+=(iproute2)
command -v unshare >/dev/null || need+=(util-linux)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# LocalStack without Docker, pinned (tests/e2e/requirements-localstack.txt).
VENV=$ROOT/.venv-localstack
STAMP=$VENV/.requirements
if ! cmp -s tests/e2e/requirements-localstack.txt "$STAMP" 2>/dev/null; then
    echo "installing LocalStack into $VENV" >&2
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r tests/e2e/requirements-localstack.txt
    cp tests/e2e/requirements-localstack.txt "$STAMP"
fi

# Build everything the suite runs (the suite and both binaries), then enter the namespace.
# `--workspace`, like every build in scripts/test.sh: the dependencies' features are then the
# same in every build (the Python crate's included), and nothing is compiled twice.
cargo test --locked --workspace --features starling/e2e --test e2e --no-run
export STARLING_E2E_VENV=$VENV
# The Python package's venv (scripts/python.sh build): the Python client's end-to-end test.
export STARLING_E2E_PYTHON=$ROOT/.venv-python/bin/python
if [ $# -eq 0 ]; then
    set -- cargo test --offline --locked --workspace --features starling/e2e --test e2e -- --test-threads=4
fi
exec unshare -n "$ROOT/tests/e2e/inside.sh" "$@"

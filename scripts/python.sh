#!/usr/bin/env bash
# Builds the Python package `starling` (distribution starling-cluster) into a venv, with
# `starlingd` inside it, and runs pytest on it:
#
#   scripts/python.sh              # build into .venv-python (created if missing), the wheel, pytest
#   scripts/python.sh build        # only build and install
#   scripts/python.sh wheel        # build, install, and also make the wheel (target/wheels/)
#   scripts/python.sh test ARGS    # pytest ARGS, without rebuilding
#
# STARLING_VENV chooses the venv; PROFILE=release builds optimised (benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${STARLING_VENV:-$ROOT/.venv-python}
PROFILE=${PROFILE:-dev}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
DIR=$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
what=${1:-all}

if [ "$what" != test ]; then
    if ! cmp -s python/requirements-dev.txt "$VENV/.requirements" 2>/dev/null; then
        echo "installing the Python build and test dependencies into $VENV" >&2
        [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q --disable-pip-version-check -r python/requirements-dev.txt
        cp python/requirements-dev.txt "$VENV/.requirements"
    fi
    # The dev build is the one `cargo test --workspace` makes (same features: python/Cargo.toml
    # says why), so maturin below compiles only the binding itself.
    if [ "$PROFILE" = dev ]; then
        cargo build --locked --workspace --all-targets
    else
        cargo build --locked --workspace --profile "$PROFILE" --bins
    fi
    mkdir -p python/starling/bin
    cp "$TARGET/$DIR/starlingd" python/starling/bin/starlingd.new
    mv -f python/starling/bin/starlingd.new python/starling/bin/starlingd
    (cd python && VIRTUAL_ENV=$VENV "$VENV/bin/maturin" develop --quiet --locked --profile "$PROFILE" >&2)
fi
[ "$what" = build ] && exit 0
if [ "$what" = wheel ] || [ "$what" = all ]; then
    # The abi3 wheel a user installs with pip, starlingd inside (pyproject.toml's include);
    # the same build as above, so this only packs it. test_the_wheel_alone... installs it.
    rm -f "$TARGET"/wheels/starling_cluster-*.whl
    (cd python && "$VENV/bin/maturin" build --quiet --locked --profile "$PROFILE" --out "$TARGET/wheels" >&2)
    ls "$TARGET"/wheels/starling_cluster-*.whl >&2
    [ "$what" = wheel ] && exit 0
fi
[ "$what" = test ] && shift || true
[ "$what" = all ] && shift || true
export PATH="$TARGET/$DIR:$VENV/bin:$PATH"
[ $# -gt 0 ] || set -- python/tests
exec "$VENV/bin/python" -m pytest "$@"

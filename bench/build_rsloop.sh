#!/usr/bin/env bash
# Build and install rsloop (a peer in the benchmarks) into the current Python environment.
#
# rsloop publishes only an sdist, pinned to a nightly Rust (rust-toolchain.toml). Where rustup can
# install that nightly, `python -m pip install rsloop` is enough. Otherwise this script builds it
# with whatever nightly rustup already has: it removes the pin and enables the one library feature
# (allocator_api) that older nightlies still gate. The loop's code is not changed.
set -euo pipefail
PY=${PYTHON:-python3}
VERSION=${1:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
RUSTUP_TOOLCHAIN=nightly "$PY" -m pip download --no-deps --no-binary :all: -q -d "$work" "rsloop${VERSION:+==$VERSION}"
tar -xzf "$work"/rsloop-*.tar.gz -C "$work"
src=$(echo "$work"/rsloop-*/)
rm -f "$src/rust-toolchain.toml"
grep -q 'feature(allocator_api)' "$src/src/lib.rs" || sed -i '1i #![feature(allocator_api)]' "$src/src/lib.rs"
RUSTUP_TOOLCHAIN=nightly "$PY" -m pip install --no-deps -q "$src"
"$PY" -c 'import rsloop; print("rsloop", rsloop.__version__, "installed")'

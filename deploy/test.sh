#!/usr/bin/env bash
# The test command: installs what the tests need, checks formatting and lints, runs every test.
# Usage: deploy/test.sh            (CI runs this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/install-deps.sh
deploy/fetch-guest.sh >/dev/null

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
# The fuzz targets (tests/tests/fuzz_parsers.rs: API bodies, snapshot state file, store
# manifest, fw_cfg ports and DMA) run a few seconds each within the suite; for a longer run:
#   SNAPVISOR_FUZZ_SECS=600 cargo nextest run --release -p snapvisor-tests --test fuzz_parsers
export SNAPVISOR_FUZZ_SECS="${SNAPVISOR_FUZZ_SECS:-2}"
cargo build --workspace --locked --release --bins
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --release --no-fail-fast
else
    cargo test --workspace --locked --release --no-fail-fast
fi

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
cargo build --workspace --locked --release --bins
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --release --no-fail-fast
else
    cargo test --workspace --locked --release --no-fail-fast
fi

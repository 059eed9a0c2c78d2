#!/usr/bin/env bash
# The main job: build snapvisor and show it working on this machine's KVM.
# Usage: deploy/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/install-deps.sh
cargo build --release --locked --bin snapvisor
sv=target/release/snapvisor

echo "== snapvisor run --builtin hello"
$sv run --builtin hello --mem-mib 16
echo "== snapvisor run --builtin fwcfg"
$sv run --builtin fwcfg --mem-mib 16
echo "== snapvisor run --builtin memfill (256 MiB, 2 passes)"
$sv run --builtin memfill --mem-mib 256 --passes 2 --seed 7
echo "== snapvisor bench boot"
$sv bench boot --iterations 20 --idle-vms 50

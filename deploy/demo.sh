#!/usr/bin/env bash
# The main job: build snapvisor and show it working on this machine's KVM: the built-in
# guests, a live snapshot of a running guest restored eagerly and lazily, the store, and the
# benchmarks. Usage: deploy/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/install-deps.sh
cargo build --release --locked --bin snapvisor
sv=target/release/snapvisor
store="$(mktemp -d)/store"
trap 'rm -rf "$(dirname "$store")"' EXIT

step() { printf '\n== %s\n' "$*"; }

step "snapvisor run --builtin hello"
$sv run --builtin hello --mem-mib 16
step "snapvisor run --builtin fwcfg"
$sv run --builtin fwcfg --mem-mib 16
step "snapvisor run --builtin memfill (256 MiB, 2 passes)"
$sv run --builtin memfill --mem-mib 256 --passes 2 --seed 7

step "live snapshot of a running memfill guest after 500 ms"
$sv run --builtin memfill --mem-mib 256 --seed 9 --passes 8 \
    --snapshot-after-ms 500 --store "$store" --name demo --live --exit-after-snapshot
step "eager restore: the guest carries on from the next pass"
$sv restore --store "$store" demo
step "lazy restore through userfaultfd"
$sv restore --store "$store" demo --lazy
step "the store"
$sv store list --store "$store"
$sv store du --store "$store"
$sv store verify --store "$store"

step "snapvisor bench boot"
$sv bench boot --iterations 20 --idle-vms 50
step "snapvisor bench restore"
$sv bench restore --mem-mib 256,1024

step "the daemon: a VM, a live snapshot, five lazy clones"
sock="$(dirname "$store")/api.sock"
$sv serve --socket "$sock" --state-dir "$(dirname "$store")/state" &
daemon=$!
trap 'kill $daemon 2>/dev/null || true; wait $daemon 2>/dev/null || true; rm -rf "$(dirname "$store")"' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
$sv vm create source --builtin memfill --mem-mib 256 --start --socket "$sock"
sleep 1
$sv snapshot create source golden --live --socket "$sock"
start=$(date +%s%N)
$sv snapshot clone golden --prefix clone --count 5 --mode lazy --socket "$sock"
echo "5 lazy clones running after $(( ($(date +%s%N) - start) / 1000000 )) ms"
sleep 1
$sv vm serial clone0 --socket "$sock" | tail -2
$sv vm list --socket "$sock"
kill -TERM $daemon
wait $daemon

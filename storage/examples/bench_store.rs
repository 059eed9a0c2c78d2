//! `snapvisor bench store` before the binary wires it in: the same argument struct and code
//! (`hypervisor/src/bench/store.rs`). Run:
//! `cargo run --release -p storage --example bench_store -- [--json] [--size-mib N] ...`

#[path = "../../hypervisor/src/bench/store.rs"]
mod bench_store;

use clap::Parser;

#[derive(Debug, clap::Parser)]
struct Cli {
    #[command(flatten)]
    args: bench_store::BenchStoreArgs,
}

fn main() -> Result<(), storage::StoreError> {
    bench_store::run(Cli::parse().args)
}

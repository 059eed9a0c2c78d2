//! Runs the store's integration tests from `tests/tests/store_*.rs` as part of
//! `cargo test -p storage`, so they run (and gate this crate) without building the
//! hypervisor crate the `tests` package also depends on. Once the whole workspace builds,
//! this file may go; the tests themselves live in the `tests` package.

#[path = "../../tests/tests/store_api.rs"]
mod store_api;
#[path = "../../tests/tests/store_concurrency.rs"]
mod store_concurrency;
#[path = "../../tests/tests/store_crash.rs"]
mod store_crash;
#[path = "../../tests/tests/store_full.rs"]
mod store_full;

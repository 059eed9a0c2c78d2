//! `--store-codec`: how a store compresses the chunks new snapshots add. The trade-off
//! (storage/src/lib.rs has the measurements): zstd -1, the default, stores touch's 1 GiB
//! in 261 MiB at ~1 CPU-s per GiB; LZ4 takes about a quarter less CPU (a 1 GiB full snapshot
//! of touch in 0.68-0.72 s instead of 0.78-1.18 s on two idle cores here) and stores 40%
//! more (366 MiB). The codec is per chunk: a store may hold both, and every build since
//! December 2026 reads both; builds before LZ4 refuse its chunks by name ("unknown codec 3").

/// How a store compresses new chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreCodec {
    /// zstd at the store's level (-1): fewer bytes.
    #[default]
    Zstd,
    /// LZ4: less CPU per snapshot, about 1.2-1.4x the bytes.
    Lz4,
}

impl StoreCodec {
    /// Store options that write new chunks with this codec.
    pub fn options(self) -> storage::StoreOptions {
        storage::StoreOptions { lz4: self == StoreCodec::Lz4, ..Default::default() }
    }
}

//! The VM snapshot state model: the state file format, the RAM-block checks made before a
//! load writes anything, and copying RAM blocks to and from the store.

pub mod check;
pub mod format;
pub mod ram_io;

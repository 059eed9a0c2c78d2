//! Loading what a VM boots: Linux kernels by the Linux boot protocol (built-in guests are
//! loaded by [`crate::guests`]).

pub mod files;
pub mod firmware;
pub mod linux;

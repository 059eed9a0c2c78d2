//! snapvisor's hypervisor: KVM VMs and vCPUs, machine assembly, boot, built-in guests, the
//! command line and the benchmarks.

pub mod acpi;
pub mod bench;
pub mod boot;
pub mod cli;
pub mod control;
pub mod cpu;
pub mod exit_profile;
pub mod guests;
pub mod irq_routes;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod net;
pub mod platform;
pub mod reset;
pub mod service;
pub mod shell;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

//! `vmm`: a KVM microVM monitor with an embedded default guest.
//!
//! A [`Vm`] owns guest RAM ([`memory::GuestRam`], one KVM memory slot per
//! region, described by [`memory::RegionDesc`] for whoever mirrors it), an
//! 8250 serial console, a report device, a userfaultfd fault handler
//! ([`uffd::FaultHandler`]) and one thread per vCPU. The default guest
//! ([`guest`]) is assembled from source in this crate; the VMM builds its page
//! tables and descriptor tables and starts every vCPU directly in ring 3, so
//! that nothing runs at CPL0 (which shadow-paging hosts emulate slowly).
//!
//! Memory release and demand faults: [`Vm::release_range`] arms userfaultfd
//! on a guest range and drops its backing through the stage-2 gather; the
//! next touch faults into the handler, which installs zeros and tells a
//! [`uffd::FaultHook`] (the stage-2 table) with a begin/commit protocol. [`Vm::destroy`] is the single
//! teardown path.
//!
//! Guest memory is mirrored by a guest-mm stage-2 table ([`stage2`]):
//! releases and teardown go through its gather, demand faults commit into it
//! with its sequence protocol, and host-side reads and writes of guest memory
//! go through its lockless fast walk.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod api;
pub mod devices;
pub mod guest;
pub mod memory;
pub mod proc_stats;
pub mod stage2;
pub mod uffd;
pub mod vstate;

pub use devices::serial::Console;
pub use guest::Workload;
pub use memory::{Backing, GuestRam, MemSize, MemoryError, PageSize, RegionDesc};
pub use stage2::{GuestAccess, Stage2, Stage2Error, TeardownStats};
pub use uffd::{FaultHook, FaultStats, FaultSummary, NoHook, UffdError};
pub use vstate::vm::{Reclaimed, Teardown, Vm, VmConfig, VmError};

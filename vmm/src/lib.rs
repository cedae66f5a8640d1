//! `vmm`: a KVM microVM monitor with an embedded default guest.
//!
//! A [`Vm`] owns a KVM VM, its guest memory ([`VmMemory`]), an 8250 serial
//! console, a report device, optionally a virtio-balloon, and one thread
//! per vCPU. The default guest ([`guest`]) is assembled from source in this
//! crate; the VMM builds its page tables and descriptor tables and starts
//! every vCPU directly in ring 3, so that nothing runs at CPL0 (which
//! shadow-paging hosts emulate slowly).
//!
//! With [`VmConfig::linux`] the VM boots a real Linux kernel instead
//! ([`boot`]: linux-loader, MP table, CPUID, boot vCPU state; the in-kernel
//! irqchip and the legacy devices in [`devices::legacy`]).
//!
//! Guest memory has one owner, [`VmMemory`] (`vstate/memory/`): the host
//! mappings and files (anonymous, memfd, hugetlb or a KVM guest_memfd), the
//! KVM memory slots, the guest-mm stage-2 table that mirrors them
//! ([`stage2`]), the userfaultfd handler ([`uffd`]), and the one release
//! entry point, [`VmMemory::release`], used by [`Vm::release_range`] and
//! the balloon (inflate, free page reporting), and
//! [`VmMemory::release_all`], used by teardown: demand faults armed first,
//! then one stage-2 gather. A released page's next touch faults into the
//! handler, which installs zeros and tells a [`FaultHook`] (the stage-2
//! table) with a begin/commit protocol (guest_memfd: the kernel refills it
//! on its own). Host-side reads and writes of guest memory go through the
//! table's lockless fast walk ([`GuestAccess`]). [`Vm::destroy`] is the
//! single teardown path.
//!
//! `memory`, `stage2` and `uffd` are re-exported at the crate root (the
//! paths the guest, the devices and the tools use).
#![deny(unsafe_op_in_unsafe_fn)]

pub mod api;
pub mod boot;
pub mod child;
pub mod devices;
pub mod guest;
pub mod proc_stats;
pub mod seccomp;
pub mod service;
pub mod vstate;

/// `vmm`'s exit status when this host cannot run what was asked as it
/// stands (no usable `/dev/kvm`, a KVM capability missing, too few free
/// huge pages; [`VmError::host_cannot`]): nothing ran. Other errors exit
/// with 2, a guest that failed with 1.
pub const EXIT_HOST_CANNOT: u8 = 3;

pub use devices::serial::Console;
pub use guest::Workload;
pub use vstate::memory;
pub use vstate::memory::{
    stage2, uffd, Backing, FaultHook, FaultStats, FaultSummary, GuestAccess, MemSize, MemoryConfig,
    MemoryError, NoHook, PageSize, RegionDesc, ReleaseError, ReleaseMode, Stage2, Stage2Error,
    TeardownStats, UffdError, VmMemory,
};
pub use vstate::vm::{EndWaiter, Reclaimed, Teardown, Vm, VmConfig, VmError};

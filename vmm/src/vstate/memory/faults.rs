//! Failure injection on the monitor's guest-memory system calls (issue 13),
//! the monitor's counterpart of guest-mm's [`guest_mm::FaultInjection`]
//! (which covers the release calls: `madvise`, `process_madvise`,
//! punch-hole, reachable as `VmMemory::stage2().table().faults`).
//!
//! One [`MemoryFaults`] belongs to a [`super::VmMemory`]
//! ([`super::VmMemory::faults`]; [`super::VmMemory::with_faults`] hands one
//! in before the memory slots are made). Every point is a
//! [`guest_mm::FailPoint`]: off, it costs one relaxed load, and the
//! userfaultfd resolution (the fault path) consults its points only after
//! the kernel delivered a fault, never on a guest access that does not
//! fault. What each failure leads to (`docs/DESIGN.md`, "Failure
//! injection"):
//!
//! | point | call | on failure |
//! |---|---|---|
//! | `uffd_register` | `UFFDIO_REGISTER` (arming a release) | retried; then the release fails with `Arm` before its gather: nothing released, the table unchanged |
//! | `uffd_zeropage` | `UFFDIO_ZEROPAGE` | the zero page is copied in instead (`UFFDIO_COPY`) |
//! | `uffd_copy` | `UFFDIO_COPY` | (hugetlb, or after a zero-page failure) nothing is installed and nothing committed: the table keeps its marker, the thread is woken and faults again |
//! | `uffd_wake` | `UFFDIO_WAKE` | retried; then kept and retried by the handler's loop every few ms, so the faulting thread is never left asleep |
//! | `memslot` | `KVM_SET_USER_MEMORY_REGION(2)` | the slots made so far are deleted again, the error is returned: no slot refers to RAM that is unmapped |
//! | `munmap` | `munmap` of guest RAM at close | retried; then the mapping (and its file) is kept, counted ([`leaked_ram_bytes`] once nobody can retry) and unmapped by a later close |

use std::sync::atomic::{AtomicU64, Ordering};

use guest_mm::FailPoint;

/// Attempts of one monitor-side memory system call before its failure is
/// handled as the table above says.
pub const SYSCALL_ATTEMPTS: u32 = 3;

/// The injectable failure points of one VM's memory.
#[derive(Debug, Default)]
pub struct MemoryFaults {
    /// `UFFDIO_REGISTER` of a range about to be released.
    pub uffd_register: FailPoint,
    /// `UFFDIO_ZEROPAGE` resolving a demand fault.
    pub uffd_zeropage: FailPoint,
    /// `UFFDIO_COPY` (of zeros) resolving a demand fault.
    pub uffd_copy: FailPoint,
    /// `UFFDIO_WAKE` of the faulting thread.
    pub uffd_wake: FailPoint,
    /// `KVM_SET_USER_MEMORY_REGION(2)` registering a memory slot.
    pub memslot: FailPoint,
    /// `munmap` of a guest RAM mapping at close.
    pub munmap: FailPoint,
}

/// Bytes of guest RAM that could not be unmapped and were given up on
/// (a `VmMemory` dropped while its `munmap` still failed). Process wide.
static LEAKED_RAM: AtomicU64 = AtomicU64::new(0);

/// Bytes of guest RAM mappings given up on after failed `munmap`s: still
/// mapped, never to be used again. 0 unless a `munmap` failed for good.
pub fn leaked_ram_bytes() -> u64 {
    LEAKED_RAM.load(Ordering::Relaxed)
}

pub(super) fn note_leaked_ram(bytes: u64) {
    LEAKED_RAM.fetch_add(bytes, Ordering::Relaxed);
}

//! Guest memory and its one owner, [`VmMemory`].
//!
//! A VM's guest memory is a set of host mappings (and, for file backings,
//! the files behind them), registered with KVM as memory slots, mirrored by
//! a guest-mm stage-2 table, and watched by a userfaultfd handler for the
//! ranges that were given back. `VmMemory` owns all of it, and it alone
//! releases memory:
//!
//! | module | what |
//! |---|---|
//! | [`backing`] | sizes, backing kinds (anon, memfd, hugetlb, guest_memfd), the mappings and files, KVM slots |
//! | [`stage2`] | the stage-2 table mirroring the slots, its KVM-side subscriber and fault hook, [`GuestAccess`] |
//! | [`uffd`] | the userfaultfd handler (demand faults on released ranges) |
//! | [`release`] | the one release entry point ([`VmMemory::release`]) and the teardown's ([`VmMemory::release_all`]) |
//! | [`populate`] | host-side populate, residency |
//! | [`report`] | [`MemoryReport`]: census of the table and counters (`GET /memory`) |
//!
//! **Invariants.**
//! - Every release of guest memory goes through [`VmMemory::release`]
//!   (`Vm::release_range`, balloon inflate, free page reporting) or
//!   [`VmMemory::release_all`] (teardown): demand faults armed first, then
//!   one stage-2 gather. The only other place that drops pages is the fault
//!   handler taking back its own install when the table refused the commit
//!   (`uffd.rs`, `undo`): memory the table never saw, so no gather applies.
//! - The files are [`std::os::fd::OwnedFd`]s owned here; the stage-2
//!   backing registry and [`RegionDesc::files`] only borrow their numbers. The
//!   table is made dying ([`VmMemory::release_all`], also run on drop if
//!   nobody did) before the files are closed, so a table someone still
//!   holds can never release through a closed (or reused) descriptor.
//! - Teardown order: [`VmMemory::release_all`] (memory back with the host)
//!   while the KVM VM still exists, then the VM is dropped (its slots
//!   refer to the mappings, and it holds a reference on a guest_memfd),
//!   then [`VmMemory::close`]: handler stopped, mappings unmapped, files
//!   closed.
//!
//! **Concurrency and locking.** `VmMemory` is shared (`Arc`) by the VM and
//! the balloon device; every method takes `&self`. Releases may run from
//! any thread at once: the gather serialises them on the table lock and
//! its pending-flush protocol. Arming takes the fault handler's lock
//! exclusively, only while registering; a resolution takes it shared; the
//! gather runs with it released (a fast-walk reader pinned in the gather's
//! grace period may be the faulting thread). Lock order: fault-handler lock
//! → (registered-range list); the table's locks are never held while the
//! fault-handler lock is taken.

pub mod backing;
pub mod faults;
pub mod populate;
pub mod release;
pub mod report;
pub mod stage2;
pub mod uffd;

use std::sync::Arc;

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

pub use backing::{
    check_backing, check_guest_memfd, free_huge_pages, Backing, GuestRam, MemSize, MemoryError,
    PageSize, RegionDesc, RegionFiles, GUARD, MAX_MEM_BYTES, SIZE_2M, SIZE_4K,
};
pub use faults::{leaked_ram_bytes, MemoryFaults};
pub use release::{ReleaseError, ReleaseMode};
pub use report::MemoryReport;
pub use stage2::{GuestAccess, KvmSide, Stage2, Stage2Error, TeardownStats};
pub use uffd::{FaultHandler, FaultHook, FaultStats, FaultSummary, NoHook, UffdError};

/// What guest memory to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Size.
    pub size: MemSize,
    /// Backing kind.
    pub backing: Backing,
    /// Leaf (and release) size.
    pub page_size: PageSize,
}

/// A VM's guest memory: mappings, files, KVM slots, the stage-2 table, the
/// userfaultfd handler, and the one way memory goes back to the host.
pub struct VmMemory {
    // Drop order (see `Drop`): the handler is stopped and the table made
    // dying before the mappings are unmapped and the files closed.
    faults: Option<FaultHandler>,
    stats: Arc<FaultStats>,
    stage2: Stage2,
    ram: GuestRam,
    /// Injection points ([`faults`]), shared with the handler and `ram`.
    inject: Arc<MemoryFaults>,
}

impl std::fmt::Debug for VmMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmMemory")
            .field("ram", &self.ram)
            .field("stage2", &self.stage2)
            .field("faults", &self.stats.summary())
            .finish()
    }
}

impl VmMemory {
    /// Allocates and maps guest RAM, registers it with `vm` as KVM memory
    /// slots (none without a VM: device tests), mirrors it in a stage-2
    /// table and starts the userfaultfd handler (not for guest_memfd,
    /// which userfaultfd cannot watch), whose resolutions `hook` sees
    /// after the table's.
    ///
    /// With `vm`, the caller must drop the VM before this memory.
    pub fn new(
        cfg: MemoryConfig,
        hook: Arc<dyn FaultHook>,
        vm: Option<&VmFd>,
    ) -> Result<Self, MemoryError> {
        Self::with_faults(cfg, hook, vm, Arc::default())
    }

    /// [`VmMemory::new`] with injection points `faults` (tests: the memory
    /// slots are made here, before [`VmMemory::faults`] could be reached).
    pub fn with_faults(
        cfg: MemoryConfig,
        hook: Arc<dyn FaultHook>,
        vm: Option<&VmFd>,
        faults: Arc<MemoryFaults>,
    ) -> Result<Self, MemoryError> {
        let mut ram = GuestRam::new(cfg.size, cfg.backing, cfg.page_size, vm)?;
        // Reads the cores and the shmem THP setting now (sysfs and cgroup
        // files), so that the teardown, which the memory-back time counts,
        // does not.
        release::teardown_release_threads(cfg.backing, cfg.page_size, cfg.size.bytes());
        ram.set_faults(Arc::clone(&faults));
        if let Some(vm) = vm {
            ram.register_slots(vm)?;
        }
        let regions = ram.regions();
        let stage2 = Stage2::mirror(&regions)?;
        let stats = Arc::new(FaultStats::default());
        let handler = if cfg.backing.has_demand_faults() {
            Some(FaultHandler::start(
                regions,
                stage2.fault_hook(hook),
                Arc::clone(&stats),
                Arc::clone(&faults),
            )?)
        } else {
            None
        };
        Ok(Self {
            faults: handler,
            stats,
            stage2,
            ram,
            inject: faults,
        })
    }

    /// Descriptions of every region.
    pub fn regions(&self) -> Vec<RegionDesc> {
        self.ram.regions()
    }

    /// Total size.
    pub fn size(&self) -> MemSize {
        self.ram.size()
    }

    /// Backing kind.
    pub fn backing(&self) -> Backing {
        self.ram.backing()
    }

    /// Leaf size.
    pub fn page_size(&self) -> PageSize {
        self.ram.page_size()
    }

    /// The vm-memory view (guest set-up, the vCPU loop's exception frames).
    /// Clones must not outlive this memory.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        self.ram.guest_memory()
    }

    /// The stage-2 table mirroring guest RAM.
    pub fn stage2(&self) -> &Stage2 {
        &self.stage2
    }

    /// A guest-memory accessor (fast walk) for the calling thread.
    pub fn access(&self) -> GuestAccess {
        self.stage2.access()
    }

    /// The injection points of the monitor's memory system calls (the
    /// release calls' are the table's: `stage2().table().faults`).
    pub fn faults(&self) -> &MemoryFaults {
        &self.inject
    }

    /// Demand-fault and release counters.
    pub fn fault_stats(&self) -> &FaultStats {
        &self.stats
    }

    /// Whether released pages come back through the userfaultfd handler
    /// (false for guest_memfd: the kernel refills them on its own).
    pub fn has_demand_faults(&self) -> bool {
        self.faults.is_some()
    }

    /// The region holding `[gpa, gpa + len)`, which must be whole leaves.
    pub fn checked_range(&self, gpa: u64, len: u64) -> Result<RegionDesc, MemoryError> {
        let granule = self.page_size().bytes();
        let bad = MemoryError::BadRange { gpa, len, granule };
        if len == 0 || !gpa.is_multiple_of(granule) || !len.is_multiple_of(granule) {
            return Err(bad);
        }
        self.ram
            .regions()
            .into_iter()
            .find(|d| d.contains(gpa, len))
            .ok_or(bad)
    }

    /// Stops the fault handler, makes sure the table is dying, unmaps
    /// guest RAM and closes its files. Returns the bytes unmapped. The
    /// KVM VM must be gone (its slots refer to the mappings).
    pub fn close(mut self) -> u64 {
        self.shut_down()
    }

    /// [`VmMemory::close`] that gives the memory back when a mapping could
    /// not be unmapped (its `munmap` failed every attempt): the error says
    /// how much is still mapped, and a later `try_close` (or the drop)
    /// unmaps it. Returns the bytes unmapped by this call.
    pub fn try_close(mut self) -> Result<u64, CloseError> {
        let unmapped = self.shut_down();
        let still_mapped = self.ram.mapped_bytes();
        if still_mapped > 0 {
            return Err(CloseError {
                unmapped,
                still_mapped,
                memory: Box::new(self),
            });
        }
        Ok(unmapped)
    }

    fn shut_down(&mut self) -> u64 {
        if !self.stage2.table().is_dying() {
            // Nobody released: do it now, so that no table can release
            // through a descriptor closed below. A failed release leaves
            // the memory to the munmap and close.
            let _ = self.release_all();
        }
        if let Some(mut f) = self.faults.take() {
            f.stop();
        }
        self.ram.unmap_all()
    }
}

/// Guest RAM that could not all be unmapped ([`VmMemory::try_close`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "unmapping guest RAM failed: {still_mapped:#x} bytes are still mapped ({unmapped:#x} were \
     unmapped); call try_close again to retry (a drop retries once more and counts what is \
     left in leaked_ram_bytes)"
)]
pub struct CloseError {
    /// Bytes unmapped by this attempt.
    pub unmapped: u64,
    /// Bytes still mapped.
    pub still_mapped: u64,
    /// The memory, to close again.
    pub memory: Box<VmMemory>,
}

impl Drop for VmMemory {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Anonymous guest memory of `size` (e.g. `"16M"`) with 4 KiB leaves and
/// no VM, for unit tests of the memory layer and the devices.
#[cfg(test)]
pub(crate) fn test_memory(size: &str) -> VmMemory {
    VmMemory::new(
        MemoryConfig {
            size: size.parse().expect("valid size"),
            backing: Backing::Anon,
            page_size: PageSize::Size4K,
        },
        Arc::new(NoHook),
        None,
    )
    .expect("guest memory")
}

#[cfg(test)]
mod tests {
    use guest_mm::{Gpa, PageState};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    fn memory(backing: Backing, page: PageSize) -> VmMemory {
        VmMemory::new(
            MemoryConfig {
                size: "8M".parse().unwrap(),
                backing,
                page_size: page,
            },
            Arc::new(NoHook),
            None,
        )
        .unwrap()
    }

    /// A release through the one entry point: the table holds markers, the
    /// memory is gone, and a host touch faults back in through the handler.
    fn release_then_touch(backing: Backing, page: PageSize) {
        let m = memory(backing, page);
        let gm = m.guest_memory();
        let gpa = 4 << 20;
        m.populate().unwrap();
        gm.write_obj(0x1234_u64, GuestAddress(gpa + 64)).unwrap();
        assert_eq!(m.resident_bytes_of(gpa, page.bytes()), page.bytes());
        let st = m
            .release(&[(gpa, page.bytes())], ReleaseMode::Discard)
            .unwrap();
        assert_eq!(st.released_bytes, page.bytes(), "{backing} {page}");
        assert_eq!(
            m.resident_bytes_of(gpa, page.bytes()),
            0,
            "{backing} {page}"
        );
        assert!(matches!(
            m.stage2().table().query(Gpa(gpa)),
            PageState::Discarded { .. }
        ));
        assert_eq!(gm.read_obj::<u64>(GuestAddress(gpa + 64)).unwrap(), 0);
        let s = m.fault_stats().summary();
        assert_eq!(
            (s.faults, s.releases, s.errors),
            (1, 1, 0),
            "{backing} {page}: {s:?}"
        );
        // Resolved pages stay; a second read does not fault.
        assert_eq!(gm.read_obj::<u64>(GuestAddress(gpa + 128)).unwrap(), 0);
        assert_eq!(m.fault_stats().summary().faults, 1);
        assert!(matches!(
            m.stage2().table().query(Gpa(gpa)),
            PageState::Present { .. }
        ));
    }

    #[test]
    fn anon_release_and_demand_fault() {
        release_then_touch(Backing::Anon, PageSize::Size2M);
        release_then_touch(Backing::Anon, PageSize::Size4K);
    }

    #[test]
    fn memfd_release_and_demand_fault() {
        release_then_touch(Backing::Memfd, PageSize::Size4K);
        release_then_touch(Backing::Memfd, PageSize::Size2M);
    }

    /// The boot's prefault makes exactly the pages of its ranges resident
    /// (whole 4 KiB pages, clipped to RAM), keeps their contents, and
    /// skips what lies outside RAM.
    #[test]
    fn prefault_populates_only_its_ranges_in_ram() {
        for backing in [Backing::Anon, Backing::Memfd] {
            let m = memory(backing, PageSize::Size4K);
            let gm = m.guest_memory();
            gm.write_obj(0xfeed_u64, GuestAddress(1 << 20)).unwrap();
            let before = m.resident_bytes();
            let ranges = [(1 << 20, 100), ((2 << 20) + 10, 8192), (7 << 20, 4 << 20)];
            let done = m.prefault(&ranges);
            // 1 page, 3 pages (the range straddles two page boundaries),
            // and the 1 MiB of the last range inside 8 MiB of RAM.
            assert_eq!(done, (4 << 12) + (1 << 20), "{backing}");
            assert_eq!(m.resident_bytes_of(2 << 20, 3 << 12), 3 << 12, "{backing}");
            assert_eq!(m.resident_bytes_of(7 << 20, 1 << 20), 1 << 20, "{backing}");
            assert_eq!(m.resident_bytes_of(3 << 20, 1 << 20), 0, "{backing}");
            assert_eq!(
                m.resident_bytes(),
                before + (3 << 12) + (1 << 20),
                "{backing}"
            );
            assert_eq!(gm.read_obj::<u64>(GuestAddress(1 << 20)).unwrap(), 0xfeed);
            assert_eq!(m.prefault(&[(8 << 20, 4096), (u64::MAX - 10, 100)]), 0);
        }
    }

    #[test]
    fn release_refuses_runs_outside_ram() {
        let m = memory(Backing::Anon, PageSize::Size4K);
        for (gpa, len) in [(8 << 20, 4096), (0, 0), (0x1800, 4096), (0, 4097)] {
            let e = m.release(&[(gpa, len)], ReleaseMode::Discard).unwrap_err();
            assert!(
                matches!(e, ReleaseError::OutsideRam { gpa: g, len: l } if (g, l) == (gpa, len)),
                "{e:?}"
            );
        }
        assert_eq!(m.fault_stats().summary().releases, 0);
        assert_eq!(m.stage2().table().stats().released_bytes, 0);
    }

    #[test]
    fn release_all_then_close() {
        let m = memory(Backing::Memfd, PageSize::Size4K);
        m.guest_memory()
            .write_slice(&[1u8; 1 << 20], GuestAddress(1 << 20))
            .unwrap();
        m.populate().unwrap();
        assert_eq!(m.resident_bytes(), 8 << 20);
        let t = m.release_all().unwrap();
        assert_eq!(t.released_bytes, 8 << 20);
        assert_eq!(t.table_pages_left, 1);
        assert_eq!(m.resident_bytes(), 0);
        assert!(m.stage2().table().is_dying());
        assert_eq!(m.close(), 8 << 20);
    }

    #[test]
    fn drop_makes_the_table_dying_first() {
        let m = memory(Backing::Memfd, PageSize::Size4K);
        let table = Arc::clone(m.stage2().table());
        drop(m);
        assert!(table.is_dying(), "the files closed under a live table");
    }
}

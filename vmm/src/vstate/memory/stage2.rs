//! The VM's stage-2 table: guest-mm mirroring every KVM memory slot.
//!
//! KVM keeps its own EPT/shadow tables in the kernel; this table is the
//! VMM's authoritative per-page map of guest RAM (present, discarded,
//! ballooned, permissions, leaf size, backing). Everything that takes
//! memory away from the guest goes through its gather, driven by the memory
//! owner ([`super::VmMemory::release`] while the guest runs,
//! [`super::VmMemory::release_all`] for the whole VM). Their flushes drive
//! the real invalidations: our translation caches, the [`KvmSide`]
//! subscriber, and the release (`madvise` / punch-hole), whose kernel
//! mmu_notifier (or, for a slot bound to a guest_memfd, KVM's guest_memfd
//! invalidation) zaps KVM's own entries for the range.
//!
//! Demand faults come back through the table's fault hook
//! ([`Stage2::fault_hook`]): the userfaultfd handler asks it for the leaf
//! size at the faulting page (`fault_granule`), reads the invalidation
//! sequence before it installs that leaf and commits what it installed with
//! its walker's `fault_in_range_if_unchanged` (lock-free: a compare-and-swap
//! in a read section, never behind a writer's table-lock hold), which
//! refuses (and the handler undoes and retries) if an invalidation ran in
//! between or a release is pending over the range, so a fault never
//! resurrects a page that an in-flight unmap is releasing.
//!
//! Device emulation and host-side checks read and write guest memory with a
//! [`GuestAccess`]: the lockless fast walk with a per-thread translation
//! cache, never a raw pointer kept across an invalidation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use guest_mm::{
    Access, BackingError, BackingKind, BackingRegion, FaultError, FaultSnapshot, Gpa,
    GuestMemoryView, Hva, Invalidation, InvalidationSubscriber, MapError, NewTableError, PageState,
    Perms, ReleaseError, Stage2Table, SubscribeError, TableConfig, UnmapError, WalkError, Walker,
};

use super::backing::{Backing, PageSize, RegionDesc, SIZE_2M};
use super::uffd::FaultHook;

/// Errors of the stage-2 layer.
#[derive(Debug, thiserror::Error)]
pub enum Stage2Error {
    /// Creating the table failed.
    #[error("creating the stage-2 table failed: {0}")]
    NewTable(#[from] NewTableError),
    /// Filling the table failed.
    #[error("building the stage-2 table failed: {0}")]
    Map(#[from] MapError),
    /// A region could not be registered as backing.
    #[error("registering guest RAM as stage-2 backing failed: {0}")]
    Backing(#[from] BackingError),
    /// The KVM-side subscriber could not be registered.
    #[error("registering the KVM invalidation subscriber failed: {0}")]
    Subscribe(#[from] SubscribeError),
    /// An unmap was refused.
    #[error("stage-2 unmap failed: {0}")]
    Unmap(#[from] UnmapError),
    /// The host refused to take memory back.
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// A guest access failed.
    #[error("guest memory access failed: {0}")]
    Walk(#[from] WalkError),
    /// The fault path refused.
    #[error("faulting guest memory back in failed: {0}")]
    Fault(#[from] FaultError),
}

impl Stage2Error {
    /// Whether the host refused what the table needs as it stands: the
    /// leaf arena's address-space reservation (an address-space limit).
    pub fn host_cannot(&self) -> bool {
        matches!(self, Stage2Error::NewTable(NewTableError::Reserve { .. }))
    }
}

/// The KVM side of invalidation. Releasing backing (`madvise`, punch-hole)
/// makes the host kernel's mmu_notifier (a guest_memfd slot: KVM's own
/// guest_memfd invalidation) zap KVM's stage-2 entries for the range, so
/// KVM needs no ioctl here; this subscriber counts what it
/// was told, and is where memslot changes (virtio-mem, hot-unplug) hook in.
#[derive(Debug, Default)]
pub struct KvmSide {
    /// invalidate_range_start calls.
    pub starts: AtomicU64,
    /// Bytes of guest-physical range invalidated (bounding ranges).
    pub bytes: AtomicU64,
    /// Whole-VM invalidations.
    pub full: AtomicU64,
}

impl InvalidationSubscriber for KvmSide {
    fn invalidate_range_start(&self, inv: &Invalidation) {
        self.starts.fetch_add(1, Ordering::Relaxed);
        if inv.full_mm {
            self.full.fetch_add(1, Ordering::Relaxed);
        } else {
            self.bytes
                .fetch_add(inv.end.0 - inv.start.0, Ordering::Relaxed);
        }
    }
}

/// What a whole-VM release through the gather did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct TeardownStats {
    /// Time of the full-mm gather (zap, invalidate, release), ms.
    pub gather_ms: f64,
    /// Time of the final grace period freeing the table pages, ms.
    pub barrier_ms: f64,
    /// Bytes of backing released by the gather.
    pub released_bytes: u64,
    /// Release system calls.
    pub release_calls: u64,
    /// Releases split across threads (all cores help at teardown).
    pub parallel_releases: u64,
    /// Of those, releases in which the releasing thread joined its
    /// idle-priority helpers before they were done: they fell below its
    /// slowest pace (the host's cores were busy) or a helper could not be
    /// spawned.
    pub background_joins: u64,
    /// Table pages left (the root only: 1).
    pub table_pages_left: u64,
    /// Longest table-lock hold during the whole VM's life, µs.
    pub max_lock_hold_us: f64,
}

/// The VM's stage-2 table and its KVM-side subscriber.
pub struct Stage2 {
    table: Arc<Stage2Table>,
    kvm: Arc<KvmSide>,
    unexpected_faults: Arc<AtomicU64>,
}

impl std::fmt::Debug for Stage2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage2")
            .field("stats", &self.table.stats())
            .finish_non_exhaustive()
    }
}

impl Stage2 {
    /// A table mirroring every region of `regions`: each region is
    /// registered as backing of its kind and mapped with leaves of its page
    /// size. The registry borrows the regions' files: their owner must make
    /// the table dying (tear it down) before it closes them.
    pub fn mirror(regions: &[RegionDesc]) -> Result<Stage2, Stage2Error> {
        // The table maps nothing past guest RAM: its leaf arena reserves
        // address space for that much only (1/512 of it).
        let top = regions
            .iter()
            .map(|r| r.gpa.0.saturating_add(r.len))
            .max()
            .unwrap_or(0)
            .max(1);
        let table = Stage2Table::new(TableConfig::with_limit(top))?;
        for r in regions {
            let host = r.host_addr as u64;
            let register = |hva: u64, len: u64, kind: BackingKind| {
                table.register_backing(BackingRegion {
                    hva: Hva(hva),
                    len,
                    kind,
                })
            };
            match (r.backing, r.files.first()) {
                (Backing::Anon, _) | (_, None) => {
                    register(host, r.len, BackingKind::Anonymous)?;
                }
                // A guest_memfd gives memory back like a memfd: punch a
                // hole. A memfd region may be split across files: one
                // backing region each.
                (Backing::Memfd | Backing::GuestMemfd, Some(_)) => {
                    for f in r.files.spans() {
                        let kind = BackingKind::SharedFile {
                            fd: f.fd,
                            offset: 0,
                        };
                        register(host + f.region_offset, f.len, kind)?;
                    }
                }
                (Backing::Hugetlb, Some(fd)) => {
                    let kind = BackingKind::Hugetlb {
                        page_size: SIZE_2M,
                        file: Some((fd, 0)),
                    };
                    register(host, r.len, kind)?;
                }
            }
            let hva = Hva(host);
            let leaf = match r.page_size {
                PageSize::Size2M => guest_mm::PageSize::Size2M,
                PageSize::Size4K => guest_mm::PageSize::Size4K,
            };
            table.map(Gpa(r.gpa.0), hva, r.len, Perms::RWX, leaf)?;
        }
        let kvm = Arc::new(KvmSide::default());
        table.register_subscriber(kvm.clone())?;
        Ok(Stage2 {
            table,
            kvm,
            unexpected_faults: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The table.
    pub fn table(&self) -> &Arc<Stage2Table> {
        &self.table
    }

    /// The KVM-side subscriber's counters.
    pub fn kvm_side(&self) -> &KvmSide {
        &self.kvm
    }

    /// Faults the table could not explain (not mapped, ballooned, dying).
    pub fn unexpected_faults(&self) -> u64 {
        self.unexpected_faults.load(Ordering::Relaxed)
    }

    /// The fault hook for the userfaultfd handler: the table's sequence
    /// protocol first, then `user` (tests and tools may observe faults).
    pub fn fault_hook(&self, user: Arc<dyn FaultHook>) -> Arc<dyn FaultHook> {
        Arc::new(TableFaultHook {
            table: self.table.clone(),
            user,
            user_seq: AtomicU64::new(0),
            unexpected: self.unexpected_faults.clone(),
        })
    }

    /// A guest-memory accessor for the calling thread.
    pub fn access(&self) -> GuestAccess {
        GuestAccess {
            walker: self.table.walker(),
        }
    }
}

thread_local! {
    /// The table's snapshot of the fault this thread is resolving, from
    /// `fault_begin` to `fault_commit` (a `Copy` value: no allocation).
    static SNAPSHOT: std::cell::Cell<Option<FaultSnapshot>> = const { std::cell::Cell::new(None) };
}

/// The userfaultfd handler's view of the table.
struct TableFaultHook {
    table: Arc<Stage2Table>,
    user: Arc<dyn FaultHook>,
    /// The user hook's token of the fault in progress (the handler is one
    /// thread, so one slot suffices).
    user_seq: AtomicU64,
    unexpected: Arc<AtomicU64>,
}

impl TableFaultHook {
    /// Run `f` with the fault thread's walker of this table: a registered
    /// reader kept per thread, so a fault costs no reader registration, no
    /// lock and no allocation (the handler is one thread).
    fn with_walker<R>(&self, f: impl FnOnce(&mut Walker) -> R) -> R {
        thread_local! {
            static WALKER: std::cell::RefCell<Option<Walker>> = const { std::cell::RefCell::new(None) };
        }
        WALKER.with_borrow_mut(|w| {
            let w = match w {
                Some(w) if Arc::ptr_eq(w.table(), &self.table) => w,
                _ => w.insert(self.table.walker()),
            };
            f(w)
        })
    }
}

impl FaultHook for TableFaultHook {
    fn fault_granule(&self, gpa: u64, max: u64) -> u64 {
        // A balloon or discard may have split a huge leaf: install only
        // the leaf that faulted, never its ballooned neighbours.
        let state = self.with_walker(|w| w.pin().query(Gpa(gpa)));
        match state {
            PageState::Present { size, .. }
            | PageState::Discarded { size, .. }
            | PageState::Ballooned { size, .. } => size.bytes().min(max),
            PageState::Unmapped => max,
        }
    }

    fn fault_begin(&self, gpa: u64, len: u64) -> u64 {
        self.user_seq
            .store(self.user.fault_begin(gpa, len), Ordering::Relaxed);
        // The range's snapshot: only an invalidation that touches this
        // leaf fails its commit, not every unmap anywhere in the VM.
        SNAPSHOT.set(Some(self.table.fault_seq(Gpa(gpa), len)));
        0
    }

    fn fault_commit(&self, gpa: u64, len: u64, _seq: u64) -> bool {
        // The snapshot of this thread's fault in progress (the handler
        // begins and commits one fault at a time); none: begin again.
        let Some(snap) = SNAPSHOT.take() else {
            return false;
        };
        // Lock-free: a compare-and-swap in a read section of the handler's
        // walker, never behind a writer's table-lock hold.
        let commit = self.with_walker(|w| w.fault_in_range_if_unchanged(Gpa(gpa), len, snap));
        let ok = match commit {
            Ok(_) => true,
            // An invalidation ran, or a release is pending over the page:
            // the handler undoes its install and starts again.
            Err(FaultError::Retry(_)) => false,
            // Not a page the table can give back (not mapped, ballooned,
            // teardown): resolve so the guest makes progress, and count it.
            Err(_) => {
                self.unexpected.fetch_add(1, Ordering::Relaxed);
                true
            }
        };
        ok && self
            .user
            .fault_commit(gpa, len, self.user_seq.load(Ordering::Relaxed))
    }
}

/// Reads and writes guest memory through the lockless fast walk, from one
/// thread. Each call is one short read section.
pub struct GuestAccess {
    walker: Walker,
}

impl GuestAccess {
    /// Copy guest memory at `gpa` into `buf`. A discarded page is faulted
    /// back in first (its next touch reads zeros, like the guest's would).
    pub fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), Stage2Error> {
        self.with_retry(gpa, buf.len() as u64, |g| g.read(Gpa(gpa), buf))
    }

    /// Copy `buf` into guest memory at `gpa`.
    pub fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), Stage2Error> {
        self.with_retry(gpa, buf.len() as u64, |g| g.write(Gpa(gpa), buf))
    }

    /// An atomic store of a naturally aligned `u64` at `gpa`.
    pub fn store_u64(&mut self, gpa: u64, val: u64, ord: Ordering) -> Result<(), Stage2Error> {
        if !gpa.is_multiple_of(8) {
            return Err(WalkError::OutOfRange(Gpa(gpa)).into());
        }
        self.with_retry(gpa, 8, |g| {
            let t = g.translate(Gpa(gpa), Access::Write)?;
            // SAFETY: the translation is valid inside this read section (the
            // backing cannot be released before we unpin); the address is
            // 8-aligned registered backing; AtomicU64 has u64's layout.
            let a = unsafe { &*(t.hva.0 as *const AtomicU64) };
            a.store(val, ord);
            Ok(())
        })
    }

    /// Runs `f` in one read section, with guest memory as vm-memory's
    /// [`GuestMemory`](vm_memory::GuestMemory) (a [`GuestMemoryView`] of
    /// the pinned walker): virtio-queue and every `Bytes` accessor work
    /// through it, and no slice outlives the section.
    ///
    /// A discarded page (released by free page reporting, still mapped:
    /// its next touch reads zeros) is refused by the view like any page
    /// that is not present. When `f` fails and `discarded` finds in its
    /// error the address of such a page, the section is ended, the page is
    /// faulted back in (as [`GuestAccess::read`] does) and `f` runs again
    /// in a new section, at most `rounds` more times. `f` must leave its
    /// state so that running it again is right (undo a partly done step).
    ///
    /// The view must not be kept past `f`: a release of guest memory
    /// waits for this section to end, so releasing from inside `f` would
    /// wait for itself. Release between two calls.
    pub fn with_view<R, E>(
        &mut self,
        rounds: usize,
        mut f: impl FnMut(&GuestMemoryView<'_>) -> Result<R, E>,
        discarded: impl Fn(&E) -> Option<u64>,
    ) -> Result<R, E> {
        let mut left = rounds;
        loop {
            let r = {
                let g = self.walker.pin();
                f(&g.memory())
            };
            let gpa = match &r {
                Err(e) if left > 0 => discarded(e),
                _ => None,
            };
            let Some(gpa) = gpa else { return r };
            left -= 1;
            if self.walker.fault_in(Gpa(gpa)).is_err() {
                return r;
            }
        }
    }

    /// Counters of the underlying walker.
    pub fn stats(&self) -> guest_mm::WalkStats {
        self.walker.stats()
    }

    fn with_retry(
        &mut self,
        gpa: u64,
        len: u64,
        mut f: impl FnMut(&guest_mm::WalkGuard<'_>) -> Result<(), WalkError>,
    ) -> Result<(), Stage2Error> {
        // Bounded: each round faults in at least one discarded page.
        let rounds = len / 4096 + 3;
        for _ in 0..rounds {
            let r = {
                let g = self.walker.pin();
                f(&g)
            };
            match r {
                Err(WalkError::Discarded(at)) => {
                    self.walker.fault_in(at)?;
                }
                other => return Ok(other?),
            }
        }
        Err(WalkError::Discarded(Gpa(gpa)).into())
    }
}

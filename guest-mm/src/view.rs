//! vm-memory's [`GuestMemory`] over the stage-2 table: a *pinned view*.
//!
//! A [`GuestMemoryView`] is built from an open read section of a
//! [`Walker`](crate::Walker) ([`WalkGuard::memory`] or
//! [`GuestMemoryView::new`]) and implements vm-memory 0.18's IOMMU-shaped
//! [`GuestMemory`] trait, so everything written against that trait works
//! through the table: the blanket `Bytes<GuestAddress>` (`read_obj`,
//! `write_slice`, `read_volatile_from`, ...),
//! [`GuestAddressSpace`](vm_memory::GuestAddressSpace) for
//! `&GuestMemoryView`, and virtio-queue's accessors. Each translation is
//! the fast walk's, through the walker's translation cache.
//!
//! **What a view answers.** `get_slices(addr, count, access)` yields
//! [`VolatileSlice`]s of host memory covering `[addr, addr + count)`, one
//! per run of leaves that are contiguous on the host (adjacent leaves
//! whose backing follows on are coalesced). A page that is not mapped,
//! discarded, ballooned, out of the table's range, or whose leaf lacks a
//! permission `access` asks for (vm-memory's `Read`/`Write`/`ReadWrite`
//! against the leaf's R/W bits; `No` needs only a present leaf) ends the
//! iteration with an error: no slice is ever made for such a page, so no
//! slice points into backing that was released or is about to be. The
//! precise reason is [`GuestMemoryView::check`]'s [`WalkError`]; through
//! the trait it becomes [`GuestMemoryError::InvalidGuestAddress`] (or an
//! `IOError` of kind `PermissionDenied`), see
//! `From<WalkError> for GuestMemoryError`.
//!
//! **Invariant: a slice never outlives the read section it was translated
//! in.** The lifetimes say so: the slices borrow the view, the view borrows
//! the [`WalkGuard`], the guard borrows the walker and is the read section.
//! So while a slice exists the section is open, and an unmap's flush,
//! which clears the entry, bumps the invalidation sequence and then waits
//! for a grace period before it releases the backing, waits for it. This
//! is the fast walk's guarantee (*no walker reads backing after its
//! release*) carried over to vm-memory's accessors; the stress harness
//! checks it with readers going through the view.
//!
//! **Concurrency and cost.** A view is a reference: creating it, asking
//! for slices and iterating takes no lock and allocates nothing (the
//! iterator is a small state machine, [`ViewSlices`]). It is not `Send`
//! or `Sync` (neither is the guard): one thread uses it. Keep the read
//! section short, as with any pin: unmaps wait for it. The guest may write
//! the memory concurrently, as with any DMA; slices are accessed with
//! volatile operations only. There is no dirty-page tracking
//! (`Bitmap = ()`).
//!
//! **One address vocabulary.** [`Gpa`] and vm-memory's [`GuestAddress`]
//! convert into each other with `From`; [`crate::Hva::as_ptr`] gives a host
//! pointer.
//!
//! ```
//! use guest_mm::{BackingKind, BackingRegion, Gpa, Hva, PageSize, Perms, Stage2Table, TableConfig};
//! use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
//!
//! // Two pages of host memory, mapped at guest 0x10000 (the buffer is
//! // only used through the table from here on).
//! let buf: &'static mut [u8] = Box::leak(vec![0u8; 3 * 4096].into_boxed_slice());
//! let host = (buf.as_mut_ptr() as u64).next_multiple_of(4096);
//! let table = Stage2Table::new(TableConfig::default()).unwrap();
//! let kind = BackingKind::Simulated { hook: None };
//! table.register_backing(BackingRegion { hva: Hva(host), len: 8192, kind }).unwrap();
//! table.map(Gpa(0x10000), Hva(host), 8192, Perms::RW, PageSize::Size4K).unwrap();
//!
//! let mut walker = table.walker();
//! let guard = walker.pin(); // the read section
//! let mem = guard.memory(); // vm-memory's GuestMemory
//! mem.write_obj(0x1122_3344_5566_7788u64, GuestAddress(0x10ffc)).unwrap();
//! assert_eq!(mem.read_obj::<u64>(GuestAddress(0x10ffc)).unwrap(), 0x1122_3344_5566_7788);
//! assert!(!mem.check_range(GuestAddress(0x12000), 1, Permissions::Read)); // not mapped
//! ```
//!
//! A slice cannot be kept past the end of its read section:
//!
//! ```compile_fail
//! # use guest_mm::Walker;
//! # use vm_memory::{GuestAddress, GuestMemory, Permissions};
//! fn keep_a_slice(walker: &mut Walker) {
//!     let slice = {
//!         let guard = walker.pin();
//!         let mem = guard.memory();
//!         let mut slices = mem.get_slices(GuestAddress(0), 8, Permissions::Read).unwrap();
//!         slices.next().unwrap().unwrap()
//!     }; // the read section ends here: an unmap may release the backing
//!     let _ = slice.len();
//! }
//! ```

use std::iter::FusedIterator;

use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, Permissions, VolatileSlice,
};

use crate::addr::{Gpa, Perms};
use crate::walk::{WalkError, WalkGuard};

impl From<GuestAddress> for Gpa {
    fn from(a: GuestAddress) -> Gpa {
        Gpa(a.0)
    }
}

impl From<Gpa> for GuestAddress {
    fn from(a: Gpa) -> GuestAddress {
        GuestAddress(a.0)
    }
}

/// A failed translation as vm-memory reports it, allocation-free: a page
/// without the permission asked for is an `IOError` of kind
/// `PermissionDenied`; every other failure (not mapped, discarded,
/// ballooned, out of range, a freed table page) is `InvalidGuestAddress`
/// of the first page that failed.
impl From<WalkError> for GuestMemoryError {
    fn from(e: WalkError) -> GuestMemoryError {
        match e {
            WalkError::PermissionDenied { .. } => {
                GuestMemoryError::IOError(std::io::ErrorKind::PermissionDenied.into())
            }
            WalkError::NotMapped(g)
            | WalkError::Discarded(g)
            | WalkError::Ballooned(g)
            | WalkError::OutOfRange(g)
            | WalkError::UseAfterFree(g) => GuestMemoryError::InvalidGuestAddress(g.into()),
        }
    }
}

/// The leaf permissions a vm-memory access needs.
#[inline(always)]
fn needed(access: Permissions) -> Perms {
    match access {
        Permissions::No => Perms::from_bits(0),
        Permissions::Read => Perms::R,
        Permissions::Write => Perms::W,
        Permissions::ReadWrite => Perms::RW,
    }
}

/// Guest memory as seen through the stage-2 table, for as long as a read
/// section lasts (see the [module documentation](self)).
#[derive(Clone, Copy)]
pub struct GuestMemoryView<'g> {
    guard: &'g WalkGuard<'g>,
}

impl std::fmt::Debug for GuestMemoryView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GuestMemoryView")
    }
}

impl<'w> WalkGuard<'w> {
    /// This read section as vm-memory [`GuestMemory`]: slices borrow the
    /// view, which borrows this guard.
    #[inline]
    pub fn memory(&self) -> GuestMemoryView<'_> {
        GuestMemoryView::new(self)
    }
}

impl<'g> GuestMemoryView<'g> {
    /// A view through the read section `guard`.
    #[inline]
    pub fn new(guard: &'g WalkGuard<'_>) -> GuestMemoryView<'g> {
        GuestMemoryView { guard }
    }

    /// The read section this view translates in.
    pub fn guard(&self) -> &'g WalkGuard<'g> {
        self.guard
    }

    /// Whether `[addr, addr + count)` is accessible with `access`, and if
    /// not, why (the first page that is not). `check_range` of the trait,
    /// with the reason.
    pub fn check(
        &self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> Result<(), WalkError> {
        let mut it = ViewSlices::new(self.guard, addr, count, access);
        if it.wraps() {
            return Err(WalkError::OutOfRange(addr.into()));
        }
        while let Some(run) = it.next_run() {
            run?;
        }
        Ok(())
    }
}

impl GuestMemory for GuestMemoryView<'_> {
    /// Never returned ([`GuestMemory::physical_memory`] is `None`: every
    /// access goes through the table); vm-memory's mmap backend stands in
    /// for the type.
    type PhysicalMemory = GuestMemoryMmap<()>;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        self.check(addr, count, access).is_ok()
    }

    #[inline]
    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> Result<impl GuestMemorySliceIterator<'a, BS<'a, ()>>, GuestMemoryError> {
        let it = ViewSlices::new(self.guard, addr, count, access);
        if it.wraps() {
            return Err(GuestMemoryError::GuestAddressOverflow);
        }
        Ok(it)
    }
}

/// The slices of one `get_slices` call: translates lazily, one run of
/// host-contiguous leaves per item, and stops after the first error.
pub struct ViewSlices<'a> {
    guard: &'a WalkGuard<'a>,
    /// Next guest address to translate.
    addr: u64,
    /// Bytes left.
    left: u64,
    need: Perms,
    /// A look-ahead translation that did not extend the previous run:
    /// `(hva, bytes)` of the next run's first leaf, or why it failed.
    ahead: Option<Result<(u64, u64), WalkError>>,
}

impl<'a> ViewSlices<'a> {
    #[inline]
    fn new(
        guard: &'a WalkGuard<'a>,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> ViewSlices<'a> {
        ViewSlices {
            guard,
            addr: addr.0,
            left: count as u64,
            need: needed(access),
            ahead: None,
        }
    }

    /// Whether the range wraps around the address space.
    #[inline]
    fn wraps(&self) -> bool {
        self.addr.checked_add(self.left).is_none()
    }

    /// One leaf's part of the rest of the range: `(hva, bytes)`.
    #[inline(always)]
    fn leaf(&self, at: u64, left: u64) -> Result<(u64, u64), WalkError> {
        let t = self.guard.translate_for(Gpa(at), self.need)?;
        Ok((t.hva.0, t.len_in_leaf.min(left)))
    }

    /// The next run `(hva, bytes)`, or why the next page failed; `None` at
    /// the end, and for ever after an error.
    #[inline]
    fn next_run(&mut self) -> Option<Result<(u64, u64), WalkError>> {
        if self.left == 0 {
            return None;
        }
        let first = match self.ahead.take() {
            Some(r) => r,
            None => self.leaf(self.addr, self.left),
        };
        let (hva, mut n) = match first {
            Ok(x) => x,
            Err(e) => {
                self.left = 0;
                return Some(Err(e));
            }
        };
        // Coalesce the following leaves while they continue on the host.
        while n < self.left {
            match self.leaf(self.addr + n, self.left - n) {
                Ok((h, m)) if h == hva + n => n += m,
                other => {
                    self.ahead = Some(other);
                    break;
                }
            }
        }
        self.addr += n;
        self.left -= n;
        Some(Ok((hva, n)))
    }
}

impl<'a> Iterator for ViewSlices<'a> {
    type Item = Result<VolatileSlice<'a, BS<'a, ()>>, GuestMemoryError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        Some(match self.next_run()? {
            Ok((hva, n)) => {
                // A run is at most the `count: usize` asked for.
                let len = usize::try_from(n).unwrap_or(usize::MAX);
                // SAFETY: [hva, hva + len) is backing that a present leaf
                // of the table mapped with the permissions asked for, as
                // read inside the read section `self.guard` is: registered
                // backing, mapped in this process for as long as the table
                // maps it. The slice's lifetime 'a is a borrow of that
                // guard (through the view), so the read section stays open
                // while the slice exists, and an unmap releases backing
                // only after the grace period that follows its clearing of
                // the entry, which waits for this section to end: the
                // memory is not released while the slice lives. Every
                // other user (the guest, other devices) accesses it as
                // guest memory, which vm-memory treats as volatile.
                Ok(unsafe { VolatileSlice::new(hva as usize as *mut u8, len) })
            }
            Err(e) => Err(e.into()),
        })
    }
}

/// After the end or an error, `next` returns `None` for ever.
impl FusedIterator for ViewSlices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, BS<'a, ()>> for ViewSlices<'a> {}

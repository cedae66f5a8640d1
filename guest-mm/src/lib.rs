//! # guest-mm: the guest memory manager
//!
//! A user-space stage-2 table (guest-physical → host backing) for a KVM
//! VMM, driven the way Linux drives page tables after the `mmu_gather`
//! rework:
//!
//! - [`Stage2Table`] is a 4-level radix table of 4 KiB table pages whose
//!   entries are `AtomicU64` in an EPT-compatible encoding ([`entry`]).
//!   Writers hold the table lock for bounded stretches and yield it.
//! - Unmaps go through a [`Gather`]: entries are **unhooked** under the
//!   lock; then, outside it, translations are **invalidated**
//!   (subscribers, translation caches, a grace period), backing is
//!   **released**, and unlinked table pages are **freed** after a grace
//!   period. Always in that order.
//! - A [`Walker`] translates without locks inside an RCU read section
//!   ([`reclaim`]); it never reads a freed table page and never sees backing
//!   after its release.
//! - A [`GuestMemoryView`] ([`WalkGuard::memory`]) is such a read section
//!   as vm-memory's `GuestMemory`: `Bytes<GuestAddress>` (`read_obj`,
//!   `write_slice`, ...) and virtio-queue work through the table, with
//!   slices that borrow the read section and so cannot outlive it, and
//!   errors, never slices, for pages that are unmapped, discarded,
//!   ballooned or lack the permission asked for ([`view`]).
//!
//! See `docs/DESIGN.md` for the invariants and the locking order.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod addr;
pub mod backing;
pub mod entry;
pub mod fault;
pub mod gather;
pub mod mutation;
pub mod notify;
pub mod reclaim;
pub mod runs;
#[cfg(not(loom))]
pub mod stress;
mod sync;
pub mod table;
pub mod view;
pub mod walk;

pub use addr::{Gfn, Gpa, Hva, PageSize, Perms};
pub use backing::{BackingError, BackingId, BackingKind, BackingRegion, ReleaseError};
pub use fault::{FailPoint, FaultInjection};
pub use gather::{Gather, GatherStats};
pub use notify::{Invalidation, InvalidationSubscriber, SubscribeError, SubscriberId};
pub use table::{
    Census, FaultError, FaultOutcome, FaultSnapshot, MapError, NewTableError, PageState,
    RangeError, Stage2Table, TableConfig, TableStats, UnmapError, UnmapMode,
};
pub use view::{GuestMemoryView, ViewSlices};
pub use walk::{Access, Translation, WalkError, WalkGuard, WalkStats, Walker};

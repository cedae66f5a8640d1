//! Stage-2 entry encoding (EPT-compatible) and the table geometry.
//!
//! An entry is a `u64` stored in an `AtomicU64`:
//!
//! | bits   | meaning                                                   |
//! |--------|-----------------------------------------------------------|
//! | 0-2    | R / W / X (any set = present)                             |
//! | 3-5    | memory type (WB = 6)                                      |
//! | 7      | large page (a level-2 or level-3 leaf)                    |
//! | 8 / 9  | accessed / dirty                                          |
//! | 12-51  | frame: host address >> 12 (a leaf's backing, or the next table page) |
//! | 52     | software: *discarded* (guest page, backing released; faults back in) |
//! | 53     | software: *ballooned* (given to the balloon by the guest)  |
//! | 54-56  | software: the permissions to restore when a marker is faulted back |
//!
//! A present entry at level > 1 without the large bit points to a table
//! page. A present entry has no bit at or above 52 (every constructor
//! masks the frame; the software bits are markers' only): the fast walk's
//! one-load path takes a 4 KiB leaf's frame as the entry without its low
//! 12 bits, and the oracle test (`tests/oracle.rs`) compares its host
//! addresses. A non-present entry with a software bit is a *marker*: the guest
//! page exists but has no backing right now; it keeps its table page alive.
//! [`POISON`] is written over every freed table page: a walker that ever
//! reads it has read freed memory, which the stress tests count.

use crate::addr::{PageSize, Perms};

/// log2 of the base page size.
pub const PAGE_SHIFT: u32 = 12;
/// The base page size.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// log2 of the entries per table page (9 in production, 1 under loom).
#[cfg(not(loom))]
pub const ENTRY_BITS: u32 = 9;
/// log2 of the entries per table page (9 in production, 1 under loom).
#[cfg(loom)]
pub const ENTRY_BITS: u32 = 1;

/// Entries per table page.
pub const ENTRIES: usize = 1 << ENTRY_BITS;
/// Number of levels; level `LEVELS` is the root.
pub const LEVELS: u32 = 4;
/// Width of the guest-physical address space the table covers.
pub const ADDRESS_BITS: u32 = PAGE_SHIFT + ENTRY_BITS * LEVELS;
/// One past the highest guest-physical address the table can map.
pub const ADDRESS_LIMIT: u64 = 1 << ADDRESS_BITS;

/// Readable.
pub const R: u64 = 1 << 0;
/// Writable.
pub const W: u64 = 1 << 1;
/// Executable.
pub const X: u64 = 1 << 2;
/// R|W|X.
pub const PERM_MASK: u64 = 7;
/// Memory type write-back in bits 5:3.
pub const MT_WB: u64 = 6 << 3;
/// Large page.
pub const LARGE: u64 = 1 << 7;
/// Accessed.
pub const ACCESSED: u64 = 1 << 8;
/// Dirty.
pub const DIRTY: u64 = 1 << 9;
/// Frame field.
pub const FRAME_MASK: u64 = ((1 << 52) - 1) & !(PAGE_SIZE - 1);
/// Software: backing released, page faults back in.
pub const SW_DISCARDED: u64 = 1 << 52;
/// Software: ballooned by the guest.
pub const SW_BALLOONED: u64 = 1 << 53;
const SW_PERM_SHIFT: u32 = 54;
const SW_MARKERS: u64 = SW_DISCARDED | SW_BALLOONED;

/// What a freed table page is filled with. Present-looking on purpose, with a
/// frame no allocator hands out, so that only the equality check tells.
/// LARGE is set with R|W|X, which no table pointer and no 4 KiB leaf has:
/// the fast walk's one-compare tests of those two reject it, and the slow
/// walk reports it.
pub const POISON: u64 = 0x000d_ead0_dead_0087;

/// The index of `addr` in a table page at `level`.
#[inline(always)]
pub const fn index(addr: u64, level: u32) -> usize {
    ((addr >> level_shift(level)) as usize) & (ENTRIES - 1)
}

/// log2 of the bytes one entry at `level` spans.
#[inline(always)]
pub const fn level_shift(level: u32) -> u32 {
    PAGE_SHIFT + ENTRY_BITS * (level - 1)
}

/// Bytes one entry at `level` spans.
#[inline(always)]
pub const fn level_size(level: u32) -> u64 {
    1 << level_shift(level)
}

/// A decoded view of one entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Pte(pub u64);

impl Pte {
    /// The empty entry.
    pub const NONE: Pte = Pte(0);

    /// A leaf mapping `frame_addr` (4 KiB-aligned host address) at `level`.
    pub fn leaf(frame_addr: u64, perms: Perms, level: u32) -> Pte {
        let large = if level > 1 { LARGE } else { 0 };
        Pte((frame_addr & FRAME_MASK) | MT_WB | large | u64::from(perms.bits()))
    }
    /// A pointer to a table page at host address `table_addr`.
    pub fn table(table_addr: u64) -> Pte {
        Pte((table_addr & FRAME_MASK) | R | W | X)
    }
    /// A non-present marker that remembers the leaf it replaces.
    pub fn marker(frame_addr: u64, perms: Perms, level: u32, sw: u64) -> Pte {
        let large = if level > 1 { LARGE } else { 0 };
        Pte((frame_addr & FRAME_MASK)
            | large
            | (sw & SW_MARKERS)
            | (u64::from(perms.bits()) << SW_PERM_SHIFT))
    }
    /// Any of R/W/X set.
    #[inline(always)]
    pub const fn is_present(self) -> bool {
        self.0 & PERM_MASK != 0
    }
    /// Present and, at `level`, a leaf rather than a table pointer.
    #[inline(always)]
    pub const fn is_leaf(self, level: u32) -> bool {
        self.is_present() && (level == 1 || self.0 & LARGE != 0)
    }
    /// Present and a pointer to a table page.
    #[inline(always)]
    pub const fn is_table(self, level: u32) -> bool {
        self.is_present() && level > 1 && self.0 & LARGE == 0
    }
    /// A non-present entry that still describes a guest page.
    #[inline(always)]
    pub const fn is_marker(self) -> bool {
        !self.is_present() && self.0 & SW_MARKERS != 0
    }
    /// Zero: nothing here, the slot may be reused or its table page freed.
    #[inline(always)]
    pub const fn is_none(self) -> bool {
        self.0 == 0
    }
    /// The frame field as a host address.
    #[inline(always)]
    pub const fn addr(self) -> u64 {
        self.0 & FRAME_MASK
    }
    /// R/W/X of a present entry.
    pub const fn perms(self) -> Perms {
        Perms::from_bits((self.0 & PERM_MASK) as u8)
    }
    /// The permissions a marker will restore.
    pub const fn saved_perms(self) -> Perms {
        Perms::from_bits(((self.0 >> SW_PERM_SHIFT) & PERM_MASK) as u8)
    }
    /// The software marker bits.
    pub const fn markers(self) -> u64 {
        self.0 & SW_MARKERS
    }
    /// The same leaf with other permissions.
    pub const fn with_perms(self, perms: Perms) -> Pte {
        Pte((self.0 & !PERM_MASK) | perms.bits() as u64)
    }
    /// The leaf size of a leaf or marker at `level`.
    pub const fn size_at(level: u32) -> Option<PageSize> {
        PageSize::from_level(level)
    }
}

//! Address and size newtypes: a guest-physical address can never be passed
//! where a host-virtual one is meant, and page sizes are a type.

use std::fmt;

use crate::entry::{ENTRY_BITS, PAGE_SHIFT};

/// A guest-physical address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Gpa(pub u64);

/// A host-virtual address (where the backing of a guest page lives in this process).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hva(pub u64);

/// A guest page frame number (a guest-physical address shifted right by 12).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Gfn(pub u64);

impl Gpa {
    /// The frame this address lies in.
    pub fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }
    /// `self + off`, or `None` on overflow.
    pub fn checked_add(self, off: u64) -> Option<Gpa> {
        self.0.checked_add(off).map(Gpa)
    }
}

impl Gfn {
    /// The first address of this frame.
    pub fn gpa(self) -> Gpa {
        Gpa(self.0 << PAGE_SHIFT)
    }
}

impl Hva {
    /// `self + off`, or `None` on overflow.
    pub fn checked_add(self, off: u64) -> Option<Hva> {
        self.0.checked_add(off).map(Hva)
    }
    /// As a raw pointer.
    pub fn as_ptr(self) -> *mut u8 {
        self.0 as usize as *mut u8
    }
}

macro_rules! hex_debug {
    ($($t:ident),*) => {$(
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "({:#x})"), self.0)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    )*};
}
hex_debug!(Gpa, Hva, Gfn);

/// The size of a stage-2 leaf. With the production geometry these are
/// 4 KiB, 2 MiB and 1 GiB; under `cfg(loom)` the geometry is tiny and the
/// sizes shrink accordingly (the names keep their production meaning).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum PageSize {
    /// A level-1 leaf (4 KiB).
    Size4K,
    /// A level-2 leaf (2 MiB).
    Size2M,
    /// A level-3 leaf (1 GiB).
    Size1G,
}

impl PageSize {
    /// All sizes, smallest first.
    pub const ALL: [PageSize; 3] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];

    /// The table level whose entries map this size (1 = lowest).
    pub const fn level(self) -> u32 {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }
    /// The size for a leaf at `level`, if that level may hold leaves.
    pub const fn from_level(level: u32) -> Option<PageSize> {
        match level {
            1 => Some(PageSize::Size4K),
            2 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size1G),
            _ => None,
        }
    }
    /// log2 of the size in bytes.
    pub const fn shift(self) -> u32 {
        PAGE_SHIFT + ENTRY_BITS * (self.level() - 1)
    }
    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }
    /// Parse `4K`, `2M` or `1G` (case-insensitive, optional `iB`/`B`).
    pub fn parse(s: &str) -> Option<PageSize> {
        let t = s.trim().to_ascii_uppercase();
        let t = t.trim_end_matches("IB").trim_end_matches('B');
        match t {
            "4K" | "4096" => Some(PageSize::Size4K),
            "2M" => Some(PageSize::Size2M),
            "1G" => Some(PageSize::Size1G),
            _ => None,
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageSize::Size4K => "4K",
            PageSize::Size2M => "2M",
            PageSize::Size1G => "1G",
        })
    }
}

/// Access permissions of a stage-2 leaf (the EPT R/W/X bits).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Perms(u8);

impl Perms {
    /// Readable.
    pub const R: Perms = Perms(1);
    /// Writable.
    pub const W: Perms = Perms(2);
    /// Executable.
    pub const X: Perms = Perms(4);
    /// Read + write.
    pub const RW: Perms = Perms(3);
    /// Read + write + execute.
    pub const RWX: Perms = Perms(7);
    /// Read + execute.
    pub const RX: Perms = Perms(5);

    /// From the low three EPT bits.
    pub const fn from_bits(bits: u8) -> Perms {
        Perms(bits & 7)
    }
    /// The low three EPT bits.
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// No access at all (not a valid mapping).
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// Whether every permission in `other` is also in `self`.
    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }
    /// Readable?
    pub const fn readable(self) -> bool {
        self.0 & 1 != 0
    }
    /// Writable?
    pub const fn writable(self) -> bool {
        self.0 & 2 != 0
    }
}

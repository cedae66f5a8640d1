//! The errors of the table's operations, and the range check that every
//! ranged operation starts with.
//!
//! One `thiserror` enum per operation ([`MapError`], [`UnmapError`] for
//! unmap and protect, [`FaultError`] for the fault path) plus the shared
//! [`RangeError`]. Messages say what to do about the error. An operation
//! that returns an error says in its variant how much it changed: bad
//! input (a [`RangeError`], no permissions, a wrong gather) always
//! changes nothing.
//!
//! Nothing here touches the table: no locks, no atomics.

use thiserror::Error;

use crate::addr::{Gpa, Hva};
use crate::entry::{ADDRESS_LIMIT, PAGE_SIZE};

/// Why a guest-physical range was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RangeError {
    /// Zero length.
    #[error("the range at {0} is empty; give a length of at least 4 KiB")]
    Empty(Gpa),
    /// Not 4 KiB aligned.
    #[error("{what} {value:#x} is not 4 KiB aligned; align addresses and lengths to 4096")]
    Unaligned {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// Past the table's address width, or wrapping around.
    #[error("range {start} + {len:#x} goes past the table's {limit:#x} guest-physical limit")]
    OutOfRange {
        /// Start.
        start: Gpa,
        /// Length.
        len: u64,
        /// The limit.
        limit: u64,
    },
}

/// Errors of [`Stage2Table::new`](super::Stage2Table::new). Nothing is
/// left behind.
#[derive(Debug, Error)]
pub enum NewTableError {
    /// The guest address limit is zero or past the table's width.
    #[error(
        "guest address limit {0:#x} is not usable: give TableConfig::guest_address_limit \
         between 1 and {max:#x} (one past the highest guest-physical address to map)",
        max = ADDRESS_LIMIT
    )]
    BadLimit(u64),
    /// The host refused the leaf arena's address-space reservation.
    #[error(
        "cannot reserve {bytes:#x} bytes of address space for the leaf table pages of guest \
         addresses up to {limit:#x}: {source}; raise the process's address-space limit \
         (ulimit -v) or lower TableConfig::guest_address_limit to the guest's highest address"
    )]
    Reserve {
        /// Bytes asked for (1/512 of `limit`).
        bytes: u64,
        /// The table's guest address limit.
        limit: u64,
        /// What the host said.
        source: std::io::Error,
    },
    /// The root table page could not be allocated.
    #[error("out of memory for the table's root page; free host memory and retry")]
    OutOfMemory,
}

/// Errors of [`Stage2Table::map`](super::Stage2Table::map).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MapError {
    /// Bad range.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// No permissions given.
    #[error("mapping {0} without any of R/W/X would be invisible; give at least read permission")]
    NoPermissions(Gpa),
    /// The host range is not registered backing.
    #[error(
        "host range {hva} + {len:#x} is not inside registered backing; call register_backing first"
    )]
    NotBacked {
        /// Start.
        hva: Hva,
        /// Length.
        len: u64,
    },
    /// Part of the range is mapped (or a marker) already.
    #[error("guest page {0} is already mapped; unmap it first")]
    AlreadyMapped(Gpa),
    /// A table page could not be allocated; nothing stays mapped.
    #[error("out of memory for a table page while mapping {0}; nothing was mapped")]
    OutOfMemory(Gpa),
    /// The table is being torn down.
    #[error("the table is being torn down")]
    Dying,
}

/// Errors of [`Stage2Table::unmap`](super::Stage2Table::unmap) and
/// [`Stage2Table::protect`](super::Stage2Table::protect).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum UnmapError {
    /// Bad range.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// Part of the range is not mapped; nothing was changed.
    #[error("guest page {0} is not mapped; nothing was changed (unmap only what is mapped)")]
    NotMapped(Gpa),
    /// Splitting a huge leaf needed a table page that could not be had.
    #[error("out of memory splitting the huge leaf at {at}; the range up to {at} was done and flushed, the rest is unchanged")]
    OutOfMemory {
        /// Where it stopped.
        at: Gpa,
    },
    /// The gather belongs to another table.
    #[error("the gather was opened on another table; open it with this table's gather()")]
    WrongTable,
    /// Teardown needs a full-mm gather and vice versa.
    #[error("teardown needs a gather from gather_full_mm(), and unmap one from gather()")]
    WrongGatherKind,
    /// No permissions given to protect.
    #[error("protect needs at least one permission; to remove access, unmap")]
    NoPermissions,
    /// The table is being torn down.
    #[error("the table is being torn down")]
    Dying,
}

/// Errors of the fault path.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FaultError {
    /// Nothing is mapped there.
    #[error("guest page {0} is not mapped: the guest touched memory it does not have")]
    NotMapped(Gpa),
    /// The page is in the balloon.
    #[error("guest page {0} is ballooned; deflate it before touching it")]
    Ballooned(Gpa),
    /// An invalidation ran since the caller's sequence snapshot.
    #[error("an invalidation raced with the fault at {0}; resolve it again")]
    Retry(Gpa),
    /// Out of the address width.
    #[error("{0} is beyond the table's guest-physical limit")]
    OutOfRange(Gpa),
    /// The table is being torn down.
    #[error("the table is being torn down")]
    Dying,
    /// The fault's walk read a freed table page: a reclamation bug.
    #[error("the fault at {0} read a freed table page (use-after-free); report this bug")]
    UseAfterFree(Gpa),
}

/// Check that `[gpa, gpa + len)` is a non-empty, 4 KiB aligned range
/// inside the table's address width; returns `(start, end)`.
pub(super) fn check_range(gpa: Gpa, len: u64) -> Result<(Gpa, Gpa), RangeError> {
    if len == 0 {
        return Err(RangeError::Empty(gpa));
    }
    if !gpa.0.is_multiple_of(PAGE_SIZE) {
        return Err(RangeError::Unaligned {
            what: "guest-physical address",
            value: gpa.0,
        });
    }
    if !len.is_multiple_of(PAGE_SIZE) {
        return Err(RangeError::Unaligned {
            what: "length",
            value: len,
        });
    }
    match gpa.0.checked_add(len) {
        Some(end) if end <= ADDRESS_LIMIT => Ok((gpa, Gpa(end))),
        _ => Err(RangeError::OutOfRange {
            start: gpa,
            len,
            limit: ADDRESS_LIMIT,
        }),
    }
}

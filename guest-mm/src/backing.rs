//! Host backing of guest memory, and how to give it back to the host.
//!
//! Every leaf the table maps points into a registered [`BackingRegion`];
//! a release is clipped to registered regions, so nothing outside them is
//! ever released. How memory is released depends on the kind:
//!
//! | kind | release |
//! |------|---------|
//! | anonymous private | `madvise(MADV_DONTNEED)` |
//! | shared file (memfd) | `fallocate(PUNCH_HOLE \| KEEP_SIZE)` |
//! | hugetlb | whole huge pages only; partly released huge pages are tracked until every 4 KiB of them is released |
//! | simulated | nothing (tests, loom); the release is only reported to a hook |

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::Arc;

use thiserror::Error;

use crate::addr::Hva;
use crate::entry::PAGE_SIZE;
use crate::sync::{lock, AtomicU64, Mutex, Ordering};

/// A hook called with each released host range of a [`BackingKind::Simulated`] region.
pub type ReleaseHook = Arc<dyn Fn(Hva, u64) + Send + Sync>;

/// What kind of memory backs a region, and so how to release it.
#[derive(Clone)]
pub enum BackingKind {
    /// Private anonymous memory (THP or not).
    Anonymous,
    /// A shared mapping of a file such as a memfd; `offset` is the file
    /// offset of the region's first byte.
    SharedFile {
        /// The file (owned by the caller; must outlive the table).
        fd: RawFd,
        /// File offset of the region's start.
        offset: u64,
    },
    /// hugetlb pages of `page_size` bytes, anonymous (`file: None`) or a
    /// hugetlbfs/memfd file at an offset.
    Hugetlb {
        /// The huge page size (e.g. 2 MiB).
        page_size: u64,
        /// `(fd, offset)` for a file mapping.
        file: Option<(RawFd, u64)>,
    },
    /// No real memory is released; `hook` sees each range instead.
    Simulated {
        /// Called with every released range.
        hook: Option<ReleaseHook>,
    },
}

impl std::fmt::Debug for BackingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackingKind::Anonymous => f.write_str("Anonymous"),
            BackingKind::SharedFile { fd, offset } => {
                write!(f, "SharedFile(fd {fd}, offset {offset:#x})")
            }
            BackingKind::Hugetlb { page_size, file } => {
                write!(f, "Hugetlb({page_size:#x}, {file:?})")
            }
            BackingKind::Simulated { .. } => f.write_str("Simulated"),
        }
    }
}

/// A host range that guest memory may be mapped to.
#[derive(Clone, Debug)]
pub struct BackingRegion {
    /// First host address (4 KiB aligned; huge-page aligned for hugetlb).
    pub hva: Hva,
    /// Length in bytes.
    pub len: u64,
    /// How to release it.
    pub kind: BackingKind,
}

/// Identifies a registered region.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BackingId(pub usize);

/// Errors of registering backing.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BackingError {
    /// The region is empty, unaligned or wraps around.
    #[error("backing region {hva} + {len:#x} is invalid: it must be non-empty, 4 KiB aligned (huge-page aligned for hugetlb) and must not wrap")]
    Invalid {
        /// Start.
        hva: Hva,
        /// Length.
        len: u64,
    },
    /// The region overlaps one already registered.
    #[error("backing region {hva} + {len:#x} overlaps a registered region; register each host range once")]
    Overlap {
        /// Start.
        hva: Hva,
        /// Length.
        len: u64,
    },
}

/// A release that the kernel refused; the memory stays allocated.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("releasing host memory {hva} + {len:#x} failed ({op}): {errno}; the guest mapping is gone but the host memory is still allocated")]
pub struct ReleaseError {
    /// Start.
    pub hva: Hva,
    /// Length.
    pub len: u64,
    /// The call that failed.
    pub op: &'static str,
    /// errno.
    pub errno: i32,
}

struct Region {
    start: u64,
    end: u64,
    kind: BackingKind,
    /// hugetlb: huge page base -> bitmap of released 4 KiB sub-pages.
    partial: BTreeMap<u64, Vec<u64>>,
}

/// Counters of what was released.
#[derive(Default)]
pub(crate) struct ReleaseCounters {
    pub(crate) calls: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) outside: AtomicU64,
}

/// All regions of one table.
pub(crate) struct BackingRegistry {
    regions: Mutex<Vec<Region>>,
    pub(crate) counters: ReleaseCounters,
}

impl BackingRegistry {
    pub(crate) fn new() -> BackingRegistry {
        BackingRegistry {
            regions: Mutex::new(Vec::new()),
            counters: ReleaseCounters::default(),
        }
    }

    pub(crate) fn register(&self, r: BackingRegion) -> Result<BackingId, BackingError> {
        let align = match r.kind {
            BackingKind::Hugetlb { page_size, .. } => page_size.max(PAGE_SIZE),
            _ => PAGE_SIZE,
        };
        let end = r.hva.0.checked_add(r.len);
        let invalid = BackingError::Invalid {
            hva: r.hva,
            len: r.len,
        };
        let Some(end) = end else { return Err(invalid) };
        if r.len == 0
            || !align.is_power_of_two()
            || !r.hva.0.is_multiple_of(align)
            || !r.len.is_multiple_of(align)
        {
            return Err(invalid);
        }
        let mut regions = lock(&self.regions);
        if regions.iter().any(|x| x.start < end && r.hva.0 < x.end) {
            return Err(BackingError::Overlap {
                hva: r.hva,
                len: r.len,
            });
        }
        regions.push(Region {
            start: r.hva.0,
            end,
            kind: r.kind,
            partial: BTreeMap::new(),
        });
        regions.sort_by_key(|x| x.start);
        let id = regions.iter().position(|x| x.start == r.hva.0).unwrap_or(0);
        Ok(BackingId(id))
    }

    /// Whether `[hva, hva + len)` lies inside registered regions with no gap.
    pub(crate) fn covers(&self, hva: u64, len: u64) -> bool {
        let Some(end) = hva.checked_add(len) else {
            return false;
        };
        let regions = lock(&self.regions);
        let mut at = hva;
        for r in regions.iter() {
            if r.end <= at {
                continue;
            }
            if r.start > at {
                return false;
            }
            at = r.end;
            if at >= end {
                return true;
            }
        }
        false
    }

    /// A page of `[hva, hva + len)` is mapped again: forget partial releases there.
    pub(crate) fn note_mapped(&self, hva: u64, len: u64) {
        let mut regions = lock(&self.regions);
        for r in regions.iter_mut() {
            if r.partial.is_empty() || r.end <= hva || hva + len <= r.start {
                continue;
            }
            if let BackingKind::Hugetlb { page_size, .. } = r.kind {
                let mut a = hva.max(r.start);
                let end = (hva + len).min(r.end);
                while a < end {
                    let base = a & !(page_size - 1);
                    if let Some(bits) = r.partial.get_mut(&base) {
                        let i = ((a - base) / PAGE_SIZE) as usize;
                        bits[i / 64] &= !(1 << (i % 64));
                        if bits.iter().all(|&b| b == 0) {
                            r.partial.remove(&base);
                        }
                    }
                    a += PAGE_SIZE;
                }
            }
        }
    }

    /// Huge pages that are partly released and so still allocated.
    pub(crate) fn partial_huge_pages(&self) -> usize {
        lock(&self.regions).iter().map(|r| r.partial.len()).sum()
    }

    /// Release `[hva, hva + len)`, clipped to registered regions. Errors are
    /// counted; the first is returned after everything else was attempted.
    pub(crate) fn release(&self, hva: u64, len: u64) -> Result<(), ReleaseError> {
        let end = hva.saturating_add(len);
        let mut first_err = None;
        let mut regions = lock(&self.regions);
        let mut covered = 0u64;
        for r in regions.iter_mut() {
            let s = hva.max(r.start);
            let e = end.min(r.end);
            if s >= e {
                continue;
            }
            covered += e - s;
            if let Err(err) = self.release_in(r, s, e) {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                first_err.get_or_insert(err);
            }
        }
        if covered < len {
            self.counters
                .outside
                .fetch_add(len - covered, Ordering::Relaxed);
        }
        first_err.map_or(Ok(()), Err)
    }

    fn release_in(&self, r: &mut Region, s: u64, e: u64) -> Result<(), ReleaseError> {
        match r.kind.clone() {
            BackingKind::Anonymous => self.madvise(s, e - s),
            BackingKind::SharedFile { fd, offset } => {
                self.punch(fd, offset + (s - r.start), s, e - s)
            }
            BackingKind::Simulated { hook } => {
                self.count(e - s);
                if let Some(h) = hook {
                    h(Hva(s), e - s);
                }
                Ok(())
            }
            BackingKind::Hugetlb { page_size, file } => {
                let mut whole: Vec<(u64, u64)> = Vec::new();
                let first = s.next_multiple_of(page_size);
                let last = e & !(page_size - 1);
                if first < last {
                    whole.push((first, last));
                }
                // The partial head and tail: record the 4 KiB pages; a huge
                // page whose every sub-page is released goes too.
                for (ps, pe) in [(s, first.min(e)), (last.max(first).max(s), e)] {
                    if ps >= pe {
                        continue;
                    }
                    let base = ps & !(page_size - 1);
                    let nbits = (page_size / PAGE_SIZE) as usize;
                    let bits = r
                        .partial
                        .entry(base)
                        .or_insert_with(|| vec![0u64; nbits.div_ceil(64)]);
                    let mut a = ps;
                    while a < pe {
                        let i = ((a - base) / PAGE_SIZE) as usize;
                        bits[i / 64] |= 1 << (i % 64);
                        a += PAGE_SIZE;
                    }
                    let full = (0..nbits).all(|i| bits[i / 64] & (1 << (i % 64)) != 0);
                    if full {
                        r.partial.remove(&base);
                        whole.push((base, base + page_size));
                    }
                }
                let mut res = Ok(());
                for (ws, we) in whole {
                    let one = match file {
                        None => self.madvise(ws, we - ws),
                        Some((fd, offset)) => self.punch(fd, offset + (ws - r.start), ws, we - ws),
                    };
                    if res.is_ok() {
                        res = one;
                    }
                }
                res
            }
        }
    }

    fn count(&self, bytes: u64) {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn madvise(&self, s: u64, len: u64) -> Result<(), ReleaseError> {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        // SAFETY: [s, s+len) lies inside a registered region, which the
        // caller mapped and keeps mapped for the table's lifetime; the
        // table has unmapped it and waited for readers, so dropping its
        // contents is what every user of this range asked for.
        let rc =
            unsafe { libc::madvise(s as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(ReleaseError {
                hva: Hva(s),
                len,
                op: "madvise(MADV_DONTNEED)",
                errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            });
        }
        self.counters.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    fn punch(&self, fd: RawFd, off: u64, s: u64, len: u64) -> Result<(), ReleaseError> {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let err = |errno| ReleaseError {
            hva: Hva(s),
            len,
            op: "fallocate(PUNCH_HOLE|KEEP_SIZE)",
            errno,
        };
        let (Ok(off), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
            return Err(err(libc::EINVAL));
        };
        // SAFETY: fallocate on a caller-owned fd; no memory of ours is touched.
        let rc = unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc != 0 {
            return Err(err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(0)));
        }
        self.counters.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }
}

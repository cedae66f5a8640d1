//! Invalidation sequences per window of guest-physical space, for the
//! fault commit: KVM's `mmu_invalidate_seq`, made range-aware.
//!
//! A fault handler reads a [`FaultSnapshot`] of the range it resolves
//! before it installs backing, and commits only if no invalidation touched
//! that range since (`Stage2Table::fault_in_range_if_unchanged`).
//!
//! **Invariants.**
//! - Every invalidation bumps the count of every bucket its windows map to
//!   (all buckets when it spans [`BUCKETS`] windows or more, or the whole
//!   table), with Release, before its subscribers start and before it
//!   releases any backing ([`crate::Gather`]'s invalidate step, next to the
//!   global sequence). So a snapshot read before that invalidation differs
//!   from the value read after it.
//! - A range's value is the sum of the counts of the buckets of the windows
//!   it covers (each bucket once when it covers them all). Counts only grow
//!   (a u64 bumped once per invalidation does not wrap), so the sum changes
//!   whenever one of them is bumped.
//! - Windows share buckets (window index modulo [`BUCKETS`]): an
//!   invalidation elsewhere can fail a commit (a spurious retry), never let
//!   one through.
//! - A commit is checked against its snapshot's own range, which must
//!   contain the committed range; one that does not is checked against the
//!   global sequence instead (conservative: any invalidation fails it).
//!
//! **Why.** With one global count, every unmap anywhere in the VM failed
//! every fault commit in flight, and a failed commit costs the handler an
//! undo (a `MADV_DONTNEED` of what it installed: a TLB shootdown of the
//! process) and a second install. Under `gmm bench fault`'s storm (1 MiB
//! releases of other ranges at ~30 k/s) 1-3 % of the victim's faults
//! retried and set its p99.

use crate::entry::level_size;
use crate::sync::{AtomicU64, Ordering};
use crate::Gpa;

/// Bytes per window: a 2 MiB leaf (the largest leaf a fault installs at
/// the normal geometry) lies in one window.
pub(crate) const WINDOW: u64 = level_size(2);

/// Buckets (a power of two).
#[cfg(not(loom))]
pub(crate) const BUCKETS: usize = 512;
#[cfg(loom)]
pub(crate) const BUCKETS: usize = 4;

/// What a fault handler reads before it resolves `[start, end)`: pass it to
/// the `_if_unchanged` commits, which fail with `Retry` if an invalidation
/// touched the range since.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultSnapshot {
    pub(crate) value: u64,
    pub(crate) global: u64,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

impl FaultSnapshot {
    /// The range's count when the snapshot was read (it moves with every
    /// invalidation that touches the range).
    pub fn value(&self) -> u64 {
        self.value
    }
}

/// The per-window counts.
#[derive(Debug)]
pub(crate) struct FaultSeqs {
    buckets: Box<[AtomicU64]>,
}

impl Default for FaultSeqs {
    fn default() -> Self {
        FaultSeqs {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// The windows `[first, last]` that `[start, end)` touches (`end > start`).
fn windows(start: u64, end: u64) -> (u64, u64) {
    (start / WINDOW, (end - 1) / WINDOW)
}

fn bucket(window: u64) -> usize {
    (window % BUCKETS as u64) as usize
}

impl FaultSeqs {
    /// Bumps the buckets of `[start, end)` (every bucket if `all`).
    pub(crate) fn bump(&self, start: Gpa, end: Gpa, all: bool) {
        if end.0 <= start.0 && !all {
            return;
        }
        let (first, last) = if all {
            (0, u64::MAX)
        } else {
            windows(start.0, end.0)
        };
        if last - first >= BUCKETS as u64 - 1 {
            for b in self.buckets.iter() {
                b.fetch_add(1, Ordering::Release);
            }
        } else {
            for w in first..=last {
                self.buckets[bucket(w)].fetch_add(1, Ordering::Release);
            }
        }
    }

    /// The value of `[start, end)` (`end > start`).
    pub(crate) fn value(&self, start: u64, end: u64) -> u64 {
        let (first, last) = windows(start, end);
        if last - first >= BUCKETS as u64 - 1 {
            self.buckets
                .iter()
                .fold(0u64, |s, b| s.wrapping_add(b.load(Ordering::Acquire)))
        } else {
            (first..=last).fold(0u64, |s, w| {
                s.wrapping_add(self.buckets[bucket(w)].load(Ordering::Acquire))
            })
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_bump_moves_the_ranges_it_touches_and_no_other_window() {
        let s = FaultSeqs::default();
        let here = s.value(4 * WINDOW, 4 * WINDOW + 4096);
        let there = s.value(9 * WINDOW, 10 * WINDOW);
        let both = s.value(3 * WINDOW, 5 * WINDOW);
        s.bump(Gpa(4 * WINDOW + 8192), Gpa(4 * WINDOW + 12288), false);
        assert_ne!(s.value(4 * WINDOW, 4 * WINDOW + 4096), here);
        assert_ne!(s.value(3 * WINDOW, 5 * WINDOW), both);
        assert_eq!(s.value(9 * WINDOW, 10 * WINDOW), there);
    }

    #[test]
    fn large_and_whole_table_bumps_move_every_window() {
        let s = FaultSeqs::default();
        let far = (BUCKETS as u64 * 7 + 3) * WINDOW;
        let v = s.value(far, far + 4096);
        s.bump(Gpa(0), Gpa(BUCKETS as u64 * WINDOW), false);
        let v2 = s.value(far, far + 4096);
        assert_ne!(v2, v);
        s.bump(Gpa(0), Gpa(0), true);
        assert_ne!(s.value(far, far + 4096), v2);
        // A range covering every bucket sees any bump.
        let all = s.value(0, 2 * BUCKETS as u64 * WINDOW);
        s.bump(Gpa(far), Gpa(far + 1), false);
        assert_ne!(s.value(0, 2 * BUCKETS as u64 * WINDOW), all);
    }

    #[test]
    fn windows_a_bucket_apart_share_it() {
        // Aliasing only ever adds retries.
        let s = FaultSeqs::default();
        let alias = BUCKETS as u64 * WINDOW;
        let v = s.value(alias, alias + 4096);
        s.bump(Gpa(0), Gpa(4096), false);
        assert_ne!(s.value(alias, alias + 4096), v);
    }
}

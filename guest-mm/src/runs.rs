//! Runs: the one way this workspace turns pages and ranges into maximal
//! runs.
//!
//! A run is `(start, len)` in any unit (bytes, pages, PFNs). [`merge_runs`]
//! sorts runs and merges every pair that overlaps or touches, so its output
//! is sorted, disjoint and non-adjacent; [`runs_of`] does the same for
//! single items of a fixed size (page addresses, PFNs). Balloon requests,
//! userfaultfd windows and the benchmarks' release patterns all go through
//! here, so a PFN list is coalesced the same way wherever it is.
//!
//! Ends are computed with saturating arithmetic: a run that would pass
//! `u64::MAX` is clipped there instead of wrapping (callers validate ranges
//! before; this only keeps a bad one from wrapping into a small one).

/// Sorted, merged runs: overlapping or touching `(start, len)` runs become
/// one. Empty runs are dropped.
pub fn merge_runs(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.retain(|&(_, l)| l != 0);
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (s, l) in runs {
        let end = s.saturating_add(l);
        match out.last_mut() {
            Some((ps, pl)) if ps.saturating_add(*pl) >= s => {
                *pl = end.max(ps.saturating_add(*pl)) - *ps;
            }
            _ => out.push((s, end - s)),
        }
    }
    out
}

/// Items of size `step` (e.g. page addresses with 4096, PFNs with 1) as
/// sorted maximal runs `(first, len)`; duplicates count once.
pub fn runs_of(items: impl IntoIterator<Item = u64>, step: u64) -> Vec<(u64, u64)> {
    merge_runs(items.into_iter().map(|i| (i, step)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_overlapping_and_touching_runs() {
        assert_eq!(
            merge_runs(vec![
                (0x40_0000, 0x20_0000),
                (0, 0x20_0000),
                (0x20_0000, 0x20_0000)
            ]),
            vec![(0, 0x60_0000)]
        );
        assert_eq!(
            merge_runs(vec![(0x80_0000, 0x20_0000), (0, 0x20_0000)]),
            vec![(0, 0x20_0000), (0x80_0000, 0x20_0000)]
        );
        assert_eq!(merge_runs(vec![(10, 5), (12, 1)]), vec![(10, 5)]);
        assert_eq!(merge_runs(vec![(10, 5), (12, 10)]), vec![(10, 12)]);
        assert_eq!(merge_runs(vec![(3, 0), (7, 0)]), vec![]);
        assert!(merge_runs(Vec::new()).is_empty());
        assert_eq!(
            merge_runs(vec![(u64::MAX - 1, 10)]),
            vec![(u64::MAX - 1, 1)]
        );
    }

    #[test]
    fn items_become_runs_once_each() {
        assert_eq!(
            runs_of(
                [0x40_0000, 0x20_0000, 0x20_1000, 0x20_2000, 0x40_1000, 0x20_1000],
                0x1000
            ),
            vec![(0x20_0000, 0x3000), (0x40_0000, 0x2000)]
        );
        assert_eq!(runs_of([5, 3, 4, 9, 9, 10], 1), vec![(3, 3), (9, 2)]);
        assert!(runs_of([], 1).is_empty());
    }
}

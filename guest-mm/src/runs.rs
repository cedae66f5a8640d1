//! Runs: the one way this workspace turns pages and ranges into maximal
//! runs.
//!
//! A run is `(start, len)` in any unit (bytes, pages, PFNs). [`merge_runs`]
//! sorts runs and merges every pair that overlaps or touches, so its output
//! is sorted, disjoint and non-adjacent; [`runs_of`] does the same for
//! single items of a fixed size (page addresses, PFNs), and
//! [`runs_of_sorted`] for items already sorted, in one pass into a
//! caller's buffer (the balloon's inflate and deflate paths, which sort
//! their PFNs in place: no second sort, no pair per item). Balloon requests,
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

/// [`runs_of`] for `items` sorted in ascending order (duplicates allowed):
/// replaces `out`'s contents with the maximal runs `(first, len)`, in one
/// pass, and returns how many items were duplicates. `out` keeps its
/// capacity, so a caller that reuses it allocates only while it grows.
///
/// Unsorted input is not rejected: an item below the current run's end
/// merges into it (it overlaps it, as a duplicate does) and an item below
/// the run's start begins a new run, so the output is then neither sorted
/// nor disjoint. Callers sort first (`sort_unstable` is linear on sorted
/// input, the common case: guests list pages in order).
pub fn runs_of_sorted(items: &[u64], step: u64, out: &mut Vec<(u64, u64)>) -> u64 {
    out.clear();
    let mut dups = 0u64;
    let mut prev: Option<u64> = None;
    for &i in items {
        let end = i.saturating_add(step);
        match out.last_mut() {
            Some((s, l)) if i >= *s && i <= s.saturating_add(*l) => {
                if prev == Some(i) {
                    dups += 1;
                }
                *l = end.max(s.saturating_add(*l)) - *s;
            }
            _ => out.push((i, end - i)),
        }
        prev = Some(i);
    }
    if step == 0 {
        out.retain(|&(_, l)| l != 0);
    }
    dups
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The one-pass coalescer agrees with the sorting one on any
        /// sorted input, and counts exactly the repeated items.
        #[test]
        fn sorted_runs_match_runs_of(
            mut items in proptest::collection::vec(0u64..4096, 0..512),
            step in prop_oneof![Just(1u64), Just(4096u64), 1u64..64],
            near_top in any::<bool>(),
        ) {
            if near_top {
                for i in &mut items {
                    *i = u64::MAX - *i;
                }
            }
            items.sort_unstable();
            let mut out = vec![(7, 7); 3];
            let dups = runs_of_sorted(&items, step, &mut out);
            prop_assert_eq!(&out, &runs_of(items.iter().copied(), step));
            let mut unique = items.clone();
            unique.dedup();
            prop_assert_eq!(dups, (items.len() - unique.len()) as u64);
        }
    }

    #[test]
    fn sorted_runs_reuse_the_buffer() {
        let mut out = Vec::with_capacity(16);
        let cap = out.capacity();
        assert_eq!(runs_of_sorted(&[3, 4, 4, 5, 9, 10], 1, &mut out), 1);
        assert_eq!(out, vec![(3, 3), (9, 2)]);
        assert_eq!(runs_of_sorted(&[], 1, &mut out), 0);
        assert!(out.is_empty());
        assert_eq!(out.capacity(), cap);
        assert_eq!(
            runs_of_sorted(&[0x1000, 0x2000, 0x2000, 0x5000], 0x1000, &mut out),
            1
        );
        assert_eq!(out, vec![(0x1000, 0x2000), (0x5000, 0x1000)]);
    }

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

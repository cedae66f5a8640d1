//! loom models of the lockless protocol, with the tiny geometry of
//! `cfg(loom)` (2 entries per table page, 4 KiB / 8 KiB / 16 KiB leaves).
//!
//! Run with:
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p guest-mm --test loom --release`
//!
//! Rules guarded (`GMM_BREAK_RULE`, feature `mutation`; each model fails
//! with its rule broken):
//! - `walker_vs_unmap_vs_deferred_free`: `grace_period`, `unhook_order`,
//!   `deferred_free`;
//! - `racing_unmappers_complete_only_after_release`: `pending_wait`;
//! - `cache_shootdown_vs_release`: `cache_shootdown` (and `grace_period`,
//!   `unhook_order`);
//! - `leaf_cache_vs_unlink_and_free`: `leaf_cache_unlink`;
//! - `dir_cache_vs_leaf_unlink_and_free`: no switch (a leaf table
//!   reached through a cached level-2 page is unlinked; leaf pages live in
//!   the leaf arena and are never freed, so `deferred_free`, which it
//!   guarded before the arena, cannot reach it: seen in the full
//!   `gmm mutation` run of 2026-12-05);
//! - `split_is_atomic_for_walkers`: no switch (invariant 4);
//! - `arena_walk_vs_remove_and_remap`: `grace_period` (and `leaf_clear`,
//!   which leaves the entries the map then refuses to overwrite);
//! - `fault_commit_vs_unmap`: `fault_cas` (and `deferred_free`);
//! - `fault_commit_vs_split`: `fault_cas`.
#![cfg(loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

use guest_mm::*;

const FAKE: u64 = 0x10_0000_0000;
const PAGE: u64 = 4096;

/// A table with `pages` 4 KiB pages mapped at GPA 0 with leaves up to
/// `leaf`, whose simulated backing calls `released(i)` for every 4 KiB
/// page `i` it releases.
fn table_with(
    pages: u64,
    leaf: PageSize,
    released: impl Fn(u64) + Send + Sync + 'static,
) -> Arc<Stage2Table> {
    let t = Stage2Table::new(TableConfig {
        yield_entries: 64,
        ..TableConfig::default()
    })
    .unwrap();
    t.register_backing(BackingRegion {
        hva: Hva(FAKE),
        len: 1 << 20,
        kind: BackingKind::Simulated {
            hook: Some(std::sync::Arc::new(move |h: Hva, len| {
                let first = (h.0 - FAKE) / PAGE;
                for p in first..first + len / PAGE {
                    released(p);
                }
            })),
        },
    })
    .unwrap();
    t.map(Gpa(0), Hva(FAKE), pages * PAGE, Perms::RW, leaf)
        .unwrap();
    t
}

/// [`table_with`]; the returned bitmask gets bit i when page i's backing
/// is released.
fn setup(pages: u64, leaf: PageSize) -> (Arc<Stage2Table>, Arc<AtomicUsize>) {
    let released = Arc::new(AtomicUsize::new(0));
    let r2 = released.clone();
    let t = table_with(pages, leaf, move |p| {
        r2.fetch_or(1 << p, Ordering::Relaxed);
    });
    (t, released)
}

/// A walker racing two unmaps that unlink and free table pages.
///
/// Pages 0-1 are mapped (4 KiB leaves, leaf table A, under level-2 page
/// P0); pages 4-5 were mapped and discarded (leaf table B holds only
/// markers, under level-2 page P1, which maps nothing else: pages 2-3 and
/// 6-7 were removed). The main thread first removes pages 4-5: B (a leaf
/// page: it stays in the leaf arena) and P1 are unlinked by a gather that
/// invalidates nothing, so no grace period runs in that flush and only
/// deferred freeing keeps P1 allocated for a walker already inside it.
/// Then it removes pages 0-1 (invalidation, grace period, release). The
/// walker, in one read section, walks through P1 into B and translates
/// page 1: it never reads a freed (poisoned) page, and page 1's backing
/// stays until it unpins.
#[test]
fn walker_vs_unmap_vs_deferred_free() {
    loom::model(|| {
        let (t, released) = setup(8, PageSize::Size4K);
        for (first, mode) in [
            (2, UnmapMode::Remove),
            (6, UnmapMode::Remove),
            (4, UnmapMode::Discard),
        ] {
            let mut g = t.gather();
            t.unmap(&mut g, Gpa(first * PAGE), 2 * PAGE, mode).unwrap();
            g.finish().unwrap();
        }
        assert_eq!(released.load(Ordering::Relaxed), 0b1111_1100);
        let t2 = t.clone();
        let rel = released.clone();
        let w = thread::spawn(move || {
            let mut walker = Walker::new(&t2);
            let g = walker.pin();
            match g.translate(Gpa(5 * PAGE), Access::Read) {
                Err(WalkError::Discarded(_) | WalkError::NotMapped(_)) => {}
                Err(WalkError::UseAfterFree(_)) => {
                    panic!("walked a table page freed under a reader")
                }
                r => panic!("page 5 is discarded or gone, the walk said {r:?}"),
            }
            match g.translate(Gpa(PAGE), Access::Read) {
                Ok(tr) => {
                    assert_eq!(tr.hva, Hva(FAKE + PAGE));
                    assert_eq!(
                        rel.load(Ordering::Relaxed) & 2,
                        0,
                        "backing released under a reader"
                    );
                }
                Err(WalkError::NotMapped(_)) => {}
                Err(e) => panic!("walk failed: {e:?}"),
            }
        });
        let mut g = t.gather();
        t.unmap(&mut g, Gpa(4 * PAGE), 2 * PAGE, UnmapMode::Remove)
            .unwrap();
        let st = g.finish().unwrap();
        assert_eq!(st.release_runs, 0, "markers have nothing to release");
        let mut g = t.gather();
        t.unmap(&mut g, Gpa(0), 2 * PAGE, UnmapMode::Remove)
            .unwrap();
        g.finish().unwrap();
        t.rcu_barrier();
        assert_eq!(released.load(Ordering::Relaxed), 0b1111_1111);
        w.join().unwrap();
        assert_eq!(t.stats().use_after_free, 0);
    });
}

/// Two unmappers of one range: neither may return (Ok or NotMapped)
/// before every page of the range is released.
#[test]
fn racing_unmappers_complete_only_after_release() {
    loom::model(|| {
        let (t, released) = setup(2, PageSize::Size4K);
        let t2 = t.clone();
        let rel = released.clone();
        let b = thread::spawn(move || {
            let mut g = t2.gather();
            let r = t2.unmap(&mut g, Gpa(0), 2 * PAGE, UnmapMode::Remove);
            g.finish().unwrap();
            assert_eq!(
                rel.load(Ordering::Relaxed),
                3,
                "second unmapper completed early"
            );
            r
        });
        let mut g = t.gather();
        let r = t.unmap(&mut g, Gpa(0), 2 * PAGE, UnmapMode::Remove);
        g.finish().unwrap();
        assert_eq!(
            released.load(Ordering::Relaxed),
            3,
            "first unmapper completed early"
        );
        let rb = b.join().unwrap();
        // Each either unmapped or found the other's hole; not both a hole.
        for x in [&r, &rb] {
            assert!(matches!(x, Ok(()) | Err(UnmapError::NotMapped(_))), "{x:?}");
        }
        assert!(r.is_ok() || rb.is_ok(), "{r:?} {rb:?}");
    });
}

/// A translation cached before an unmap is never used after the backing
/// is released. The translation cache holds huge-leaf pages and pages
/// reached by a walk from the root, never a 4 KiB leaf the leaf arena's
/// one load answers: so the walker's first translation is of a huge
/// ("2M", two pages here) leaf, which walks from the root and fills the
/// cache, and the unmap discards the whole leaf. The 4 KiB case runs the
/// same race through the one-load path.
#[test]
fn cache_shootdown_vs_release() {
    for (pages, leaf) in [(2, PageSize::Size2M), (1, PageSize::Size4K)] {
        loom::model(move || {
            let (t, released) = setup(pages, leaf);
            let t2 = t.clone();
            let rel = released.clone();
            let w = thread::spawn(move || {
                let mut walker = Walker::new(&t2);
                {
                    let g = walker.pin();
                    match g.translate(Gpa(0), Access::Read) {
                        Ok(tr) => assert_eq!(tr.hva, Hva(FAKE)),
                        Err(e) => assert!(matches!(e, WalkError::Discarded(_)), "{e:?}"),
                    }
                }
                let g = walker.pin();
                match g.translate(Gpa(0), Access::Read) {
                    Ok(tr) => {
                        assert_eq!(tr.hva, Hva(FAKE));
                        assert_eq!(
                            rel.load(Ordering::Relaxed),
                            0,
                            "cached translation used after release ({leaf:?} leaf)"
                        );
                    }
                    Err(e) => assert!(matches!(e, WalkError::Discarded(_)), "{e:?}"),
                }
            });
            let mut g = t.gather();
            t.unmap(&mut g, Gpa(0), pages * PAGE, UnmapMode::Discard)
                .unwrap();
            g.finish().unwrap();
            w.join().unwrap();
        });
    }
}

/// A leaf table that a walker reaches through its cached level-2 page
/// (cached in an earlier read section) is unlinked by a flush that
/// invalidates nothing (it holds only markers) and then freed by a grace
/// period, while the walker pins again and translates through the cached
/// level-2 page: the level-2 entry is read live, so the walker either
/// sees the leaf table (and the grace period waits for it) or nothing;
/// it never reads the freed page. Leaf tables move no unlink sequence:
/// this is the unmap storm's case, with the walker's cache kept.
#[test]
fn dir_cache_vs_leaf_unlink_and_free() {
    loom::model(|| {
        // Pages 0-1: leaf table A (keeps the level-2 page); pages 2-3:
        // leaf table B, discarded (markers only).
        let (t, _) = setup(4, PageSize::Size4K);
        let mut g = t.gather();
        t.unmap(&mut g, Gpa(2 * PAGE), 2 * PAGE, UnmapMode::Discard)
            .unwrap();
        g.finish().unwrap();
        let mut walker = Walker::new(&t);
        {
            // Caches the level-2 page.
            let g = walker.pin();
            let r = g.translate(Gpa(2 * PAGE), Access::Read);
            assert_eq!(r.map(|t| t.hva), Err(WalkError::Discarded(Gpa(2 * PAGE))));
        }
        let w = thread::spawn(move || {
            let g = walker.pin();
            for a in [Gpa(2 * PAGE), Gpa(3 * PAGE)] {
                match g.translate(a, Access::Read) {
                    Err(WalkError::Discarded(_) | WalkError::NotMapped(_)) => {}
                    other => panic!("translating {a} through the cached level-2 page: {other:?}"),
                }
            }
        });
        let mut g = t.gather();
        t.unmap(&mut g, Gpa(2 * PAGE), 2 * PAGE, UnmapMode::Remove)
            .unwrap();
        g.finish().unwrap();
        t.rcu_barrier();
        w.join().unwrap();
        assert_eq!(t.stats().use_after_free, 0);
    });
}

/// A level-2 page that a walker cached in an earlier read section is
/// unlinked (its whole range emptied, by a flush that invalidates
/// nothing: it held only a marker) and then freed by a grace period,
/// while the walker pins again and translates through its cache: it
/// never reads the freed page. Only the unlink sequence (bumped right
/// after the unhook, before any grace period can free the page) tells
/// the walker; no invalidation happens.
#[test]
fn leaf_cache_vs_unlink_and_free() {
    loom::model(|| {
        // Page 0 keeps the level-3 page; page 4 (the second level-2
        // page's range) is discarded: a marker, all that range holds.
        let (t, _) = setup(8, PageSize::Size4K);
        let mut g = t.gather();
        t.unmap(&mut g, Gpa(PAGE), 3 * PAGE, UnmapMode::Remove)
            .unwrap();
        t.unmap(&mut g, Gpa(5 * PAGE), 3 * PAGE, UnmapMode::Remove)
            .unwrap();
        t.unmap(&mut g, Gpa(4 * PAGE), PAGE, UnmapMode::Discard)
            .unwrap();
        g.finish().unwrap();
        let mut walker = Walker::new(&t);
        {
            // Caches the second level-2 page.
            let g = walker.pin();
            let r = g.translate(Gpa(4 * PAGE), Access::Read);
            assert_eq!(r.map(|t| t.hva), Err(WalkError::Discarded(Gpa(4 * PAGE))));
        }
        let w = thread::spawn(move || {
            let g = walker.pin();
            match g.translate(Gpa(4 * PAGE), Access::Read) {
                Err(WalkError::Discarded(_) | WalkError::NotMapped(_)) => {}
                other => panic!("translating through the cached level-2 page: {other:?}"),
            }
        });
        let mut g = t.gather();
        t.unmap(&mut g, Gpa(4 * PAGE), PAGE, UnmapMode::Remove)
            .unwrap();
        g.finish().unwrap();
        t.rcu_barrier();
        w.join().unwrap();
        assert_eq!(t.stats().use_after_free, 0);
    });
}

/// The leaf arena's one load against the reuse of its page: a walker
/// whose directory cache holds the level-2 page translates page 1 through
/// the arena while the main thread removes pages 0-1 (their leaf page is
/// unlinked, and stays where it is) and maps them again to other backing
/// (the same leaf page is linked again). The walker sees the old backing,
/// still not released while it is pinned, the new one, or nothing; and a
/// later read section, with the directory still cached (only a leaf page
/// was unlinked), sees the new backing.
#[test]
fn arena_walk_vs_remove_and_remap() {
    loom::model(|| {
        let (t, released) = setup(4, PageSize::Size4K);
        let mut walker = Walker::new(&t);
        {
            // Caches the level-2 page (pages 0-3).
            let g = walker.pin();
            let r = g.translate(Gpa(2 * PAGE), Access::Read);
            assert_eq!(r.map(|t| t.hva), Ok(Hva(FAKE + 2 * PAGE)));
        }
        let rel = released.clone();
        let w = thread::spawn(move || {
            {
                let g = walker.pin();
                match g.translate(Gpa(PAGE), Access::Read).map(|t| t.hva) {
                    Ok(h) if h == Hva(FAKE + PAGE) => assert_eq!(
                        rel.load(Ordering::Relaxed) & 2,
                        0,
                        "backing released under a reader"
                    ),
                    Ok(h) => assert_eq!(h, Hva(FAKE + 9 * PAGE)),
                    Err(e) => assert_eq!(e, WalkError::NotMapped(Gpa(PAGE))),
                }
            }
            walker
        });
        let mut g = t.gather();
        t.unmap(&mut g, Gpa(0), 2 * PAGE, UnmapMode::Remove)
            .unwrap();
        g.finish().unwrap();
        t.map(
            Gpa(0),
            Hva(FAKE + 8 * PAGE),
            2 * PAGE,
            Perms::RW,
            PageSize::Size4K,
        )
        .unwrap();
        let mut walker = w.join().unwrap();
        assert_eq!(released.load(Ordering::Relaxed) & 3, 3);
        let hits = walker.stats().leaf_hits;
        let r = {
            let g = walker.pin();
            g.translate(Gpa(PAGE), Access::Read).map(|t| t.hva)
        };
        assert_eq!(r, Ok(Hva(FAKE + 9 * PAGE)));
        let st = walker.stats();
        assert_eq!(st.leaf_hits, hits + 1, "not through the arena: {st:?}");
    });
}

/// Splitting a huge leaf swaps the sub-table in with one store: a walker
/// of a page that stays mapped always translates it.
#[test]
fn split_is_atomic_for_walkers() {
    loom::model(|| {
        // one 8 KiB ("2M") leaf
        let (t, _) = setup(2, PageSize::Size2M);
        let t2 = t.clone();
        let w = thread::spawn(move || {
            let mut walker = Walker::new(&t2);
            let g = walker.pin();
            let tr = g
                .translate_uncached(Gpa(0), Access::Read)
                .expect("page 0 must stay mapped");
            assert_eq!(tr.hva, Hva(FAKE));
        });
        let mut g = t.gather();
        t.unmap(&mut g, Gpa(PAGE), PAGE, UnmapMode::Remove).unwrap();
        g.finish().unwrap();
        w.join().unwrap();
    });
}

/// Like [`setup`], but counting releases per page (page i's count in
/// slot i), so a test can tell a page released twice (once by a discard,
/// once more after a fault restored it) from one released once.
fn setup_counting(pages: u64, leaf: PageSize) -> (Arc<Stage2Table>, Arc<[AtomicUsize; 2]>) {
    let counts = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let c2 = counts.clone();
    let t = table_with(pages, leaf, move |p| {
        c2[p as usize].fetch_add(1, Ordering::Relaxed);
    });
    (t, counts)
}

/// A lock-free fault commit racing an unmap that removes the page and
/// unlinks its (then empty) table page.
///
/// Pages 0-1 (4 KiB leaves, one leaf table) are discarded. A fault
/// restores page 0 with compare-and-swap while the main thread removes
/// both pages. Exactly one wins the entry: either the fault restored it
/// first and the unmap, losing its own swap, zaps the restored leaf and
/// releases it again, or the unmap cleared it first and the fault finds
/// nothing mapped. Never a restored page that stays mapped after the
/// unmap, or one dropped without its release (rule `fault_cas`); never a
/// read of the freed table page (rule `deferred_free`).
#[test]
fn fault_commit_vs_unmap() {
    loom::model(|| {
        let (t, counts) = setup_counting(2, PageSize::Size4K);
        let mut g = t.gather();
        t.unmap(&mut g, Gpa(0), 2 * PAGE, UnmapMode::Discard)
            .unwrap();
        g.finish().unwrap();
        let t2 = t.clone();
        let f = thread::spawn(move || {
            let mut w = Walker::new(&t2);
            w.fault_in(Gpa(0))
        });
        let mut g = t.gather();
        t.unmap(&mut g, Gpa(0), 2 * PAGE, UnmapMode::Remove)
            .unwrap();
        g.finish().unwrap();
        let r = f.join().unwrap();
        t.rcu_barrier();
        assert_eq!(t.query(Gpa(0)), PageState::Unmapped, "fault: {r:?}");
        let released = counts[0].load(Ordering::Relaxed);
        match r {
            Ok(FaultOutcome::Restored { .. }) => {
                assert_eq!(released, 2, "a restored page was unmapped without release")
            }
            // Not mapped: the unmap cleared the marker first, or the
            // fault's leaf lived only until the unmap zapped (and released)
            // it and the fault's second check undid nothing and retried.
            Err(FaultError::NotMapped(_)) => assert!((1..=2).contains(&released), "{released}"),
            other => panic!("fault: {other:?}"),
        }
        assert_eq!(t.stats().use_after_free, 0);
    });
}

/// The handler's commit against a snapshot, racing another fault and a
/// new discard of the same page (the marker comes back identical: ABA).
/// A commit that restores the page after the new discard must have taken
/// its snapshot after it too: one taken before must be refused (rule
/// `fault_seq`), or the handler keeps backing it installed before the
/// discard released it.
#[test]
fn fault_commit_vs_rediscard() {
    loom::model(|| {
        let (t, _) = setup_counting(2, PageSize::Size4K);
        let discard = |t: &Stage2Table| {
            let mut g = t.gather();
            t.unmap(&mut g, Gpa(0), PAGE, UnmapMode::Discard).unwrap();
            g.finish().unwrap();
        };
        discard(&t);
        let t2 = t.clone();
        let f = thread::spawn(move || {
            let mut w = Walker::new(&t2);
            let snap = t2.fault_seq(Gpa(0), PAGE);
            (snap, w.fault_in_range_if_unchanged(Gpa(0), PAGE, snap))
        });
        let restored = t.fault_in(Gpa(0));
        discard(&t);
        let (snap, r) = f.join().unwrap();
        if r == Ok(1) && matches!(t.query(Gpa(0)), PageState::Present { .. }) {
            // The commit came after the discard (the only one since the
            // setup); so must the snapshot.
            assert_eq!(
                snap.value(),
                t.fault_seq(Gpa(0), PAGE).value(),
                "a commit restored the page with a snapshot from before its discard \
                 (other fault: {restored:?})"
            );
        }
        assert_eq!(t.stats().use_after_free, 0);
    });
}

/// A lock-free fault commit racing the split of the huge marker it
/// restores: a protect of one half splits the discarded 8 KiB ("2M")
/// marker while a fault restores the other half. Whichever order, the
/// faulted page ends present: a split that lost its swap to the fault
/// splits the present leaf (rule `fault_cas`).
#[test]
fn fault_commit_vs_split() {
    loom::model(|| {
        let (t, _) = setup_counting(2, PageSize::Size2M);
        let mut g = t.gather();
        t.unmap(&mut g, Gpa(0), 2 * PAGE, UnmapMode::Discard)
            .unwrap();
        g.finish().unwrap();
        let t2 = t.clone();
        let f = thread::spawn(move || {
            let mut w = Walker::new(&t2);
            w.fault_in(Gpa(PAGE))
        });
        let mut g = t.gather();
        t.protect(&mut g, Gpa(0), PAGE, Perms::R).unwrap();
        g.finish().unwrap();
        let r = f.join().unwrap();
        assert!(matches!(r, Ok(FaultOutcome::Restored { .. })), "{r:?}");
        assert!(
            matches!(t.query(Gpa(PAGE)), PageState::Present { .. }),
            "the restored page was lost to the split: {:?}",
            t.query(Gpa(PAGE))
        );
        assert_eq!(t.stats().use_after_free, 0);
    });
}

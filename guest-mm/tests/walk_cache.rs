//! The fast walk's directory cache (`guest-mm/src/walk.rs`): a cached
//! level-2 table page is never used after it could have been freed, a
//! leaf table unlinked under it empties no cache and no page of it
//! translates any more (its page stays in the leaf arena, empty), and the
//! cached walk answers what a walk from the root answers.
//!
//! `leaf_table_unlink_keeps_the_directory` is also a detector of the rule
//! `leaf_clear`: with it broken the removed pages still translate. It and
//! `leaf_cache_forgets_freed_pages` are detectors of `leaf_kept`: with a
//! leaf page poisoned when it goes back to the arena, the one-load path
//! translates the poison in the removed range.
//!
//! `leaf_cache_forgets_freed_pages` is the detector of the `mutation` rule
//! `leaf_cache_unlink` (`GMM_BREAK_RULE=leaf_cache_unlink`): it fails when
//! a walker keeps its cached level-2 pages across an unlink-sequence move.

// These tests use real threads and memory and the full geometry; under
// `--cfg loom` (tiny geometry, loom's primitives) only `tests/loom.rs` runs.
#![cfg(not(loom))]

use guest_mm::{
    Access, BackingKind, BackingRegion, Gpa, Hva, PageSize, Perms, Stage2Table, TableConfig,
    UnmapMode, WalkError,
};

const FAKE: u64 = 0x1000_0000_0000;
const PAGE: u64 = 4096;
const TWO_M: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

fn table() -> std::sync::Arc<Stage2Table> {
    let t = Stage2Table::new(TableConfig::default()).expect("table");
    t.register_backing(BackingRegion {
        hva: Hva(FAKE),
        len: 2 << 30,
        kind: BackingKind::Simulated { hook: None },
    })
    .expect("backing");
    t
}

/// A level-2 table page that a walker cached is unlinked (its whole GiB
/// emptied) by a flush that invalidates nothing (it held only a marker),
/// then freed (poisoned) by a grace period. No invalidation-sequence move
/// tells the walker; only the unlink sequence does. Its next translation
/// there must walk from the root and find nothing, never read the freed
/// page.
#[test]
fn leaf_cache_forgets_freed_pages() {
    let t = table();
    // Keep the level-3 page alive: GiB 0 stays mapped.
    t.map(Gpa(0), Hva(FAKE), PAGE, Perms::RW, PageSize::Size4K)
        .expect("map neighbour");
    let gpa = Gpa(GIB + 5 * TWO_M + 7 * PAGE);
    t.map(gpa, Hva(FAKE + gpa.0), PAGE, Perms::RW, PageSize::Size4K)
        .expect("map");
    let mut g = t.gather();
    t.unmap(&mut g, gpa, PAGE, UnmapMode::Discard)
        .expect("discard");
    g.finish().expect("flush discard");

    let mut w = t.walker();
    {
        // The walk goes through GiB 1's level-2 page: it is cached.
        let g = w.pin();
        assert_eq!(
            g.translate(gpa, Access::Read).map(|t| t.hva),
            Err(WalkError::Discarded(gpa))
        );
        // Another page of the GiB: answered from the cached page.
        assert_eq!(
            g.translate(Gpa(gpa.0 + PAGE), Access::Read).map(|t| t.hva),
            Err(WalkError::NotMapped(Gpa(gpa.0 + PAGE)))
        );
    }
    let before = w.stats();
    assert!(
        before.leaf_hits >= 1,
        "the level-2 page was not cached: {before:?}"
    );

    // Remove the marker: the leaf table and the level-2 page empty and
    // are unlinked, in a flush with nothing to invalidate; then free them.
    let seq = t.invalidate_seq();
    let mut g = t.gather();
    t.unmap(&mut g, gpa, PAGE, UnmapMode::Remove)
        .expect("remove");
    g.finish().expect("flush remove");
    assert_eq!(
        t.invalidate_seq(),
        seq,
        "the remove must invalidate nothing"
    );
    t.rcu_barrier();

    let g = w.pin();
    for a in [gpa, Gpa(gpa.0 + PAGE), Gpa(gpa.0 + 100 * TWO_M)] {
        assert_eq!(
            g.translate(a, Access::Read).map(|t| t.hva),
            Err(WalkError::NotMapped(a)),
            "a translation in the removed GiB read {}",
            if matches!(
                g.translate(a, Access::Read),
                Err(WalkError::UseAfterFree(_))
            ) {
                "the freed level-2 page (use-after-free)"
            } else {
                "something else"
            }
        );
    }
    drop(g);
    let after = w.stats();
    assert_eq!(after.use_after_free, 0, "{after:?}");
    assert_eq!(t.stats().use_after_free, 0);
    assert!(after.leaf_flushes > before.leaf_flushes, "{after:?}");
}

/// The unmap storm's case: a whole 2 MiB is removed and its leaf table
/// unlinked while other pages of the GiB stay mapped. The walker keeps
/// its cached level-2 page (nothing it caches was unlinked: no flush),
/// reads the unlinked leaf page's cleared entries in the leaf arena (or
/// the cleared level-2 entry) live, and finds nothing; the rest of the
/// GiB still translates from the cache.
#[test]
fn leaf_table_unlink_keeps_the_directory() {
    let t = table();
    t.map(Gpa(0), Hva(FAKE), 4 * TWO_M, Perms::RW, PageSize::Size4K)
        .expect("map");
    let mut w = t.walker();
    {
        let g = w.pin();
        for r in 0..4 {
            let a = Gpa(r * TWO_M + 3 * PAGE);
            assert_eq!(
                g.translate(a, Access::Read).map(|t| t.hva),
                Ok(Hva(FAKE + a.0))
            );
        }
    }
    let before = w.stats();
    let mut g = t.gather();
    t.unmap(&mut g, Gpa(TWO_M), TWO_M, UnmapMode::Remove)
        .expect("remove 2 MiB");
    g.finish().expect("flush");
    t.rcu_barrier();
    assert_eq!(t.stats().use_after_free, 0);

    let g = w.pin();
    for p in [0, 3, 511] {
        let a = Gpa(TWO_M + p * PAGE);
        assert_eq!(
            g.translate(a, Access::Read).map(|t| t.hva),
            Err(WalkError::NotMapped(a))
        );
    }
    for r in [0, 2, 3] {
        let a = Gpa(r * TWO_M + 9 * PAGE);
        assert_eq!(
            g.translate(a, Access::Read).map(|t| t.hva),
            Ok(Hva(FAKE + a.0))
        );
    }
    drop(g);
    let after = w.stats();
    assert_eq!(after.use_after_free, 0, "{after:?}");
    assert_eq!(
        after.leaf_flushes, before.leaf_flushes,
        "a leaf-table unlink emptied the directory cache: {after:?}"
    );
    assert!(after.leaf_hits > before.leaf_hits, "{after:?}");
}

/// The cached walk agrees with the walk from the root, page by page, for
/// 4 KiB and 2 MiB leaves, markers and holes, across maps and unmaps.
#[test]
fn cached_walk_agrees_with_uncached() {
    let t = table();
    // Region 0: 4 KiB leaves with holes; region 1: one 2 MiB leaf;
    // region 2: discarded 4 KiB pages; region 3: nothing; region 4: a
    // 2 MiB leaf replaced by another (other backing, other permissions).
    for p in (0..512).filter(|p| p % 3 != 0) {
        t.map(
            Gpa(p * PAGE),
            Hva(FAKE + p * PAGE),
            PAGE,
            Perms::RW,
            PageSize::Size4K,
        )
        .expect("map 4k");
    }
    t.map(
        Gpa(TWO_M),
        Hva(FAKE + TWO_M),
        TWO_M,
        Perms::R,
        PageSize::Size2M,
    )
    .expect("map 2m");
    t.map(
        Gpa(2 * TWO_M),
        Hva(FAKE + 2 * TWO_M),
        64 * PAGE,
        Perms::RW,
        PageSize::Size4K,
    )
    .expect("map region 2");
    t.map(
        Gpa(4 * TWO_M),
        Hva(FAKE + 4 * TWO_M),
        TWO_M,
        Perms::R,
        PageSize::Size2M,
    )
    .expect("map region 4");
    let mut g = t.gather();
    t.unmap(&mut g, Gpa(2 * TWO_M), 32 * PAGE, UnmapMode::Discard)
        .expect("discard");
    g.finish().expect("flush");

    let mut w = t.walker();
    let check = |w: &mut guest_mm::Walker, round: u32| {
        for pass in 0..2 {
            let g = w.pin();
            for p in 0..(5 * TWO_M / PAGE) {
                let a = Gpa(p * PAGE + (p % 8) * 8);
                for access in [Access::Read, Access::Write] {
                    let cached = g.translate(a, access);
                    let uncached = g.translate_uncached(a, access);
                    assert_eq!(cached, uncached, "round {round} pass {pass} at {a}");
                }
            }
        }
    };
    check(&mut w, 0);
    // Change every region and check again (the caches must follow).
    let mut g = t.gather();
    t.unmap_existing(&mut g, Gpa(0), TWO_M, UnmapMode::Remove)
        .expect("remove region 0 (with its holes)");
    t.unmap(&mut g, Gpa(TWO_M + 4 * PAGE), PAGE, UnmapMode::Remove)
        .expect("split region 1");
    t.unmap(&mut g, Gpa(4 * TWO_M), TWO_M, UnmapMode::Remove)
        .expect("remove region 4");
    g.finish().expect("flush");
    t.map(
        Gpa(4 * TWO_M),
        Hva(FAKE + 8 * TWO_M),
        TWO_M,
        Perms::RW,
        PageSize::Size2M,
    )
    .expect("map region 4 again");
    // The walker's last lookups (round 0 ends in region 4) found the old
    // 2 MiB leaf there: the first one now must find the new one.
    {
        let g = w.pin();
        let a = Gpa(4 * TWO_M + 3 * PAGE + 8);
        let got = g.translate(a, Access::Write).expect("new 2 MiB leaf");
        assert_eq!(got.hva, Hva(FAKE + 8 * TWO_M + 3 * PAGE + 8));
        assert_eq!(Ok(got), g.translate_uncached(a, Access::Write));
    }
    t.map(
        Gpa(8 * PAGE),
        Hva(FAKE + 8 * PAGE),
        PAGE,
        Perms::R,
        PageSize::Size4K,
    )
    .expect("remap one page");
    for p in 0..16 {
        t.fault_in(Gpa(2 * TWO_M + p * PAGE)).expect("fault in");
    }
    check(&mut w, 1);
    let s = w.stats();
    assert!(s.leaf_hits > 0, "{s:?}");
    assert_eq!(s.use_after_free, 0);
}

/// A 1 GiB leaf has no level-2 page for the directory cache: its first
/// translation walks from the root and fills the translation cache, which
/// answers the second, and both agree with the walk from the root.
#[test]
fn translation_cache_answers_a_gib_leaf() {
    let t = table();
    t.map(Gpa(GIB), Hva(FAKE + GIB), GIB, Perms::RW, PageSize::Size1G)
        .expect("map 1 GiB leaf");
    let a = Gpa(GIB + 3 * TWO_M + 5 * PAGE + 8);
    let mut w = t.walker();
    {
        let g = w.pin();
        let first = g.translate(a, Access::Write);
        assert_eq!(
            first.map(|t| (t.hva, t.size)),
            Ok((Hva(FAKE + a.0), PageSize::Size1G))
        );
        assert_eq!(g.translate(a, Access::Write), first);
        assert_eq!(g.translate_uncached(a, Access::Write), first);
    }
    let s = w.stats();
    assert_eq!(s.cache_hits, 1, "{s:?}");
}

/// The one-load path reads the leaf arena anywhere below its readable end
/// (the end of the highest GiB opened), so every GiB below that end must
/// be readable, opened or not: a GiB that never had a level-2 page, between
/// two that did, reads as empty entries, and past the end nothing is read.
///
/// The detector of the `mutation` rule `arena_readable`
/// (`GMM_BREAK_RULE=arena_readable`): with the GiB between left closed,
/// the translation there faults (the test process dies of SIGSEGV).
#[test]
fn arena_is_readable_below_its_end() {
    let t = table();
    // GiB 2 first, then GiB 0: opening GiB 2 makes GiBs 0 and 1 readable,
    // opening GiB 0 then finds it readable already.
    for base in [2 * GIB, 0] {
        t.map(
            Gpa(base + TWO_M),
            Hva(FAKE + (base >> 4) + TWO_M),
            4 * PAGE,
            Perms::RW,
            PageSize::Size4K,
        )
        .expect("map");
    }
    let mut w = t.walker();
    let g = w.pin();
    for base in [2 * GIB, 0] {
        let a = Gpa(base + TWO_M + PAGE + 8);
        assert_eq!(
            g.translate(a, Access::Read).map(|t| t.hva),
            Ok(Hva(FAKE + (base >> 4) + TWO_M + PAGE + 8))
        );
    }
    // GiB 1 (never opened, below the end), GiB 3 and far past the end.
    for a in [
        GIB,
        GIB + TWO_M + PAGE,
        2 * GIB - PAGE,
        3 * GIB + TWO_M,
        40 * GIB,
    ] {
        let a = Gpa(a);
        assert_eq!(
            g.translate(a, Access::Read).map(|t| t.hva),
            Err(WalkError::NotMapped(a))
        );
        assert_eq!(
            g.translate(a, Access::Read),
            g.translate_uncached(a, Access::Read)
        );
    }
    drop(g);
    assert_eq!(w.stats().use_after_free, 0);
}

/// A walker that last found a 2 MiB leaf starts its next read sections at
/// the directory instead of the leaf arena, until it finds a 4 KiB leaf
/// again: an order of loads only. Sections alternating between a GiB of
/// 2 MiB leaves and one of 4 KiB leaves (and both in one section) answer
/// what the walk from the root answers, and the 4 KiB GiB goes back to the
/// one-load path.
#[test]
fn sections_alternating_leaf_sizes_agree_with_the_root() {
    let t = table();
    t.map(Gpa(0), Hva(FAKE), 8 * TWO_M, Perms::RW, PageSize::Size2M)
        .expect("map 2 MiB leaves");
    t.map(
        Gpa(GIB),
        Hva(FAKE + GIB),
        2 * TWO_M,
        Perms::R,
        PageSize::Size4K,
    )
    .expect("map 4 KiB leaves");
    let mut w = t.walker();
    let huge = |i: u64| Gpa(i * TWO_M + 5 * PAGE + 16);
    let small = |i: u64| Gpa(GIB + i * 7 * PAGE + 8);
    for round in 0..4u64 {
        for (pick, n) in [(0u64, 8u64), (1, 64), (2, 16)] {
            let g = w.pin();
            for i in 0..n {
                let a = match pick {
                    0 => huge(i),
                    1 => small(i),
                    _ if i % 2 == 0 => huge(i / 2),
                    _ => small(i),
                };
                assert_eq!(
                    g.translate(a, Access::Read),
                    g.translate_uncached(a, Access::Read),
                    "round {round}, section {pick}, at {a}"
                );
            }
        }
    }
    // After a section of 2 MiB leaves, then one 4 KiB leaf: the next
    // section reads the arena again. Each translation there is one leaf
    // hit, twice over: a walk that started at the directory would have
    // filled the translation cache, which would answer the second time.
    {
        let g = w.pin();
        g.translate(huge(1), Access::Read).expect("2 MiB");
    }
    {
        let g = w.pin();
        g.translate(small(1), Access::Read).expect("4 KiB");
    }
    let before = w.stats();
    {
        let g = w.pin();
        for _ in 0..2 {
            for i in 2..34 {
                g.translate(small(i), Access::Read).expect("4 KiB");
            }
        }
    }
    let after = w.stats();
    assert_eq!(after.leaf_hits - before.leaf_hits, 64, "{after:?}");
    assert_eq!(after.cache_hits, before.cache_hits, "{after:?}");
    assert_eq!(after.use_after_free, 0);
}

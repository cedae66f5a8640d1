//! loom models of the lockless protocol, with the tiny geometry of
//! `cfg(loom)` (2 entries per table page, 4 KiB / 8 KiB / 16 KiB leaves).
//!
//! Run with:
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p guest-mm --test loom --release`
#![cfg(loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

use guest_mm::*;

const FAKE: u64 = 0x10_0000_0000;
const PAGE: u64 = 4096;

/// A table with `pages` 4 KiB pages mapped at GPA 0 with leaves up to
/// `leaf`; the returned bitmask gets bit i when page i's backing is released.
fn setup(pages: u64, leaf: PageSize) -> (Arc<Stage2Table>, Arc<AtomicUsize>) {
    let t = Stage2Table::new(TableConfig { yield_entries: 64 }).unwrap();
    let released = Arc::new(AtomicUsize::new(0));
    let r2 = released.clone();
    t.register_backing(BackingRegion {
        hva: Hva(FAKE),
        len: 1 << 20,
        kind: BackingKind::Simulated {
            hook: Some(std::sync::Arc::new(move |h: Hva, len| {
                let first = (h.0 - FAKE) / PAGE;
                for p in first..first + len / PAGE {
                    r2.fetch_or(1 << p, Ordering::Relaxed);
                }
            })),
        },
    })
    .unwrap();
    t.map(Gpa(0), Hva(FAKE), pages * PAGE, Perms::RW, leaf)
        .unwrap();
    (t, released)
}

/// A walker racing an unmap that unlinks and frees every table page: it
/// either sees the old translation and its backing stays until it unpins,
/// or sees the page unmapped; it never reads a freed (poisoned) page.
#[test]
fn walker_vs_unmap_vs_deferred_free() {
    loom::model(|| {
        let (t, released) = setup(2, PageSize::Size4K);
        let t2 = t.clone();
        let rel = released.clone();
        let w = thread::spawn(move || {
            let mut walker = Walker::new(&t2);
            let g = walker.pin();
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
        t.unmap(&mut g, Gpa(0), 2 * PAGE, UnmapMode::Remove)
            .unwrap();
        g.finish().unwrap();
        t.rcu_barrier();
        assert_eq!(released.load(Ordering::Relaxed), 3);
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
            let _ = t2.unmap(&mut g, Gpa(0), 2 * PAGE, UnmapMode::Remove);
            g.finish().unwrap();
            assert_eq!(
                rel.load(Ordering::Relaxed),
                3,
                "second unmapper completed early"
            );
        });
        let mut g = t.gather();
        let _ = t.unmap(&mut g, Gpa(0), 2 * PAGE, UnmapMode::Remove);
        g.finish().unwrap();
        assert_eq!(
            released.load(Ordering::Relaxed),
            3,
            "first unmapper completed early"
        );
        b.join().unwrap();
    });
}

/// A translation cached before an unmap is never used after the backing
/// is released.
#[test]
fn cache_shootdown_vs_release() {
    loom::model(|| {
        let (t, released) = setup(1, PageSize::Size4K);
        let t2 = t.clone();
        let rel = released.clone();
        let w = thread::spawn(move || {
            let mut walker = Walker::new(&t2);
            {
                let g = walker.pin();
                let _ = g.translate(Gpa(0), Access::Read);
            }
            let g = walker.pin();
            if let Ok(tr) = g.translate(Gpa(0), Access::Read) {
                assert_eq!(tr.hva, Hva(FAKE));
                assert_eq!(
                    rel.load(Ordering::Relaxed),
                    0,
                    "cached translation used after release"
                );
            }
        });
        let mut g = t.gather();
        t.unmap(&mut g, Gpa(0), PAGE, UnmapMode::Discard).unwrap();
        g.finish().unwrap();
        w.join().unwrap();
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

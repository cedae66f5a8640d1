//! Lock-free fault commits racing writers on real threads: every page that
//! becomes present (mapped, or restored by a fault) is released exactly
//! when it stops being present, however the compare-and-swaps interleave.
//!
//! Rule guarded (`GMM_BREAK_RULE`, feature `mutation`): `fault_cas` (a
//! writer's blind store over a leaf a fault just restored drops it without
//! its release: a page that stays resident with nothing mapping it).
//!
//! The accounting is per 4 KiB page: `ups` counts transitions to present
//! (a map, a fault's `Restored`), the simulated backing's release hook
//! counts `downs`. At the end, quiescent, a page may never have been made
//! present more often than released, plus one if it is still present.
//! (More releases than ups is allowed: a fault that lost its second check
//! to a writer leaves its leaf to that writer, which releases it once more.)

// These tests use real threads and memory and the full geometry; under
// `--cfg loom` (tiny geometry, loom's primitives) only `tests/loom.rs` runs.
#![cfg(not(loom))]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use guest_mm::*;

const PAGES: u64 = 16;
const PAGE: u64 = 4096;

struct Counts {
    ups: Vec<AtomicU64>,
    downs: Arc<Vec<AtomicU64>>,
}

fn table() -> (Arc<Stage2Table>, Counts) {
    let t = Stage2Table::new(TableConfig {
        yield_entries: 8,
        ..TableConfig::default()
    })
    .unwrap();
    let downs: Arc<Vec<AtomicU64>> = Arc::new((0..PAGES).map(|_| AtomicU64::new(0)).collect());
    let d2 = downs.clone();
    t.register_backing(BackingRegion {
        hva: Hva(FAKE_HVA),
        len: PAGES * PAGE,
        kind: BackingKind::Simulated {
            hook: Some(Arc::new(move |h: Hva, len| {
                let first = (h.0 - FAKE_HVA) / PAGE;
                for p in first..first + len / PAGE {
                    d2[p as usize].fetch_add(1, Ordering::Relaxed);
                }
            })),
        },
    })
    .unwrap();
    let ups = (0..PAGES).map(|_| AtomicU64::new(0)).collect();
    (t, Counts { ups, downs })
}

fn up(c: &Counts, first: u64, n: u64) {
    for p in first..first + n {
        c.ups[p as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Faulters restore discarded pages while a writer cycles ranges through
/// discard, remove, re-map and protect (which splits 2-page-aligned
/// "huge" neighbours only at 2 MiB; here 4 KiB leaves, so it exercises the
/// marker swaps), until 30 000 restores raced the writer (or 8 s).
#[test]
fn fault_commits_never_lose_a_release() {
    let (t, c) = table();
    let c = Arc::new(c);
    t.map(
        Gpa(0),
        Hva(FAKE_HVA),
        PAGES * PAGE,
        Perms::RW,
        PageSize::Size4K,
    )
    .unwrap();
    up(&c, 0, PAGES);
    let stop = Arc::new(AtomicBool::new(false));
    // Racing restores to reach before the writer stops (or the deadline).
    let total = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(3));
    let mut faulters = Vec::new();
    for k in 0..2u64 {
        let (t, c, stop, start) = (t.clone(), c.clone(), stop.clone(), start.clone());
        let total = total.clone();
        faulters.push(std::thread::spawn(move || {
            let mut w = t.walker();
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ k;
            let mut restored = 0u64;
            start.wait();
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let p = x % PAGES;
                // Half through the waiting entry point, half through the
                // handler's commit (which refuses instead of waiting).
                let restored_now = if x & 1 == 0 {
                    matches!(w.fault_in(Gpa(p * PAGE)), Ok(FaultOutcome::Restored { .. }))
                } else {
                    let seq = t.fault_seq(Gpa(p * PAGE), PAGE);
                    w.fault_in_range_if_unchanged(Gpa(p * PAGE), PAGE, seq) == Ok(1)
                };
                if restored_now {
                    up(&c, p, 1);
                    restored += 1;
                    total.fetch_add(1, Ordering::Relaxed);
                }
            }
            restored
        }));
    }
    let writer = {
        let (t, c, stop, start) = (t.clone(), c.clone(), stop.clone(), start.clone());
        let total = total.clone();
        std::thread::spawn(move || {
            let mut x = 0x2545_f491_4f6c_dd1du64;
            start.wait();
            let deadline = Instant::now() + Duration::from_secs(8);
            let mut ops = 0u64;
            while Instant::now() < deadline && total.load(Ordering::Relaxed) < 30_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let first = x % PAGES;
                let n = 1 + (x >> 8) % 4.min(PAGES - first);
                let (gpa, len) = (Gpa(first * PAGE), n * PAGE);
                let mut g = t.gather();
                match (x >> 16) % 4 {
                    0 | 1 => {
                        let _ = t.unmap_existing(&mut g, gpa, len, UnmapMode::Discard);
                    }
                    2 => {
                        let _ = t.unmap_existing(&mut g, gpa, len, UnmapMode::Remove);
                    }
                    _ => {
                        let _ = t.protect(&mut g, gpa, len, Perms::R);
                    }
                }
                g.finish().unwrap();
                // Map back whatever is unmapped in the range, page by page.
                for p in first..first + n {
                    if t.query(Gpa(p * PAGE)) == PageState::Unmapped
                        && t.map(
                            Gpa(p * PAGE),
                            Hva(FAKE_HVA + p * PAGE),
                            PAGE,
                            Perms::RW,
                            PageSize::Size4K,
                        )
                        .is_ok()
                    {
                        up(&c, p, 1);
                    }
                }
                ops += 1;
            }
            stop.store(true, Ordering::Relaxed);
            ops
        })
    };
    let ops = writer.join().unwrap();
    let restored: u64 = faulters.into_iter().map(|f| f.join().unwrap()).sum();
    t.rcu_barrier();
    let mut leaked = Vec::new();
    for p in 0..PAGES {
        let present = matches!(t.query(Gpa(p * PAGE)), PageState::Present { .. });
        let ups = c.ups[p as usize].load(Ordering::Relaxed);
        let downs = c.downs[p as usize].load(Ordering::Relaxed);
        if ups > downs + u64::from(present) {
            leaked.push((p, ups, downs, present));
        }
    }
    let st = t.stats();
    eprintln!(
        "fault race: {ops} writer ops, {restored} restores, {} cas retries, {} leaked pages",
        st.fault_cas_retries,
        leaked.len()
    );
    assert!(
        ops > 100 && restored > 100,
        "too little racing: {ops} ops, {restored} restores"
    );
    assert!(
        leaked.is_empty(),
        "pages made present more often than released (page, ups, downs, present): {leaked:?}"
    );
    assert_eq!(st.use_after_free, 0);
}

//! Two unmappers racing on one range (the kernel's tlb_flush_pending
//! problem): the second must not report completion before the first has
//! invalidated and released. Faults wait for pending releases too.
//!
//! Rule guarded (`GMM_BREAK_RULE`, feature `mutation`): `pending_wait`.
//! The second thread is seen blocked through the table's gauge of threads
//! waiting for a pending flush, never by sleeping and hoping.

// These tests use real threads and memory and the full geometry; under
// `--cfg loom` (tiny geometry, loom's primitives) only `tests/loom.rs` runs.
#![cfg(not(loom))]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::*;
use guest_mm::*;

const M2: u64 = 2 << 20;

/// Blocks the first invalidation until released.
struct Gate {
    entered: Barrier,
    open: Mutex<bool>,
    cv: std::sync::Condvar,
    armed: AtomicBool,
}

impl InvalidationSubscriber for Gate {
    fn invalidate_range_start(&self, _inv: &Invalidation) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.wait();
            let mut o = self.open.lock().unwrap();
            while !*o {
                o = self.cv.wait(o).unwrap();
            }
        }
    }
}

fn setup() -> (Arc<Stage2Table>, Log, Arc<Gate>) {
    let (t, log) = simulated_table(TableConfig::default());
    t.map(Gpa(0), Hva(FAKE_HVA), 2 * M2, Perms::RW, PageSize::Size4K)
        .unwrap();
    let gate = Arc::new(Gate {
        entered: Barrier::new(2),
        open: Mutex::new(false),
        cv: Default::default(),
        armed: AtomicBool::new(true),
    });
    t.register_subscriber(gate.clone()).unwrap();
    (t, log, gate)
}

fn released_first_range(log: &Log) -> bool {
    log.lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, Ev::Release(h, _) if *h == FAKE_HVA))
}

/// Runs `second` on its own thread while a first unmapper of `[0, M2)`
/// (with `mode`) is held inside its invalidation: `second` must not return
/// before the gate opens (else panics with `early`). Returns the table,
/// `second`'s result, and whether the first unmapper's backing was
/// released by the time `second` returned.
fn while_first_unmap_is_held<R: Send + 'static>(
    mode: UnmapMode,
    early: &str,
    second: impl FnOnce(&Stage2Table) -> R + Send + 'static,
) -> (Arc<Stage2Table>, R, bool) {
    let (t, log, gate) = setup();
    let t1 = t.clone();
    let first = std::thread::spawn(move || {
        let mut g = t1.gather();
        t1.unmap(&mut g, Gpa(0), M2, mode).unwrap();
        g.finish().unwrap();
    });
    gate.entered.wait(); // first has cleared, is inside its invalidation
    let t2 = t.clone();
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let log2 = log.clone();
    let second = std::thread::spawn(move || {
        let r = second(&t2);
        let released = released_first_range(&log2);
        d2.store(true, Ordering::SeqCst);
        (r, released)
    });
    // Wait until `second` is blocked behind the first unmapper's pending
    // flush, or has (wrongly) returned. The deadline only turns a hang
    // into a loud failure; it bounds nothing that passes.
    let deadline = Instant::now() + Duration::from_secs(30);
    while t.pending_waiters() == 0 && !second.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the second thread neither blocked on the pending flush nor returned in 30 s"
        );
        std::thread::yield_now();
    }
    assert!(
        !done.load(Ordering::SeqCst) && !second.is_finished(),
        "{early}"
    );
    assert_eq!(t.pending_waiters(), 1, "exactly the second thread waits");
    *gate.open.lock().unwrap() = true;
    gate.cv.notify_all();
    first.join().unwrap();
    let (r, released) = second.join().unwrap();
    assert_eq!(t.pending_waiters(), 0, "the gauge must come back down");
    (t, r, released)
}

fn race(second_start: u64, second_len: u64, strict: bool) {
    let (t, r, released_before_return) = while_first_unmap_is_held(
        UnmapMode::Remove,
        "second unmapper completed before the first released",
        move |t2| {
            let mut g = t2.gather();
            let r = if strict {
                t2.unmap(&mut g, Gpa(second_start), second_len, UnmapMode::Remove)
            } else {
                t2.unmap_existing(&mut g, Gpa(second_start), second_len, UnmapMode::Remove)
            };
            g.finish().expect("the second unmapper's flush");
            r
        },
    );
    // the first unmapper's backing must be gone when the second returns
    assert!(released_before_return);
    if strict {
        // the hole is the first unmapper's work: NotMapped, but only after it is done
        assert!(matches!(r, Err(UnmapError::NotMapped(_))), "{r:?}");
    } else {
        r.unwrap();
    }
    assert!(t.stats().pending_waits >= 1);
}

#[test]
fn second_unmapper_of_cleared_range_waits_for_first() {
    // everything already cleared by the first: NotMapped, but only after
    race(0, M2, true);
}

#[test]
fn overlapping_unmapper_waits_for_first() {
    // half cleared by the first (but still pending), half its own work
    race(M2 / 2, M2, false);
}

#[test]
fn strict_overlapping_unmapper_reports_hole_only_after_first() {
    race(M2 / 2, M2, true);
}

#[test]
fn fault_waits_for_pending_release() {
    let (t, r, released_before) = while_first_unmap_is_held(
        UnmapMode::Discard,
        "a fault resurrected a page whose release is in flight",
        |t2| t2.fault_in(Gpa(4096)),
    );
    assert!(released_before);
    assert!(matches!(r, Ok(FaultOutcome::Restored { .. })), "{r:?}");
    // and with a sequence snapshot taken before, the fault must retry
    let seq = t.fault_seq(Gpa(4096), 4096);
    let mut g = t.gather();
    t.unmap(&mut g, Gpa(4096), 4096, UnmapMode::Discard)
        .unwrap();
    g.finish().unwrap();
    assert_eq!(
        t.fault_in_if_unchanged(Gpa(4096), seq),
        Err(FaultError::Retry(Gpa(4096)))
    );
}

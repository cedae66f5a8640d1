//! Registering a reader never waits for a grace period.
//!
//! The monitor's userfaultfd handler makes its walker (registers a reader)
//! at its first fault, and that fault may come from a reader pinned in the
//! fast walk (a device thread touching a page never populated yet). If a
//! grace period held the reader-slot lock while it waited for readers, the
//! handler would wait for the grace period, the grace period for the
//! pinned reader, and the reader for the handler: a deadlock (seen in
//! `gmm stress-vm`, the uffd thread parked in `Rcu::register` under the
//! balloon thread's `Rcu::synchronize`).
//!
//! Rule guarded (`GMM_BREAK_RULE`, feature `mutation`): `register_unblocked`
//! (the grace period waits with the slot lock held).

// These tests use real threads and memory and the full geometry; under
// `--cfg loom` (tiny geometry, loom's primitives) only `tests/loom.rs` runs.
#![cfg(not(loom))]

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::*;
use guest_mm::*;

/// How long the registration may take before it counts as blocked. Not a
/// performance limit: unblocked, it takes microseconds; blocked, forever.
const BLOCKED: Duration = Duration::from_secs(10);

#[test]
fn a_reader_registers_while_a_grace_period_waits_for_a_pinned_reader() {
    let (t, _log) = simulated_table(TableConfig::default());
    t.map(
        Gpa(0),
        Hva(FAKE_HVA),
        16 * 4096,
        Perms::RW,
        PageSize::Size4K,
    )
    .unwrap();
    let mut w = t.walker();
    let pinned = w.pin();
    pinned.translate(Gpa(0), Access::Read).unwrap();
    let gps = t.grace_periods();

    // A writer whose flush must wait for the pinned reader.
    let writer = {
        let t = t.clone();
        thread::spawn(move || {
            let mut g = t.gather();
            t.unmap(&mut g, Gpa(0), 4 * 4096, UnmapMode::Remove)
                .unwrap();
            g.finish().unwrap();
        })
    };
    // Let it reach its grace period (it cannot finish one).
    thread::sleep(Duration::from_millis(200));
    assert!(
        !writer.is_finished() && t.grace_periods() == gps,
        "the flush finished while a reader was pinned: it did not wait for a grace period"
    );

    // Another thread registers a reader now (the fault handler's first walker).
    let (tx, rx) = mpsc::channel();
    let registrar = {
        let t = t.clone();
        thread::spawn(move || {
            let w = t.walker();
            let _ = tx.send(());
            drop(w);
        })
    };
    let registered = rx.recv_timeout(BLOCKED).is_ok();

    // Unpin: the grace period, and a blocked registration, can end now.
    drop(pinned);
    writer.join().unwrap();
    registrar.join().unwrap();
    assert!(
        registered,
        "registering a reader waited for a grace period that waited for a pinned reader \
         (a fault handler making its walker would deadlock)"
    );
}

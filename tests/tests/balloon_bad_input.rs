//! Guest-controlled bad input to the virtio-balloon, one test per kind:
//! each is a counted device error (or NEEDS_RESET) of exactly the expected
//! kind and fields, never a panic, never a release outside the guest's
//! releasable RAM, and the device keeps working (every test ends with a
//! good inflate that must succeed).
//!
//! Guards the rules `balloon_bounds` (PFNs past RAM, on inflate and
//! deflate), `balloon_reserved_low` (PFNs and reports below the floor),
//! `desc_length` (zero-length buffers, buffers running past the end of
//! RAM) and `desc_address` (buffers outside RAM, in the MMIO window).

use guest_mm::{Gpa, PageState};
use tests::kvm_or_skip;
use tests::virtio::{balloon_vm, pfns, Driver, F_NEXT, F_WRITE, Q};
use vmm::devices::virtio::balloon::{
    BalloonError, F_REPORTING, F_STATS_VQ, MAX_PFNS_PER_BATCH, MAX_PFNS_PER_CHAIN,
};
use vmm::devices::virtio::mmio::{ConfigError, TransportError};
use vmm::devices::virtio::queue::{ChainError, ChainReadError, LayoutError, QueueError, RingArea};
use vmm::devices::virtio::BusDevice;
use vmm::{Backing, PageSize, Vm};

const MIB: u64 = 1 << 20;
const AREA: u64 = 4 * MIB;
const RAM: u64 = 64 * MIB;
const GOOD: u64 = 40 * MIB;
const FLOOR: u64 = vmm::guest::layout::WORKLOAD_START;

fn setup(name: &str) -> Option<(Vm, Driver)> {
    if !kvm_or_skip(name) {
        return None;
    }
    let vm = balloon_vm("64M", Backing::Anon, PageSize::Size4K);
    let mut d = Driver::new(&vm, AREA);
    assert_eq!(d.init(F_STATS_VQ | F_REPORTING), 0xf);
    Some((vm, d))
}

fn state(vm: &Vm, gpa: u64) -> PageState {
    vm.stage2().table().query(Gpa(gpa))
}

fn present(vm: &Vm, gpa: u64) -> bool {
    matches!(state(vm, gpa), PageState::Present { .. })
}

fn last_error(d: &Driver) -> Option<BalloonError> {
    d.dev().lock().device().recent_errors().last().cloned()
}

fn last_transport_error(d: &Driver) -> Option<TransportError> {
    d.dev().lock().recent_errors().last().cloned()
}

/// The device errors logged since the count was `before`.
fn new_errors(d: &Driver, before: u64) -> Vec<BalloonError> {
    let n = d.dev().counters().errors - before;
    let log = d.dev().lock().device().recent_errors();
    assert!(
        n as usize <= log.len(),
        "{n} new errors, the log keeps {}",
        log.len()
    );
    log[log.len() - n as usize..].to_vec()
}

/// The transport errors logged since the count was `before`.
fn new_transport_errors(d: &Driver, before: u64) -> Vec<TransportError> {
    let t = d.dev().lock();
    let n = (t.errors() - before) as usize;
    let log = t.recent_errors();
    assert!(
        n <= log.len(),
        "{n} new errors, the log keeps {}",
        log.len()
    );
    log[log.len() - n..].to_vec()
}

/// The device still works, nothing was released outside RAM, the low
/// memory is intact.
fn still_works(vm: &Vm, d: &mut Driver, page: u64) {
    let before = d.dev().counters();
    let used = d.used_idx(Q::Inflate);
    d.send_pfns(Q::Inflate, &pfns(page, 4096), 1);
    let after = d.dev().counters();
    assert_eq!(after.pages_inflated, before.pages_inflated + 1);
    assert_eq!(after.errors, before.errors, "{:?}", last_error(d));
    assert_eq!(d.used_idx(Q::Inflate), used.wrapping_add(1));
    assert_eq!(d.dev().lock().status(), 0xf);
    assert!(matches!(state(vm, page), PageState::Ballooned { .. }));
    assert_eq!(vm.stage2().table().stats().release_outside_bytes, 0);
    for a in (0..2 * MIB).step_by(4096) {
        assert!(present(vm, a), "low page {a:#x} was released");
    }
}

#[test]
fn bad_pfns_are_counted_and_skipped() {
    let Some((vm, mut d)) = setup("bad_pfns_are_counted_and_skipped") else {
        return;
    };
    let mut p = vec![
        (RAM >> 12) as u32, // first page past RAM
        ((RAM >> 12) + 1000) as u32,
        u32::MAX,
        0,     // page tables live down there
        0x1ff, // last page of the reserved 2 MiB
    ];
    let bad: Vec<BalloonError> = p
        .iter()
        .map(|&pfn| BalloonError::BadPfn {
            pfn,
            gpa: u64::from(pfn) << 12,
        })
        .collect();
    p.extend(pfns(GOOD, 16 * 4096));
    d.send_pfns(Q::Inflate, &p, 256);
    let c = d.dev().counters();
    assert_eq!((c.bad_pfns, c.errors, c.pages_inflated), (5, 5, 16));
    assert_eq!((c.bytes_released, c.runs), (16 * 4096, 1));
    assert_eq!(new_errors(&d, 0), bad);
    assert_eq!(d.used_idx(Q::Inflate), 1);
    for a in (GOOD..GOOD + 16 * 4096).step_by(4096) {
        assert!(matches!(state(&vm, a), PageState::Ballooned { .. }));
    }
    assert!(present(&vm, GOOD + 16 * 4096));
    assert!(present(&vm, RAM - 4096), "the last page of RAM");
    still_works(&vm, &mut d, GOOD + MIB);
}

/// Deflate checks its PFNs as inflate does: a bad PFN is counted, the good
/// ones still come out of the balloon.
#[test]
fn bad_pfns_on_deflate_are_counted_and_skipped() {
    let Some((vm, mut d)) = setup("bad_pfns_on_deflate_are_counted_and_skipped") else {
        return;
    };
    d.send_pfns(Q::Inflate, &pfns(GOOD, 4 * 4096), 256);
    let mut p = vec![(RAM >> 12) as u32, 0x1ff, u32::MAX, 0];
    let bad: Vec<BalloonError> = p
        .iter()
        .map(|&pfn| BalloonError::BadPfn {
            pfn,
            gpa: u64::from(pfn) << 12,
        })
        .collect();
    p.extend(pfns(GOOD, 4 * 4096));
    d.send_pfns(Q::Deflate, &p, 3);
    let c = d.dev().counters();
    assert_eq!((c.bad_pfns, c.errors, c.pages_deflated), (4, 4, 4));
    assert_eq!(new_errors(&d, 0), bad);
    assert_eq!(d.used_idx(Q::Deflate), 3);
    assert!(matches!(state(&vm, GOOD), PageState::Discarded { .. }));
    still_works(&vm, &mut d, GOOD + MIB);
}

#[test]
fn pfn_array_of_wrong_length_is_refused_whole() {
    let Some((vm, mut d)) = setup("pfn_array_of_wrong_length_is_refused_whole") else {
        return;
    };
    let at = d.buf(0);
    let mut b = ((GOOD >> 12) as u32).to_le_bytes().to_vec();
    b.extend_from_slice(&[1, 2]);
    d.mem.write(at, &b).unwrap();
    d.desc(Q::Inflate, 0, at, 6, 0, 0);
    d.publish(Q::Inflate, &[0]);
    d.notify(Q::Inflate);
    assert_eq!(last_error(&d), Some(BalloonError::PfnLength { len: 6 }));
    assert!(present(&vm, GOOD), "nothing of a refused array is released");
    assert_eq!(d.used_idx(Q::Inflate), 1, "the chain is still returned");
    still_works(&vm, &mut d, GOOD + MIB);
}

#[test]
fn duplicates_are_released_once() {
    let Some((vm, mut d)) = setup("duplicates_are_released_once") else {
        return;
    };
    let page = (GOOD >> 12) as u32;
    let mut p = vec![page; 300];
    p.extend(pfns(GOOD, 8 * 4096));
    d.send_pfns(Q::Inflate, &p, 100);
    let c = d.dev().counters();
    assert_eq!((c.duplicate_pfns, c.pages_inflated, c.errors), (300, 8, 0));
    assert_eq!(c.bytes_released, 8 * 4096);
    // Inflating ballooned pages again releases and counts nothing more:
    // the device's count of ballooned pages stays what the guest gave.
    d.send_pfns(Q::Inflate, &pfns(GOOD, 8 * 4096), 256);
    let c = d.dev().counters();
    assert_eq!((c.bytes_released, c.pages_inflated), (8 * 4096, 8));
    assert_eq!(d.dev().lock().device().ballooned_pages(), 8);
    // Half of them again with 8 new ones: only the new ones count.
    d.send_pfns(Q::Inflate, &pfns(GOOD + 4 * 4096, 12 * 4096), 256);
    let c = d.dev().counters();
    assert_eq!((c.bytes_released, c.pages_inflated), (16 * 4096, 16));
    assert_eq!(d.dev().lock().device().ballooned_pages(), 16);
    still_works(&vm, &mut d, GOOD + MIB);
}

#[test]
fn huge_pfn_counts_are_refused() {
    let Some((vm, mut d)) = setup("huge_pfn_counts_are_refused") else {
        return;
    };
    let n = MAX_PFNS_PER_CHAIN + 1;
    let p: Vec<u32> = (0..n).map(|i| ((GOOD >> 12) + i) as u32).collect();
    d.send_pfns(Q::Inflate, &p, p.len());
    assert_eq!(
        last_error(&d),
        Some(BalloonError::Read(ChainReadError::TooBig {
            total: n * 4,
            max: MAX_PFNS_PER_CHAIN * 4
        }))
    );
    assert!(present(&vm, GOOD));
    // A chain longer than the whole RAM (len = u32::MAX) is refused too.
    let at = d.buf(0);
    d.desc(Q::Inflate, 0, at, u32::MAX, 0, 0);
    d.publish(Q::Inflate, &[0]);
    d.notify(Q::Inflate);
    assert_eq!(
        last_error(&d),
        Some(BalloonError::Chain(ChainError::OutsideRam {
            index: 0,
            addr: at,
            len: u32::MAX
        }))
    );
    assert_eq!(d.dev().counters().errors, 2);
    still_works(&vm, &mut d, GOOD + MIB);
}

/// A driver that queues more PFNs than one batch holds (five of the
/// largest chains) is served in bounded batches, and all of it: four
/// chains, then the fifth, each batch de-duplicated on its own, every
/// chain returned. (What the device holds at once does not grow with
/// the queue.)
#[test]
fn many_large_chains_are_served_in_bounded_batches() {
    let Some((vm, mut d)) = setup("many_large_chains_are_served_in_bounded_batches") else {
        return;
    };
    // 16 MiB of releasable pages, listed over and over.
    let unique = 16 * MIB / 4096;
    let p: Vec<u32> = (0..5 * MAX_PFNS_PER_CHAIN)
        .map(|i| ((GOOD >> 12) + i % unique) as u32)
        .collect();
    let used = d.used_idx(Q::Inflate);
    let per_chain = usize::try_from(MAX_PFNS_PER_CHAIN).expect("fits");
    assert_eq!(d.send_pfns(Q::Inflate, &p, per_chain), 5);
    let c = d.dev().counters();
    assert_eq!(c.errors, 0, "{:?}", last_error(&d));
    assert_eq!(
        d.used_idx(Q::Inflate),
        used.wrapping_add(5),
        "every chain returned"
    );
    assert_eq!(c.pages_inflated, unique);
    assert_eq!(MAX_PFNS_PER_BATCH, 4 * MAX_PFNS_PER_CHAIN);
    // One batch of all five would have found 5 * 16384 - 4096 duplicates.
    assert_eq!(
        c.duplicate_pfns,
        (MAX_PFNS_PER_BATCH - unique) + (MAX_PFNS_PER_CHAIN - unique),
        "two batches: four chains, then one"
    );
    for a in (GOOD..GOOD + 16 * MIB).step_by(4096) {
        assert!(matches!(state(&vm, a), PageState::Ballooned { .. }));
    }
    still_works(&vm, &mut d, GOOD + 20 * MIB);
}

#[test]
fn bad_descriptor_chains_are_counted() {
    let Some((vm, mut d)) = setup("bad_descriptor_chains_are_counted") else {
        return;
    };
    let at = d.buf(0);
    d.mem
        .write(at, &((GOOD >> 12) as u32).to_le_bytes())
        .unwrap();
    type Case = (&'static str, fn(&mut Driver, u64), BalloonError);
    let chain = BalloonError::Chain;
    let read = BalloonError::Read;
    let mmio = vmm::devices::virtio::BALLOON_MMIO_BASE;
    let cases: [Case; 10] = [
        (
            "loop",
            |d, at| {
                d.desc(Q::Inflate, 0, at, 4, F_NEXT, 1);
                d.desc(Q::Inflate, 1, at, 4, F_NEXT, 0);
            },
            chain(ChainError::TooLong { head: 0, size: 256 }),
        ),
        (
            "next out of range",
            |d, at| d.desc(Q::Inflate, 0, at, 4, F_NEXT, 999),
            chain(ChainError::NextIndex {
                index: 0,
                next: 999,
                size: 256,
            }),
        ),
        (
            "zero length",
            |d, at| d.desc(Q::Inflate, 0, at, 0, 0, 0),
            chain(ChainError::ZeroLength { index: 0 }),
        ),
        (
            "zero length inside a chain",
            |d, at| {
                d.desc(Q::Inflate, 0, at, 4, F_NEXT, 7);
                d.desc(Q::Inflate, 7, at, 0, 0, 0);
            },
            chain(ChainError::ZeroLength { index: 7 }),
        ),
        (
            "outside RAM",
            |d, _| d.desc(Q::Inflate, 0, RAM, 4, 0, 0),
            chain(ChainError::OutsideRam {
                index: 0,
                addr: RAM,
                len: 4,
            }),
        ),
        (
            "running past the end of RAM",
            |d, _| d.desc(Q::Inflate, 0, RAM - 2, 4, 0, 0),
            chain(ChainError::OutsideRam {
                index: 0,
                addr: RAM - 2,
                len: 4,
            }),
        ),
        (
            "MMIO window",
            |d, _| {
                d.desc(
                    Q::Inflate,
                    0,
                    vmm::devices::virtio::BALLOON_MMIO_BASE,
                    4,
                    0,
                    0,
                )
            },
            chain(ChainError::OutsideRam {
                index: 0,
                addr: mmio,
                len: 4,
            }),
        ),
        (
            "indirect",
            |d, at| d.desc(Q::Inflate, 0, at, 16, 4, 0),
            chain(ChainError::Indirect { index: 0 }),
        ),
        (
            "device-writable PFN array",
            |d, at| d.desc(Q::Inflate, 0, at, 4, F_WRITE, 0),
            read(ChainReadError::WriteOnly { index: 0 }),
        ),
        (
            "device-writable second buffer",
            |d, at| {
                d.desc(Q::Inflate, 0, at, 4, F_NEXT, 3);
                d.desc(Q::Inflate, 3, at, 4, F_WRITE, 0);
            },
            read(ChainReadError::WriteOnly { index: 3 }),
        ),
    ];
    for (i, (what, make, want)) in cases.iter().enumerate() {
        make(&mut d, at);
        d.publish(Q::Inflate, &[0]);
        d.notify(Q::Inflate);
        assert_eq!(new_errors(&d, i as u64), vec![want.clone()], "{what}");
        assert_eq!(d.dev().counters().bad_pfns, 0, "{what}: no PFN was read");
        assert_eq!(d.used_idx(Q::Inflate), i as u16 + 1, "{what}: returned");
        assert!(present(&vm, GOOD), "{what}: nothing released");
        assert_eq!(d.dev().lock().status() & 0x40, 0, "{what}: no reset needed");
    }
    still_works(&vm, &mut d, GOOD + MIB);
}

#[test]
fn pfn_array_in_a_ballooned_page_is_not_read() {
    let Some((vm, mut d)) = setup("pfn_array_in_a_ballooned_page_is_not_read") else {
        return;
    };
    d.send_pfns(Q::Inflate, &pfns(GOOD, 4096), 1);
    d.mem.write(GOOD + MIB, &[0u8; 4]).unwrap();
    d.desc(Q::Inflate, 0, GOOD, 4, 0, 0);
    d.publish(Q::Inflate, &[0]);
    d.notify(Q::Inflate);
    assert!(
        matches!(
            new_errors(&d, 0)[..],
            [BalloonError::Read(ChainReadError::Memory { index: 0, .. })]
        ),
        "{:?}",
        last_error(&d)
    );
    still_works(&vm, &mut d, GOOD + MIB);
}

#[test]
fn bad_reports_are_counted() {
    let Some((vm, mut d)) = setup("bad_reports_are_counted") else {
        return;
    };
    let floor_page = FLOOR - 4096;
    // Device-readable: reports are device-writable buffers.
    d.desc(Q::Reporting, 0, GOOD, (2 * MIB) as u32, 0, 0);
    // In the reserved low memory, smaller than a page, straddling the
    // floor, and running past the end of RAM.
    d.desc(Q::Reporting, 1, 0, (2 * MIB) as u32, F_WRITE, 0);
    d.desc(Q::Reporting, 2, GOOD + 10, 4000, F_WRITE, 0);
    d.desc(Q::Reporting, 3, floor_page, 8192, F_WRITE, 0);
    d.desc(Q::Reporting, 4, RAM - 4096, 8192, F_WRITE, 0);
    // A good report among them is still served.
    d.desc(Q::Reporting, 5, GOOD + 4 * MIB, MIB as u32, F_WRITE, 0);
    d.publish(Q::Reporting, &[0, 1, 2, 3, 4, 5]);
    d.notify(Q::Reporting);
    assert_eq!(
        new_errors(&d, 0),
        vec![
            // Chains are checked as they are popped, ranges afterwards.
            BalloonError::Chain(ChainError::OutsideRam {
                index: 4,
                addr: RAM - 4096,
                len: 8192
            }),
            BalloonError::ReportReadOnly { index: 0 },
            BalloonError::BadReport {
                addr: 0,
                len: (2 * MIB) as u32
            },
            BalloonError::BadReport {
                addr: GOOD + 10,
                len: 4000
            },
            BalloonError::BadReport {
                addr: floor_page,
                len: 8192
            },
        ]
    );
    assert_eq!(d.dev().counters().bytes_reported, MIB);
    assert_eq!(d.used_idx(Q::Reporting), 6);
    assert!(present(&vm, GOOD));
    assert!(present(&vm, RAM - 4096));
    assert!(matches!(
        state(&vm, GOOD + 4 * MIB),
        PageState::Discarded { .. }
    ));
    still_works(&vm, &mut d, GOOD + MIB);
}

#[test]
fn config_accesses_of_wrong_size_are_counted() {
    let Some((vm, mut d)) = setup("config_accesses_of_wrong_size_are_counted") else {
        return;
    };
    d.w32(0x104, 7);
    let n = d.dev().lock().errors();
    d.dev().write(0x104, &[1]);
    d.dev().write(0x104, &[1, 2]);
    d.dev().write(0x104, &[1; 8]);
    d.dev().write(0x105, &[1; 4]);
    assert_eq!(d.config(4), 7, "actual unchanged");
    let wrong = |offset, len| TransportError::Config(ConfigError::WrongSize { offset, len });
    assert_eq!(
        new_transport_errors(&d, n),
        vec![wrong(4, 1), wrong(4, 2), wrong(4, 8), wrong(5, 4)]
    );
    d.dev().write(0x10e, &[1; 4]);
    assert_eq!(
        last_transport_error(&d),
        Some(TransportError::Config(ConfigError::OutOfRange {
            offset: 14,
            len: 4,
            size: 16
        }))
    );
    // num_pages is the host's.
    d.w32(0x100, 99);
    assert_eq!(d.config(0), 0);
    assert_eq!(
        last_transport_error(&d),
        Some(TransportError::Config(ConfigError::ReadOnly { offset: 0 }))
    );
    let mut b = [0u8; 2];
    d.dev().read(0x100, &mut b);
    assert_eq!(
        last_transport_error(&d),
        Some(TransportError::Config(ConfigError::WrongSize {
            offset: 0,
            len: 2
        }))
    );
    d.dev().read(0x10e, &mut [0u8; 4]);
    assert_eq!(
        last_transport_error(&d),
        Some(TransportError::Config(ConfigError::OutOfRange {
            offset: 14,
            len: 4,
            size: 16
        }))
    );
    still_works(&vm, &mut d, GOOD + MIB);
}

#[test]
fn notify_before_driver_ok_does_nothing() {
    let Some((vm, mut d)) = setup("notify_before_driver_ok_does_nothing") else {
        return;
    };
    d.setup(0);
    let at = d.buf(0);
    d.mem
        .write(at, &((GOOD >> 12) as u32).to_le_bytes())
        .unwrap();
    d.desc(Q::Inflate, 0, at, 4, 0, 0);
    d.publish(Q::Inflate, &[0]);
    d.notify(Q::Inflate);
    assert_eq!(
        last_transport_error(&d),
        Some(TransportError::NotifyNotReady {
            queue: 0,
            status: 0xb
        })
    );
    assert!(present(&vm, GOOD));
    assert_eq!(d.used_idx(Q::Inflate), 0);
    // Once ready, the same request goes through.
    d.w32(0x70, 0xf);
    d.notify(Q::Inflate);
    assert!(matches!(state(&vm, GOOD), PageState::Ballooned { .. }));
    still_works(&vm, &mut d, GOOD + MIB);
}

#[test]
fn corrupt_ring_needs_reset_then_recovers() {
    let Some((vm, mut d)) = setup("corrupt_ring_needs_reset_then_recovers") else {
        return;
    };
    let ring = |why: QueueError| TransportError::Ring {
        queue: 0,
        why: why.to_string(),
    };
    // A good request made available before the corruption is not served.
    d.mem
        .write(d.buf(0), &((GOOD >> 12) as u32).to_le_bytes())
        .unwrap();
    d.desc(Q::Inflate, 0, d.buf(0), 4, 0, 0);
    d.publish(Q::Inflate, &[0]);
    d.set_avail_idx(Q::Inflate, 1000);
    d.notify(Q::Inflate);
    assert_ne!(d.r32(0x70) & 0x40, 0, "NEEDS_RESET");
    assert_eq!(
        last_transport_error(&d),
        Some(ring(QueueError::AvailAhead {
            avail: 1000,
            next: 0,
            ahead: 1000,
            size: 256
        }))
    );
    d.notify(Q::Inflate);
    assert_eq!(
        last_transport_error(&d),
        Some(TransportError::NotifyNeedsReset { queue: 0 })
    );
    // A head index past the table is corrupt too, and the good chain
    // before it is not served either.
    assert_eq!(d.init(0), 0xf);
    d.desc(Q::Inflate, 0, d.buf(0), 4, 0, 0);
    d.publish(Q::Inflate, &[0, 300]);
    d.notify(Q::Inflate);
    assert_ne!(d.r32(0x70) & 0x40, 0, "NEEDS_RESET");
    assert_eq!(
        last_transport_error(&d),
        Some(ring(QueueError::HeadIndex {
            head: 300,
            size: 256
        }))
    );
    assert!(present(&vm, GOOD), "nothing of a corrupt ring is served");
    assert_eq!(d.dev().counters(), Default::default());
    // A queue made ready outside RAM.
    assert_eq!(d.init(0), 0xf);
    d.w32(0x30, 1);
    d.w32(0x44, 0);
    d.w32(0x80, 0);
    d.w32(0x84, 0x100);
    d.w32(0x44, 1);
    assert_ne!(d.r32(0x70) & 0x40, 0, "NEEDS_RESET");
    assert_eq!(
        last_transport_error(&d),
        Some(TransportError::InvalidQueue {
            queue: 1,
            why: LayoutError::OutsideRam {
                area: RingArea::DescTable,
                addr: 0x100 << 32,
                len: 16 * 256
            }
        })
    );
    assert_eq!(d.init(0), 0xf);
    assert_eq!(d.r32(0x70), 0xf);
    still_works(&vm, &mut d, GOOD + MIB);
}

//! Guest-controlled bad input to the virtio-balloon, one test per kind:
//! each is a counted device error (or NEEDS_RESET), never a panic, never a
//! release outside the guest's releasable RAM, and the device keeps
//! working (every test ends with a good inflate that must succeed).

use guest_mm::{Gpa, PageState};
use tests::kvm_or_skip;
use tests::virtio::{balloon_vm, pfns, Driver, F_NEXT, F_WRITE, Q};
use vmm::devices::virtio::balloon::{BalloonError, F_REPORTING, F_STATS_VQ, MAX_PFNS_PER_CHAIN};
use vmm::devices::virtio::mmio::{ConfigError, TransportError};
use vmm::devices::virtio::queue::{ChainError, ChainReadError};
use vmm::devices::virtio::BusDevice;
use vmm::{Backing, PageSize, Vm};

const MIB: u64 = 1 << 20;
const AREA: u64 = 4 * MIB;
const RAM: u64 = 64 * MIB;
const GOOD: u64 = 40 * MIB;

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

/// The device still works, nothing was released outside RAM, the low
/// memory is intact.
fn still_works(vm: &Vm, d: &mut Driver, page: u64) {
    let before = d.dev().counters().pages_inflated;
    d.send_pfns(Q::Inflate, &pfns(page, 4096), 1);
    assert_eq!(d.dev().counters().pages_inflated, before + 1);
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
    p.extend(pfns(GOOD, 16 * 4096));
    d.send_pfns(Q::Inflate, &p, 256);
    let c = d.dev().counters();
    assert_eq!((c.bad_pfns, c.errors, c.pages_inflated), (5, 5, 16));
    assert!(matches!(
        last_error(&d),
        Some(BalloonError::BadPfn { pfn: 0x1ff, .. })
    ));
    assert_eq!(d.used_idx(Q::Inflate), 1);
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
    // Inflating ballooned pages again releases nothing more.
    d.send_pfns(Q::Inflate, &pfns(GOOD, 8 * 4096), 256);
    assert_eq!(d.dev().counters().bytes_released, 8 * 4096);
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
    d.desc(Q::Inflate, 0, d.buf(0), u32::MAX, 0, 0);
    d.publish(Q::Inflate, &[0]);
    d.notify(Q::Inflate);
    assert!(matches!(
        last_error(&d),
        Some(BalloonError::Chain(ChainError::OutsideRam { .. }))
    ));
    still_works(&vm, &mut d, GOOD + MIB);
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
    type Case = (
        &'static str,
        fn(&mut Driver, u64),
        fn(&BalloonError) -> bool,
    );
    let cases: [Case; 7] = [
        (
            "loop",
            |d, at| {
                d.desc(Q::Inflate, 0, at, 4, F_NEXT, 1);
                d.desc(Q::Inflate, 1, at, 4, F_NEXT, 0);
            },
            |e| matches!(e, BalloonError::Chain(ChainError::TooLong { .. })),
        ),
        (
            "next out of range",
            |d, at| d.desc(Q::Inflate, 0, at, 4, F_NEXT, 999),
            |e| {
                matches!(
                    e,
                    BalloonError::Chain(ChainError::NextIndex { next: 999, .. })
                )
            },
        ),
        (
            "zero length",
            |d, at| d.desc(Q::Inflate, 0, at, 0, 0, 0),
            |e| matches!(e, BalloonError::Chain(ChainError::ZeroLength { .. })),
        ),
        (
            "outside RAM",
            |d, _| d.desc(Q::Inflate, 0, RAM, 4, 0, 0),
            |e| matches!(e, BalloonError::Chain(ChainError::OutsideRam { .. })),
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
            |e| matches!(e, BalloonError::Chain(ChainError::OutsideRam { .. })),
        ),
        (
            "indirect",
            |d, at| d.desc(Q::Inflate, 0, at, 16, 4, 0),
            |e| matches!(e, BalloonError::Chain(ChainError::Indirect { .. })),
        ),
        (
            "device-writable PFN array",
            |d, at| d.desc(Q::Inflate, 0, at, 4, F_WRITE, 0),
            |e| matches!(e, BalloonError::Read(ChainReadError::WriteOnly { .. })),
        ),
    ];
    for (i, (what, make, ok)) in cases.iter().enumerate() {
        make(&mut d, at);
        d.publish(Q::Inflate, &[0]);
        d.notify(Q::Inflate);
        let e = last_error(&d).unwrap_or_else(|| panic!("{what}: no error"));
        assert!(ok(&e), "{what}: {e:?}");
        assert_eq!(d.dev().counters().errors, i as u64 + 1, "{what}");
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
    assert!(matches!(
        last_error(&d),
        Some(BalloonError::Read(ChainReadError::Memory { .. }))
    ));
    still_works(&vm, &mut d, GOOD + MIB);
}

#[test]
fn bad_reports_are_counted() {
    let Some((vm, mut d)) = setup("bad_reports_are_counted") else {
        return;
    };
    // Device-readable: reports are device-writable buffers.
    d.desc(Q::Reporting, 0, GOOD, (2 * MIB) as u32, 0, 0);
    // In the reserved low memory, and smaller than a page.
    d.desc(Q::Reporting, 1, 0, (2 * MIB) as u32, F_WRITE, 0);
    d.desc(Q::Reporting, 2, GOOD + 10, 4000, F_WRITE, 0);
    d.publish(Q::Reporting, &[0, 1, 2]);
    d.notify(Q::Reporting);
    let errs = d.dev().lock().device().recent_errors();
    assert!(
        matches!(errs[0], BalloonError::ReportReadOnly { index: 0 }),
        "{errs:?}"
    );
    assert!(matches!(errs[1], BalloonError::BadReport { addr: 0, .. }));
    assert!(matches!(errs[2], BalloonError::BadReport { .. }));
    assert_eq!(d.dev().counters().bytes_reported, 0);
    assert_eq!(d.used_idx(Q::Reporting), 3);
    assert!(present(&vm, GOOD));
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
    assert_eq!(d.dev().lock().errors(), n + 4);
    assert!(matches!(
        last_transport_error(&d),
        Some(TransportError::Config(ConfigError::OutOfRange { .. }))
            | Some(TransportError::Config(ConfigError::WrongSize { .. }))
    ));
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
    assert!(matches!(
        last_transport_error(&d),
        Some(TransportError::Config(ConfigError::OutOfRange { .. }))
    ));
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
    assert!(matches!(
        last_transport_error(&d),
        Some(TransportError::NotifyNotReady { queue: 0, .. })
    ));
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
    d.set_avail_idx(Q::Inflate, 1000);
    d.notify(Q::Inflate);
    assert_ne!(d.r32(0x70) & 0x40, 0, "NEEDS_RESET");
    assert!(matches!(
        last_transport_error(&d),
        Some(TransportError::Ring { queue: 0, .. })
    ));
    d.notify(Q::Inflate);
    assert!(matches!(
        last_transport_error(&d),
        Some(TransportError::NotifyNeedsReset { queue: 0 })
    ));
    // A head index past the table is corrupt too.
    d.init(0);
    d.publish(Q::Inflate, &[300]);
    d.notify(Q::Inflate);
    assert_ne!(d.r32(0x70) & 0x40, 0, "NEEDS_RESET");
    // A queue made ready outside RAM.
    d.init(0);
    d.w32(0x30, 1);
    d.w32(0x44, 0);
    d.w32(0x80, 0);
    d.w32(0x84, 0x100);
    d.w32(0x44, 1);
    assert_ne!(d.r32(0x70) & 0x40, 0, "NEEDS_RESET");
    d.init(0);
    assert_eq!(d.r32(0x70), 0xf);
    still_works(&vm, &mut d, GOOD + MIB);
}

//! The vm-memory view (`GuestMemoryView`): `GuestMemory` answers agree with
//! the fast walk's per-page translation for random tables (maps, unmaps
//! that split huge leaves, discards, balloons, protections, faults), and
//! `Bytes` round trips work across leaf boundaries.
//!
//! The view's behaviour under concurrent unmaps (no slice ever reads
//! backing after its release) is checked by the stress harness
//! (`tests/stress.rs`), whose walkers read through the view half the time.

// These tests use real threads and memory and the full geometry; under
// `--cfg loom` (tiny geometry, loom's primitives) only `tests/loom.rs` runs.
#![cfg(not(loom))]

use guest_mm::*;
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

const K4: u64 = 4096;
const M2: u64 = 2 << 20;
/// Guest memory the property test plays with.
const GUEST: u64 = 4 * M2;
/// One bank of host memory: the guest range plus room for shifted maps.
const BANK: u64 = GUEST + 2 * M2;

/// Real anonymous memory (two banks, 2 MiB aligned), registered as
/// simulated backing: nothing is ever released, and reads through the
/// view read real memory.
struct Host {
    raw: *mut libc::c_void,
    raw_len: usize,
    base: u64,
}

impl Host {
    fn new() -> Host {
        let raw_len = (2 * BANK + M2) as usize;
        // SAFETY: anonymous private mapping, checked against MAP_FAILED.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                raw_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(raw, libc::MAP_FAILED, "mmap");
        let base = (raw as u64).next_multiple_of(M2);
        Host { raw, raw_len, base }
    }

    fn hva(&self, bank: u64, off: u64) -> Hva {
        Hva(self.base + bank * BANK + off)
    }

    fn table(&self) -> std::sync::Arc<Stage2Table> {
        let t = Stage2Table::new(TableConfig::default()).unwrap();
        t.register_backing(BackingRegion {
            hva: Hva(self.base),
            len: 2 * BANK,
            kind: BackingKind::Simulated { hook: None },
        })
        .unwrap();
        t
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // SAFETY: mapped in new(); the tables using it are gone.
        unsafe { libc::munmap(self.raw, self.raw_len) };
    }
}

fn unmap(t: &Stage2Table, gpa: u64, len: u64, mode: UnmapMode) {
    let mut g = t.gather();
    t.unmap(&mut g, Gpa(gpa), len, mode).unwrap();
    g.finish().unwrap();
}

/// `(host address, bytes)` of host memory.
type Runs = Vec<(u64, u64)>;

/// `(host address, bytes)` runs, adjacent host-contiguous runs merged.
fn merged(runs: impl IntoIterator<Item = (u64, u64)>) -> Runs {
    let mut out: Runs = Vec::new();
    for (h, n) in runs {
        match out.last_mut() {
            Some((lh, ln)) if *lh + *ln == h => *ln += n,
            _ => out.push((h, n)),
        }
    }
    out
}

/// What the view gave: the runs before the first error, and the error.
fn view_answer(
    mem: &GuestMemoryView<'_>,
    addr: u64,
    len: usize,
    access: Permissions,
) -> (Runs, Option<GuestMemoryError>) {
    let mut runs = Vec::new();
    let it = match mem.get_slices(GuestAddress(addr), len, access) {
        Ok(it) => it,
        Err(e) => return (runs, Some(e)),
    };
    let mut err = None;
    let mut items = 0;
    for r in it {
        items += 1;
        match r {
            Ok(s) => {
                assert!(err.is_none(), "a slice after an error");
                runs.push((s.ptr_guard().as_ptr() as u64, s.len() as u64));
            }
            Err(e) => err = Some(e),
        }
    }
    assert!(items <= len.div_ceil(K4 as usize) + 1, "too many items");
    (runs, err)
}

/// The reference: per-page translation through another walker, uncached.
/// Returns the runs up to the first page that fails, and that page's
/// address (the range's start if it is the first) and whether it failed
/// for lack of permission.
fn walker_answer(
    g: &WalkGuard<'_>,
    addr: u64,
    len: u64,
    access: Permissions,
) -> (Runs, Option<(u64, bool)>) {
    let mut runs = Vec::new();
    let end = addr + len;
    let mut at = addr;
    while at < end {
        let n = ((at | (K4 - 1)) + 1).min(end) - at;
        let r = match access {
            Permissions::No => match g.query(Gpa(at)) {
                PageState::Present { hva, .. } => Ok(hva.0 + (at & (K4 - 1))),
                _ => Err(false),
            },
            _ => {
                let mut hva = None;
                let mut fail = None;
                for (want, a) in [
                    (access.allow(Permissions::Read), Access::Read),
                    (access.has_write(), Access::Write),
                ] {
                    if !want || fail.is_some() {
                        continue;
                    }
                    match g.translate_uncached(Gpa(at), a) {
                        Ok(t) => hva = Some(t.hva.0),
                        Err(WalkError::PermissionDenied { .. }) => fail = Some(true),
                        Err(_) => fail = Some(false),
                    }
                }
                match (fail, hva) {
                    (Some(p), _) => Err(p),
                    (None, Some(h)) => Ok(h),
                    (None, None) => unreachable!("a real access asks for something"),
                }
            }
        };
        match r {
            Ok(h) => runs.push((h, n)),
            Err(perm) => return (runs, Some((at, perm))),
        }
        at += n;
    }
    (runs, None)
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        page: u64,
        pages: u64,
        bank: u64,
        shift: u64,
        perms: Perms,
        huge: bool,
    },
    Unmap {
        page: u64,
        pages: u64,
        mode: UnmapMode,
    },
    Protect {
        page: u64,
        pages: u64,
        perms: Perms,
    },
    Fault {
        page: u64,
    },
    Deflate {
        page: u64,
        pages: u64,
    },
    Query {
        addr: u64,
        len: usize,
        access: Permissions,
    },
}

const GUEST_PAGES: u64 = GUEST / K4;

/// A page, often at a 2 MiB boundary so that huge leaves happen.
fn page() -> impl Strategy<Value = u64> {
    prop_oneof![(0..GUEST_PAGES / 512).prop_map(|b| b * 512), 0..GUEST_PAGES,]
}

fn pages() -> impl Strategy<Value = u64> {
    prop_oneof![Just(512u64), Just(1024u64), 1u64..8, 1u64..700]
}

fn perms() -> impl Strategy<Value = Perms> {
    prop_oneof![
        Just(Perms::RW),
        Just(Perms::R),
        Just(Perms::RWX),
        Just(Perms::X),
        Just(Perms::W),
    ]
}

fn access() -> impl Strategy<Value = Permissions> {
    prop_oneof![
        Just(Permissions::Read),
        Just(Permissions::Write),
        Just(Permissions::ReadWrite),
        Just(Permissions::No),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let mode = prop_oneof![
        Just(UnmapMode::Remove),
        Just(UnmapMode::Discard),
        Just(UnmapMode::Balloon),
        Just(UnmapMode::Detach),
    ];
    prop_oneof![
        3 => (page(), pages(), 0u64..2, prop_oneof![Just(0u64), Just(K4), Just(M2)], perms(), any::<bool>())
            .prop_map(|(page, pages, bank, shift, perms, huge)| Op::Map { page, pages, bank, shift, perms, huge }),
        2 => (page(), pages(), mode).prop_map(|(page, pages, mode)| Op::Unmap { page, pages, mode }),
        1 => (page(), pages(), perms()).prop_map(|(page, pages, perms)| Op::Protect { page, pages, perms }),
        1 => page().prop_map(|page| Op::Fault { page }),
        1 => (page(), pages()).prop_map(|(page, pages)| Op::Deflate { page, pages }),
        6 => (
            prop_oneof![0..GUEST + K4, (0..GUEST_PAGES).prop_map(|p| p * K4 + K4 - 3)],
            prop_oneof![0usize..16, 1usize..3 * K4 as usize, Just(M2 as usize + 5)],
            access()
        )
            .prop_map(|(addr, len, access)| Op::Query { addr, len, access }),
    ]
}

fn clip(page: u64, pages: u64) -> (u64, u64) {
    let n = pages.min(GUEST_PAGES - page).max(1);
    (page * K4, n * K4)
}

/// Apply one op; errors are part of the game (the view must agree with
/// whatever the table ended up with), so they are ignored.
fn apply(t: &Stage2Table, host: &Host, op: &Op) {
    match *op {
        Op::Map {
            page,
            pages,
            bank,
            shift,
            perms,
            huge,
        } => {
            let (gpa, len) = clip(page, pages);
            let leaf = if huge {
                PageSize::Size2M
            } else {
                PageSize::Size4K
            };
            let _ = t.map(Gpa(gpa), host.hva(bank, gpa + shift), len, perms, leaf);
        }
        Op::Unmap { page, pages, mode } => {
            let (gpa, len) = clip(page, pages);
            let mut g = t.gather();
            let _ = t.unmap_existing(&mut g, Gpa(gpa), len, mode);
            g.finish().unwrap();
        }
        Op::Protect { page, pages, perms } => {
            let (gpa, len) = clip(page, pages);
            let mut g = t.gather();
            let _ = t.protect(&mut g, Gpa(gpa), len, perms);
            g.finish().unwrap();
        }
        Op::Fault { page } => {
            let _ = t.fault_in(Gpa(page * K4));
        }
        Op::Deflate { page, pages } => {
            let (gpa, len) = clip(page, pages);
            let _ = t.deflate(Gpa(gpa), len);
        }
        Op::Query { .. } => {}
    }
}

/// One query: the view and the per-page walk must agree on success, on
/// the host bytes (runs merged), on where it fails and why (permission or
/// not), and `check_range` must agree too.
fn check_query(
    view_walker: &mut Walker,
    ref_walker: &mut Walker,
    addr: u64,
    len: usize,
    access: Permissions,
) -> Result<(), TestCaseError> {
    let g = view_walker.pin();
    let r = ref_walker.pin();
    let mem = g.memory();
    let (got, err) = view_answer(&mem, addr, len, access);
    let (want, fail) = walker_answer(&r, addr, len as u64, access);
    let slices = got.len();
    let got = merged(got);
    prop_assert_eq!(slices, got.len(), "host-contiguous runs are coalesced");
    prop_assert_eq!(got, merged(want), "host bytes of {:#x}+{:#x}", addr, len);
    match (&err, fail) {
        (None, None) => {}
        (Some(GuestMemoryError::InvalidGuestAddress(a)), Some((at, false))) => {
            prop_assert_eq!(a.0, at)
        }
        (Some(GuestMemoryError::IOError(e)), Some((_, true))) => {
            prop_assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied)
        }
        (e, f) => prop_assert!(false, "view error {:?}, walker failure {:?}", e, f),
    }
    prop_assert_eq!(
        mem.check_range(GuestAddress(addr), len, access),
        fail.is_none()
    );
    match (mem.check(GuestAddress(addr), len, access), fail) {
        (Ok(()), None) => {}
        (Err(WalkError::PermissionDenied { gpa, .. }), Some((at, true))) => {
            prop_assert_eq!(gpa.0, at)
        }
        (Err(e), Some((at, false))) => {
            let perm = matches!(e, WalkError::PermissionDenied { .. });
            prop_assert!(!perm, "{:?} is not a permission failure", e);
            prop_assert!(
                !matches!(e, WalkError::UseAfterFree(_)),
                "a freed table page"
            );
            let a = match e {
                WalkError::NotMapped(a)
                | WalkError::Discarded(a)
                | WalkError::Ballooned(a)
                | WalkError::OutOfRange(a) => a.0,
                _ => u64::MAX,
            };
            prop_assert_eq!(a, at);
        }
        (e, f) => prop_assert!(false, "check says {:?}, walker failure {:?}", e, f),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Random table changes interleaved with random queries: the view
    /// answers what the fast walk answers, page by page.
    #[test]
    fn view_agrees_with_the_walker(ops in prop::collection::vec(op(), 1..120)) {
        let host = Host::new();
        let t = host.table();
        // Start with something mapped: 2 MiB leaves, then some 4 KiB ones.
        t.map(Gpa(0), host.hva(0, 0), 2 * M2, Perms::RW, PageSize::Size2M).unwrap();
        t.map(Gpa(2 * M2), host.hva(1, 2 * M2), M2, Perms::R, PageSize::Size4K).unwrap();
        t.map(Gpa(3 * M2), host.hva(0, 3 * M2 + K4), M2, Perms::RW, PageSize::Size2M).unwrap();
        // The view's walker lives across changes: its cache must be shot
        // down, not trusted.
        let mut vw = t.walker();
        let mut rw = t.walker();
        for op in &ops {
            apply(&t, &host, op);
            let (addr, len, access) = match *op {
                Op::Query { addr, len, access } => (addr, len, access),
                // After every change, the range around it.
                Op::Map { page, pages, .. }
                | Op::Unmap { page, pages, .. }
                | Op::Protect { page, pages, .. }
                | Op::Deflate { page, pages } => {
                    let (gpa, n) = clip(page, pages);
                    (gpa.saturating_sub(K4 / 2), (n + K4) as usize, Permissions::Read)
                }
                Op::Fault { page } => (page * K4, K4 as usize, Permissions::Write),
            };
            check_query(&mut vw, &mut rw, addr, len, access)?;
        }
        drop((vw, rw));
        prop_assert_eq!(t.stats().use_after_free, 0);
    }
}

#[test]
fn bytes_round_trip_across_leaf_boundaries() {
    let host = Host::new();
    let t = host.table();
    // A 2 MiB leaf, then two 4 KiB leaves: the first host-contiguous with
    // the 2 MiB leaf, the second in the other bank.
    t.map(Gpa(0), host.hva(0, 0), M2, Perms::RW, PageSize::Size2M)
        .unwrap();
    t.map(Gpa(M2), host.hva(0, M2), K4, Perms::RW, PageSize::Size4K)
        .unwrap();
    t.map(
        Gpa(M2 + K4),
        host.hva(1, M2 + K4),
        K4,
        Perms::RW,
        PageSize::Size4K,
    )
    .unwrap();
    let mut w = t.walker();
    let g = w.pin();
    let mem = g.memory();

    // Across the 4 KiB boundary into the other bank: two slices.
    let at = M2 + K4 - 5;
    let data: Vec<u8> = (1..=13).collect();
    mem.write_slice(&data, GuestAddress(at)).unwrap();
    let slices: Vec<_> = mem
        .get_slices(GuestAddress(at), data.len(), Permissions::Read)
        .unwrap()
        .map(|s| s.unwrap())
        .collect();
    assert_eq!(slices.len(), 2);
    assert_eq!(
        slices[0].ptr_guard().as_ptr() as u64,
        host.hva(0, M2 + K4 - 5).0
    );
    assert_eq!(
        slices[1].ptr_guard().as_ptr() as u64,
        host.hva(1, M2 + K4).0
    );
    assert_eq!((slices[0].len(), slices[1].len()), (5, 8));
    let mut back = [0u8; 13];
    mem.read_slice(&mut back, GuestAddress(at)).unwrap();
    assert_eq!(&back[..], &data[..]);
    // Where the bytes landed on the host.
    // SAFETY: both addresses are inside `host`'s mapping.
    let (a, b) = unsafe {
        (
            *host.hva(0, M2 + K4 - 1).as_ptr(),
            *host.hva(1, M2 + K4).as_ptr(),
        )
    };
    assert_eq!((a, b), (5, 6));
    let v: u64 = mem.read_obj(GuestAddress(M2 + K4 - 4)).unwrap();
    assert_eq!(v.to_le_bytes(), [2, 3, 4, 5, 6, 7, 8, 9]);

    // Across the 2 MiB leaf into the host-contiguous 4 KiB one: one slice.
    let x = 0x0123_4567_89ab_cdefu64;
    mem.write_obj(x, GuestAddress(M2 - 4)).unwrap();
    assert_eq!(mem.read_obj::<u64>(GuestAddress(M2 - 4)).unwrap(), x);
    let n = mem
        .get_slices(GuestAddress(M2 - 4), 8, Permissions::ReadWrite)
        .unwrap()
        .count();
    assert_eq!(n, 1, "host-contiguous leaves coalesce");
    // The whole mapped range: the 2 MiB leaf and the first 4 KiB leaf in
    // one slice, the other bank's page in a second.
    let lens: Vec<usize> = mem
        .get_slices(GuestAddress(0), (M2 + 2 * K4) as usize, Permissions::Read)
        .unwrap()
        .map(|s| s.unwrap().len())
        .collect();
    assert_eq!(lens, vec![(M2 + K4) as usize, K4 as usize]);
    drop(g);
    assert!(
        w.stats().translations > 0,
        "the view goes through the walker"
    );
}

#[test]
fn view_refuses_what_the_table_does_not_allow() {
    let host = Host::new();
    let t = host.table();
    t.map(Gpa(0), host.hva(0, 0), 8 * K4, Perms::RW, PageSize::Size4K)
        .unwrap();
    t.map(
        Gpa(8 * K4),
        host.hva(0, 8 * K4),
        K4,
        Perms::R,
        PageSize::Size4K,
    )
    .unwrap();
    t.map(
        Gpa(9 * K4),
        host.hva(0, 9 * K4),
        K4,
        Perms::X,
        PageSize::Size4K,
    )
    .unwrap();
    unmap(&t, K4, K4, UnmapMode::Discard);
    unmap(&t, 2 * K4, K4, UnmapMode::Balloon);
    unmap(&t, 3 * K4, K4, UnmapMode::Remove);
    let mut w = t.walker();
    let g = w.pin();
    let mem = g.memory();
    // Discarded, ballooned, unmapped: refused, never a slice.
    for (page, why) in [(1, "discarded"), (2, "ballooned"), (3, "unmapped")] {
        let a = page * K4;
        assert!(
            !mem.check_range(GuestAddress(a), 1, Permissions::No),
            "{why}"
        );
        let mut it = mem
            .get_slices(GuestAddress(a), 16, Permissions::Read)
            .unwrap();
        assert!(
            matches!(it.next(), Some(Err(GuestMemoryError::InvalidGuestAddress(x))) if x.0 == a),
            "{why}"
        );
        assert!(it.next().is_none(), "fused after the error");
        assert!(mem.read_obj::<u64>(GuestAddress(a)).is_err(), "{why}");
    }
    assert!(matches!(
        mem.check(GuestAddress(K4 + 8), 8, Permissions::Read),
        Err(WalkError::Discarded(Gpa(x))) if x == K4 + 8
    ));
    assert!(matches!(
        mem.check(GuestAddress(2 * K4), 8, Permissions::Read),
        Err(WalkError::Ballooned(_))
    ));
    // A range that runs into the discarded page: the first page's slice,
    // then the error at the boundary.
    let mut it = mem
        .get_slices(GuestAddress(K4 - 8), 16, Permissions::Read)
        .unwrap();
    assert!(matches!(it.next(), Some(Ok(s)) if s.len() == 8));
    assert!(matches!(
        it.next(),
        Some(Err(GuestMemoryError::InvalidGuestAddress(x))) if x.0 == K4
    ));
    assert!(it.next().is_none());
    let mut buf = [0u8; 16];
    assert!(matches!(
        mem.read_slice(&mut buf, GuestAddress(K4 - 8)),
        Err(GuestMemoryError::PartialBuffer { completed: 8, .. })
    ));
    // Read-only: reads work, writes are refused.
    assert!(mem.read_obj::<u64>(GuestAddress(8 * K4)).is_ok());
    assert!(mem.check_range(GuestAddress(8 * K4), 8, Permissions::Read));
    assert!(!mem.check_range(GuestAddress(8 * K4), 8, Permissions::Write));
    assert!(!mem.check_range(GuestAddress(8 * K4), 8, Permissions::ReadWrite));
    assert!(matches!(
        mem.write_obj(7u64, GuestAddress(8 * K4)),
        Err(GuestMemoryError::IOError(e)) if e.kind() == std::io::ErrorKind::PermissionDenied
    ));
    assert!(matches!(
        mem.check(GuestAddress(8 * K4), 8, Permissions::Write),
        Err(WalkError::PermissionDenied {
            access: Access::Write,
            ..
        })
    ));
    // Execute-only: present (No), neither readable nor writable.
    assert!(mem.check_range(GuestAddress(9 * K4), 8, Permissions::No));
    assert!(!mem.check_range(GuestAddress(9 * K4), 8, Permissions::Read));
    assert!(mem.read_obj::<u64>(GuestAddress(9 * K4)).is_err());
    // Past the table's width, and wrapping around.
    assert!(!mem.check_range(GuestAddress(1 << 60), 1, Permissions::No));
    assert!(matches!(
        mem.get_slices(GuestAddress(u64::MAX - 2), 8, Permissions::Read),
        Err(GuestMemoryError::GuestAddressOverflow)
    ));
    // Nothing asked, nothing given.
    assert_eq!(
        mem.get_slices(GuestAddress(3 * K4), 0, Permissions::Read)
            .unwrap()
            .count(),
        0
    );
    assert!(mem.check_range(GuestAddress(3 * K4), 0, Permissions::Write));
    assert_eq!(t.stats().use_after_free, 0);
}

#[test]
fn addresses_convert_both_ways() {
    let g = Gpa(0x1234_5000);
    let a: GuestAddress = g.into();
    assert_eq!(a, GuestAddress(0x1234_5000));
    assert_eq!(Gpa::from(a), g);
}

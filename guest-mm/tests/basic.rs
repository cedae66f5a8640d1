//! Behaviour of the table's public API: leaves, splits, errors, faults.

// These tests use real threads and memory and the full geometry; under
// `--cfg loom` (tiny geometry, loom's primitives) only `tests/loom.rs` runs.
#![cfg(not(loom))]

mod common;

use std::sync::Arc;

use common::*;
use guest_mm::stress::resident_bytes;
use guest_mm::*;

const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;

#[test]
fn map_picks_largest_leaves_and_translates() {
    let (t, _) = simulated_table(TableConfig::default());
    // 1 GiB + 2 MiB + 4 KiB, all aligned: one leaf of each size.
    t.map(
        Gpa(G1),
        Hva(FAKE_HVA + G1),
        G1 + M2 + 4096,
        Perms::RW,
        PageSize::Size1G,
    )
    .unwrap();
    let cases = [
        (G1 + 12345 * 4096, PageSize::Size1G),
        (2 * G1 + 4096, PageSize::Size2M),
        (2 * G1 + M2, PageSize::Size4K),
    ];
    let mut w = t.walker();
    let g = w.pin();
    for (gpa, size) in cases {
        assert_eq!(
            t.query(Gpa(gpa)),
            PageState::Present {
                hva: Hva(FAKE_HVA + gpa),
                perms: Perms::RW,
                size
            }
        );
        let tr = g.translate(Gpa(gpa + 8), Access::Write).unwrap();
        assert_eq!(tr.hva, Hva(FAKE_HVA + gpa + 8));
        assert_eq!(tr.size, size);
    }
    assert_eq!(
        g.translate(Gpa(2 * G1 + M2 + 4096), Access::Read),
        Err(WalkError::NotMapped(Gpa(2 * G1 + M2 + 4096)))
    );
}

#[test]
fn max_leaf_and_misaligned_backing_limit_leaf_size() {
    let (t, _) = simulated_table(TableConfig::default());
    t.map(Gpa(0), Hva(FAKE_HVA), M2, Perms::RW, PageSize::Size4K)
        .unwrap();
    assert!(matches!(
        t.query(Gpa(0)),
        PageState::Present {
            size: PageSize::Size4K,
            ..
        }
    ));
    // GPA 2M-aligned but host address only 4K-aligned: 4K leaves.
    t.map(
        Gpa(M2),
        Hva(FAKE_HVA + 3 * M2 + 4096),
        M2,
        Perms::RW,
        PageSize::Size1G,
    )
    .unwrap();
    assert!(matches!(
        t.query(Gpa(M2)),
        PageState::Present {
            size: PageSize::Size4K,
            ..
        }
    ));
}

#[test]
fn partial_unmap_splits_huge_leaf_and_keeps_the_rest() {
    let (t, log) = simulated_table(TableConfig::default());
    t.map(Gpa(0), Hva(FAKE_HVA), G1, Perms::RW, PageSize::Size1G)
        .unwrap();
    let mut g = t.gather();
    t.unmap(&mut g, Gpa(M2 + 4096), 4096, UnmapMode::Remove)
        .unwrap();
    g.finish().unwrap();
    assert_eq!(t.query(Gpa(M2 + 4096)), PageState::Unmapped);
    assert!(matches!(
        t.query(Gpa(M2)),
        PageState::Present {
            size: PageSize::Size4K,
            ..
        }
    ));
    assert!(matches!(
        t.query(Gpa(4 * M2)),
        PageState::Present {
            size: PageSize::Size2M,
            ..
        }
    ));
    assert_eq!(t.stats().splits, 2);
    let log = log.lock().unwrap().clone();
    assert!(log.contains(&Ev::Release(FAKE_HVA + M2 + 4096, 4096)));
    check_order(&log, |h| h - FAKE_HVA);
}

#[test]
fn unmap_releases_one_coalesced_run_and_frees_tables() {
    let (t, log) = simulated_table(TableConfig {
        yield_entries: 64,
        ..TableConfig::default()
    });
    let base_pages = t.stats().table_pages;
    t.map(Gpa(0), Hva(FAKE_HVA), 64 * M2, Perms::RW, PageSize::Size4K)
        .unwrap();
    assert!(t.stats().table_pages >= base_pages + 64);
    let mut g = t.gather();
    t.unmap(&mut g, Gpa(0), 64 * M2, UnmapMode::Remove).unwrap();
    let st = g.finish().unwrap();
    assert_eq!(
        st.release_runs, 1,
        "contiguous backing must coalesce into one run"
    );
    assert_eq!(st.released_bytes, 64 * M2);
    t.rcu_barrier();
    assert_eq!(
        t.stats().table_pages,
        base_pages,
        "empty table pages must be freed"
    );
    let log = log.lock().unwrap().clone();
    check_order(&log, |h| h - FAKE_HVA);
    // the lock was yielded: many acquisitions for 32K entries at 64 per hold
    assert!(t.stats().lock_acquisitions > 32768 / 64);
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let (t, log) = simulated_table(TableConfig::default());
    t.map(Gpa(0), Hva(FAKE_HVA), M2, Perms::RW, PageSize::Size2M)
        .unwrap();
    let before = t.stats();
    let cases: Vec<Result<(), MapError>> = vec![
        t.map(Gpa(123), Hva(FAKE_HVA), 4096, Perms::RW, PageSize::Size4K),
        t.map(Gpa(M2), Hva(FAKE_HVA), 4095, Perms::RW, PageSize::Size4K),
        t.map(
            Gpa(M2),
            Hva(FAKE_HVA + 1),
            4096,
            Perms::RW,
            PageSize::Size4K,
        ),
        t.map(Gpa(M2), Hva(FAKE_HVA), 0, Perms::RW, PageSize::Size4K),
        t.map(Gpa(!4095), Hva(FAKE_HVA), 8192, Perms::RW, PageSize::Size4K),
        t.map(
            Gpa(entry::ADDRESS_LIMIT),
            Hva(FAKE_HVA),
            4096,
            Perms::RW,
            PageSize::Size4K,
        ),
        t.map(
            Gpa(M2),
            Hva(FAKE_HVA),
            4096,
            Perms::default(),
            PageSize::Size4K,
        ),
        t.map(Gpa(M2), Hva(0x1000), 4096, Perms::RW, PageSize::Size4K),
        t.map(
            Gpa(M2),
            Hva(FAKE_HVA + FAKE_LEN - 4096),
            8192,
            Perms::RW,
            PageSize::Size4K,
        ),
        t.map(Gpa(4096), Hva(FAKE_HVA), 4096, Perms::RW, PageSize::Size4K),
    ];
    for (i, c) in cases.iter().enumerate() {
        let e = c.as_ref().expect_err(&format!("case {i} must fail"));
        assert!(!e.to_string().is_empty());
    }
    assert!(matches!(cases[9], Err(MapError::AlreadyMapped(Gpa(4096)))));
    let mut g = t.gather();
    // unmapping what is not (fully) mapped changes nothing
    assert_eq!(
        t.unmap(&mut g, Gpa(M2 - 4096), 8192, UnmapMode::Remove),
        Err(UnmapError::NotMapped(Gpa(M2)))
    );
    assert!(matches!(
        t.unmap(&mut g, Gpa(3), 4096, UnmapMode::Remove),
        Err(UnmapError::Range(RangeError::Unaligned { .. }))
    ));
    assert!(matches!(
        t.unmap(&mut g, Gpa(0), !4095, UnmapMode::Remove),
        Err(UnmapError::Range(RangeError::OutOfRange { .. }))
    ));
    let (other, _) = simulated_table(TableConfig::default());
    let mut og = other.gather();
    assert_eq!(
        t.unmap(&mut og, Gpa(0), 4096, UnmapMode::Remove),
        Err(UnmapError::WrongTable)
    );
    drop(og);
    g.finish().unwrap();
    assert!(matches!(
        t.query(Gpa(0)),
        PageState::Present {
            size: PageSize::Size2M,
            ..
        }
    ));
    assert_eq!(t.stats().splits, before.splits);
    assert!(log
        .lock()
        .unwrap()
        .iter()
        .all(|e| !matches!(e, Ev::Release(..))));
    // double registration
    let r: Arc<dyn InvalidationSubscriber> = Arc::new(Recorder(Default::default()));
    let id = t.register_subscriber(r.clone()).unwrap();
    assert_eq!(
        t.register_subscriber(r),
        Err(SubscribeError::AlreadyRegistered(id))
    );
    t.unregister_subscriber(id).unwrap();
    assert_eq!(
        t.unregister_subscriber(id),
        Err(SubscribeError::NotRegistered(id))
    );
    // backing overlap
    assert!(matches!(
        t.register_backing(BackingRegion {
            hva: Hva(FAKE_HVA + 4096),
            len: 4096,
            kind: BackingKind::Anonymous
        }),
        Err(BackingError::Overlap { .. })
    ));
}

#[test]
fn discard_faults_back_in_and_balloon_deflates() {
    let (t, _) = simulated_table(TableConfig::default());
    t.map(Gpa(0), Hva(FAKE_HVA), 2 * M2, Perms::RW, PageSize::Size2M)
        .unwrap();
    let mut g = t.gather();
    t.unmap(&mut g, Gpa(0), M2, UnmapMode::Discard).unwrap();
    t.unmap(&mut g, Gpa(M2), M2, UnmapMode::Balloon).unwrap();
    g.finish().unwrap();
    let mut w = t.walker();
    {
        let p = w.pin();
        assert_eq!(
            p.translate(Gpa(4096), Access::Read).unwrap_err(),
            WalkError::Discarded(Gpa(4096))
        );
        assert_eq!(
            p.translate(Gpa(M2), Access::Read).unwrap_err(),
            WalkError::Ballooned(Gpa(M2))
        );
        // A pinned query sees what the table's own query sees: markers
        // with their leaf size, holes, and addresses past the limit.
        for gpa in [4096, M2 + 8192, 2 * M2, 1 << 60] {
            assert_eq!(p.query(Gpa(gpa)), t.query(Gpa(gpa)), "{gpa:#x}");
        }
        assert!(matches!(
            p.query(Gpa(4096)),
            PageState::Discarded {
                size: PageSize::Size2M,
                ..
            }
        ));
        assert!(matches!(
            p.query(Gpa(M2)),
            PageState::Ballooned {
                size: PageSize::Size2M,
                ..
            }
        ));
    }
    assert_eq!(
        t.fault_in(Gpa(8192)),
        Ok(FaultOutcome::Restored {
            leaf_gpa: Gpa(0),
            leaf_hva: Hva(FAKE_HVA),
            size: PageSize::Size2M
        })
    );
    assert_eq!(t.fault_in(Gpa(M2)), Err(FaultError::Ballooned(Gpa(M2))));
    assert_eq!(t.deflate(Gpa(M2), M2).unwrap(), 512);
    assert!(matches!(
        t.fault_in(Gpa(M2)),
        Ok(FaultOutcome::Restored { .. })
    ));
    assert!(matches!(
        t.fault_in(Gpa(M2)),
        Ok(FaultOutcome::AlreadyPresent { .. })
    ));
    assert_eq!(
        t.fault_in(Gpa(4 * M2)),
        Err(FaultError::NotMapped(Gpa(4 * M2)))
    );
    // A fault whose snapshot predates a release of its page, discarded
    // again since (the same marker: only the sequence tells), must retry
    // (rule `fault_seq`).
    let seq = t.fault_seq(Gpa(0), 4096);
    let mut g = t.gather();
    t.unmap(&mut g, Gpa(0), 4096, UnmapMode::Discard).unwrap();
    g.finish().unwrap();
    assert_eq!(
        t.fault_in_if_unchanged(Gpa(0), seq),
        Err(FaultError::Retry(Gpa(0)))
    );
    assert!(t
        .fault_in_if_unchanged(Gpa(0), t.fault_seq(Gpa(0), 4096))
        .is_ok());
}

/// Only an invalidation that touches a fault's range fails its commit: an
/// unmap elsewhere in the table does not (KVM's single sequence would), one
/// anywhere in the snapshot's range does, and a commit outside the
/// snapshot's range falls back to the table-wide sequence.
#[test]
fn a_fault_retries_only_for_invalidations_of_its_own_range() {
    let (t, _) = simulated_table(TableConfig::default());
    t.map(Gpa(0), Hva(FAKE_HVA), 8 * M2, Perms::RW, PageSize::Size4K)
        .unwrap();
    let discard = |gpa: u64, len: u64| {
        let mut g = t.gather();
        t.unmap(&mut g, Gpa(gpa), len, UnmapMode::Discard).unwrap();
        g.finish().unwrap();
    };
    // The faulting pages are discarded; every other page is present, so
    // that discarding it is an invalidation.
    discard(M2, 2 * 4096);
    discard(3 * M2, 4096);
    // Elsewhere: another 2 MiB window.
    let seq = t.fault_seq(Gpa(M2), M2);
    let global = t.invalidate_seq();
    discard(5 * M2 + 4096, 4096);
    assert_ne!(t.invalidate_seq(), global, "the discard must invalidate");
    assert_eq!(t.fault_in_range_if_unchanged(Gpa(M2), 4096, seq), Ok(1));
    // Inside the snapshot's range, not on the committed page.
    let seq = t.fault_seq(Gpa(M2), M2);
    discard(M2 + 64 * 4096, 4096);
    assert_eq!(
        t.fault_in_range_if_unchanged(Gpa(M2 + 4096), 4096, seq),
        Err(FaultError::Retry(Gpa(M2 + 4096)))
    );
    // A commit outside the snapshot's range: any invalidation fails it.
    let seq = t.fault_seq(Gpa(M2), 4096);
    discard(6 * M2, 4096);
    assert_eq!(
        t.fault_in_range_if_unchanged(Gpa(3 * M2), 4096, seq),
        Err(FaultError::Retry(Gpa(3 * M2)))
    );
    let seq = t.fault_seq(Gpa(M2), 4096);
    assert_eq!(t.fault_in_range_if_unchanged(Gpa(3 * M2), 4096, seq), Ok(1));
}

#[test]
fn protect_downgrade_invalidates_cached_write_translation() {
    let (t, log) = simulated_table(TableConfig::default());
    t.map(Gpa(0), Hva(FAKE_HVA), M2, Perms::RW, PageSize::Size2M)
        .unwrap();
    let mut w = t.walker();
    assert!(w.pin().translate(Gpa(0), Access::Write).is_ok());
    let mut g = t.gather();
    t.protect(&mut g, Gpa(0), 4096, Perms::R).unwrap();
    g.finish().unwrap();
    let p = w.pin();
    assert!(matches!(
        p.translate(Gpa(0), Access::Write),
        Err(WalkError::PermissionDenied { .. })
    ));
    assert!(p.translate(Gpa(0), Access::Read).is_ok());
    assert!(p.translate(Gpa(4096), Access::Write).is_ok());
    drop(p);
    assert!(w.stats().shootdowns >= 1);
    assert!(log
        .lock()
        .unwrap()
        .iter()
        .all(|e| !matches!(e, Ev::Release(..))));
}

#[test]
fn no_walk_yields_old_backing_after_unmap_returns() {
    let (t, _) = simulated_table(TableConfig::default());
    t.map(
        Gpa(0),
        Hva(FAKE_HVA),
        16 * 4096,
        Perms::RW,
        PageSize::Size4K,
    )
    .unwrap();
    let mut w = t.walker();
    {
        let p = w.pin();
        for i in 0..16 {
            p.translate(Gpa(i * 4096), Access::Read).unwrap(); // fill the cache
        }
    }
    let mut g = t.gather();
    t.unmap(&mut g, Gpa(0), 8 * 4096, UnmapMode::Remove)
        .unwrap();
    g.finish().unwrap();
    let p = w.pin();
    for i in 0..8 {
        assert_eq!(
            p.translate(Gpa(i * 4096), Access::Read),
            Err(WalkError::NotMapped(Gpa(i * 4096)))
        );
    }
    assert!(p.translate(Gpa(8 * 4096), Access::Read).is_ok());
}

#[test]
fn real_anonymous_memory_comes_back() {
    let len = 64 << 20;
    let (mem, t) = anon_table_4k(len);
    assert_eq!(resident_bytes(mem.addr, len), len);
    let rss0 = guest_mm::stress::rss_bytes();
    let mut g = t.gather();
    t.unmap(&mut g, Gpa(4096), len - 8192, UnmapMode::Remove)
        .unwrap();
    g.finish().unwrap();
    assert_eq!(
        resident_bytes(mem.addr, len),
        8192,
        "first and last page stay"
    );
    let rss1 = guest_mm::stress::rss_bytes();
    assert!(
        rss0.saturating_sub(rss1) >= len / 2,
        "RSS must drop by ~64 MiB: {rss0} -> {rss1}"
    );
    // table overhead at 4 KiB leaves
    let st = t.stats();
    assert_eq!(st.release_calls, 1);
}

#[test]
fn memfd_backing_is_punched() {
    let len = 8u64 << 20;
    // SAFETY: plain syscalls on our own fd/mapping, checked.
    let (fd, addr) = unsafe {
        let fd = libc::memfd_create(c"gmm-test".as_ptr(), 0);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, len as i64), 0);
        let p = libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        (fd, p as u64)
    };
    for off in (0..len).step_by(4096) {
        // SAFETY: inside the mapping.
        unsafe { ((addr + off) as *mut u8).write_volatile(1) };
    }
    let blocks = |fd| {
        // SAFETY: fstat into a zeroed struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and out-pointer.
        assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0);
        st.st_blocks as u64 * 512
    };
    assert!(blocks(fd) >= len);
    let t = Stage2Table::new(TableConfig::default()).unwrap();
    t.register_backing(BackingRegion {
        hva: Hva(addr),
        len,
        kind: BackingKind::SharedFile { fd, offset: 0 },
    })
    .unwrap();
    t.map(Gpa(0), Hva(addr), len, Perms::RW, PageSize::Size2M)
        .unwrap();
    let mut g = t.gather();
    t.unmap(&mut g, Gpa(0), len, UnmapMode::Remove).unwrap();
    g.finish().unwrap();
    assert_eq!(blocks(fd), 0, "punch-hole must free the file's pages");
    // SAFETY: our mapping and fd.
    unsafe {
        libc::munmap(addr as *mut _, len as usize);
        libc::close(fd);
    }
}

#[test]
fn hugetlb_releases_only_whole_huge_pages() {
    let len = 4 * M2;
    let (mem, t) = anon_table_4k_as(
        len,
        BackingKind::Hugetlb {
            page_size: M2,
            file: None,
        },
    );
    let mut g = t.gather();
    // half of huge page 0 and a quarter of page 1: nothing may be released
    t.unmap(&mut g, Gpa(M2 / 2), M2 / 2 + M2 / 4, UnmapMode::Remove)
        .unwrap();
    g.finish().unwrap();
    assert_eq!(t.stats().release_calls, 0);
    assert_eq!(t.stats().partial_huge_pages, 2);
    assert_eq!(
        resident_bytes(mem.addr, len),
        len,
        "a partial huge page must not be released"
    );
    // the rest of page 0: now it goes, whole
    let mut g = t.gather();
    t.unmap(&mut g, Gpa(0), M2 / 2, UnmapMode::Remove).unwrap();
    g.finish().unwrap();
    assert_eq!(t.stats().release_calls, 1);
    assert_eq!(t.stats().partial_huge_pages, 1);
    assert_eq!(resident_bytes(mem.addr, M2), 0);
    assert_eq!(resident_bytes(mem.addr + M2, 3 * M2), 3 * M2);
}

#[test]
fn cpu_lock_stats_are_off_by_default_and_bounded_by_the_wall_clock() {
    let (t, _) = simulated_table(TableConfig::default());
    let work = |t: &Stage2Table| {
        t.map(Gpa(0), Hva(FAKE_HVA), 8 << 20, Perms::RW, PageSize::Size4K)
            .unwrap();
        let mut g = t.gather();
        t.unmap(&mut g, Gpa(0), 8 << 20, UnmapMode::Remove).unwrap();
        g.finish().unwrap();
    };
    work(&t);
    let st = t.stats();
    assert!(st.lock_hold_max_ns > 0);
    assert_eq!(st.lock_hold_cpu_max_ns, 0);
    assert_eq!(st.lock_hold_cpu_hist.iter().sum::<u64>(), 0);
    t.reset_lock_stats();
    t.set_cpu_lock_stats(true);
    work(&t);
    let st = t.stats();
    let holds: u64 = st.lock_hold_hist.iter().sum();
    assert_eq!(st.lock_hold_cpu_hist.iter().sum::<u64>(), holds);
    assert!(st.lock_hold_cpu_max_ns > 0);
    // The CPU interval encloses the wall-clock one only by the two clock
    // reads; it cannot be much longer.
    assert!(
        st.lock_hold_cpu_max_ns <= st.lock_hold_max_ns + 200_000,
        "{st:?}"
    );
}

#[test]
fn write_translates_once_inside_a_leaf_and_a_failed_write_writes_nothing() {
    let (_mem, t) = anon_table_4k(3 * 4096);
    let mut w = t.walker();
    {
        let g = w.pin();
        g.write(Gpa(8), &[1; 16]).unwrap();
    }
    assert_eq!(w.stats().translations, 1, "one leaf, one translation");
    {
        let g = w.pin();
        // across a leaf boundary
        g.write(Gpa(4096 - 4), &[2; 8]).unwrap();
        let mut b = [0u8; 24];
        g.read(Gpa(4096 - 8), &mut b).unwrap();
        assert_eq!(b[..4], [0; 4]);
        assert_eq!(b[4..12], [2; 8]);
        assert_eq!(b[12..], [0; 12]);
        let mut b = [0u8; 16];
        g.read(Gpa(8), &mut b).unwrap();
        assert_eq!(b, [1; 16]);
    }
    let mut g = t.gather();
    t.unmap(&mut g, Gpa(2 * 4096), 4096, UnmapMode::Remove)
        .unwrap();
    g.finish().unwrap();
    let g = w.pin();
    assert_eq!(
        g.write(Gpa(2 * 4096 - 4), &[3; 8]),
        Err(WalkError::NotMapped(Gpa(2 * 4096)))
    );
    let mut b = [0u8; 4];
    g.read(Gpa(2 * 4096 - 4), &mut b).unwrap();
    assert_eq!(b, [0; 4], "a failed write must write nothing");
    assert_eq!(g.write(Gpa(2 * 4096), &[]), Ok(()));
}

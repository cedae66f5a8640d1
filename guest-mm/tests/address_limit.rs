//! A table's guest address limit (`TableConfig::guest_address_limit`):
//! maps past it are refused and change nothing, and the leaf arena
//! reserves address space for the limit only, so a table fits under an
//! address-space limit (`ulimit -v`) its guest fits under. Setting
//! `RLIMIT_AS` is process wide, hence a test binary of its own whose tests
//! take turns.

// These tests use real threads and memory and the full geometry; under
// `--cfg loom` (tiny geometry, loom's primitives) only `tests/loom.rs` runs.
#![cfg(not(loom))]

mod common;

use std::sync::Mutex;

use common::*;
use guest_mm::*;

const GIB: u64 = 1 << 30;

/// Tests here change the process's address-space limit: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn vm_size() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    let kb: u64 = line[7..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

#[test]
fn a_map_past_the_limit_is_refused_and_changes_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap();
    // 1 GiB + 4 KiB rounds up to 2 GiB.
    let (t, _log) = simulated_table(TableConfig::with_limit(GIB + 4096));
    assert_eq!(t.guest_address_limit(), 2 * GIB);
    let top = Gpa(2 * GIB - 4096);
    let err = t
        .map(top, Hva(FAKE_HVA), 8192, Perms::RW, PageSize::Size4K)
        .unwrap_err();
    assert_eq!(
        err,
        MapError::Range(RangeError::OutOfRange {
            start: top,
            len: 8192,
            limit: 2 * GIB,
        })
    );
    assert!(err.to_string().contains("limit"), "{err}");
    assert_eq!(
        t.stats().table_pages,
        1,
        "a refused map allocated a table page"
    );
    let mut w = t.walker();
    assert!(matches!(
        w.pin().translate(top, Access::Read),
        Err(WalkError::NotMapped(_))
    ));
    // The last page below the limit maps and translates.
    t.map(top, Hva(FAKE_HVA), 4096, Perms::RW, PageSize::Size4K)
        .unwrap();
    assert_eq!(
        w.pin().translate(top, Access::Write).unwrap().hva,
        Hva(FAKE_HVA)
    );
}

#[test]
fn a_limit_of_zero_or_past_the_width_is_refused() {
    let _one = ONE_AT_A_TIME.lock().unwrap();
    for bad in [0, entry::ADDRESS_LIMIT + 1, u64::MAX] {
        match Stage2Table::new(TableConfig::with_limit(bad)) {
            Err(e @ NewTableError::BadLimit(v)) => {
                assert_eq!(v, bad);
                assert!(e.to_string().contains("guest_address_limit"), "{e}");
            }
            other => panic!("limit {bad:#x}: {:?}", other.err()),
        }
    }
    // The full width is the default and is accepted.
    let t = Stage2Table::new(TableConfig::default()).unwrap();
    assert_eq!(t.guest_address_limit(), entry::ADDRESS_LIMIT);
}

#[test]
fn the_arena_reserves_for_the_limit_only_and_says_so_when_refused() {
    let _one = ONE_AT_A_TIME.lock().unwrap();
    // A 4 GiB guest's table reserves 8 MiB of address space for its leaf
    // pages, not the 512 GiB of the full width.
    let before = vm_size();
    let small = Stage2Table::new(TableConfig::with_limit(4 * GIB)).unwrap();
    let grew = vm_size() - before;
    assert!(
        grew < 64 << 20,
        "a 4 GiB table grew the address space by {grew:#x}"
    );
    drop(small);

    // Under an address-space limit with 2 GiB to spare: the full width's
    // reservation is refused with a message that says what to do; a
    // 64 GiB guest's (128 MiB) fits.
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut old) }, 0);
    let tight = libc::rlimit {
        rlim_cur: vm_size() + 2 * GIB,
        rlim_max: old.rlim_max,
    };
    // SAFETY: setrlimit reads the struct we pass; lowering the soft limit
    // is always allowed.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &tight) }, 0);
    let full = Stage2Table::new(TableConfig::default());
    let fitting = Stage2Table::new(TableConfig::with_limit(64 * GIB));
    // SAFETY: as above; raising the soft limit back up to the unchanged
    // hard limit is allowed.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &old) }, 0);

    match full {
        Err(e @ NewTableError::Reserve { bytes, limit, .. }) => {
            assert_eq!(bytes, 512 * GIB);
            assert_eq!(limit, entry::ADDRESS_LIMIT);
            let msg = e.to_string();
            assert!(
                msg.contains("ulimit -v") && msg.contains("guest_address_limit"),
                "{msg}"
            );
        }
        other => panic!("the full width under a 2 GiB margin: {:?}", other.err()),
    }
    let t = fitting.expect("a 64 GiB guest's table under a 2 GiB margin");
    assert_eq!(t.guest_address_limit(), 64 * GIB);
}

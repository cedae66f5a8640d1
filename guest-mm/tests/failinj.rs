//! Failure injection on the release system calls (issue 13): `madvise`,
//! `process_madvise` and punch-hole fail, on real anonymous memory and a
//! real memfd. After each failure the test checks, page by page, that (a)
//! the table says what happened (`query`), (b) the mapping's RSS (its
//! `/proc/self/smaps` entry) and (c) `mincore` agree with it: a page the
//! table no longer maps is either not resident or on the table's
//! unreleased list (counted in `unreleased_bytes`, named in the error),
//! and pages still mapped keep their contents. Then the point is cleared
//! and the teardown gives everything back.
//!
//! The tests run one at a time (a lock): RSS is read per mapping, and
//! nothing else in the process should map or unmap meanwhile.

// These tests use real threads and memory and the full geometry; under
// `--cfg loom` (tiny geometry, loom's primitives) only `tests/loom.rs` runs.
#![cfg(not(loom))]

use std::sync::{Mutex, MutexGuard};

use guest_mm::*;

const PAGE: u64 = 4096;
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A private anonymous (or shared memfd) mapping of its own VMA
/// (`MADV_WIPEONFORK` keeps the kernel from merging it with a neighbour,
/// so its smaps RSS is its own), every page written with a pattern.
struct Mem {
    addr: u64,
    len: u64,
    fd: Option<i32>,
}

impl Mem {
    fn anon(len: u64) -> Mem {
        Mem::new(len, None)
    }

    fn memfd(len: u64) -> Mem {
        // SAFETY: a fresh memfd, checked; its size set before mapping.
        let fd = unsafe { libc::memfd_create(c"gmm-failinj".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: our fd.
        assert_eq!(unsafe { libc::ftruncate(fd, len as i64) }, 0);
        Mem::new(len, Some(fd))
    }

    fn new(len: u64, fd: Option<i32>) -> Mem {
        let flags = match fd {
            Some(_) => libc::MAP_SHARED,
            None => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        };
        // SAFETY: a fresh mapping at a kernel-chosen address, checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd.unwrap_or(-1),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: inside our mapping; advice only.
        unsafe {
            libc::madvise(p, len as usize, libc::MADV_NOHUGEPAGE);
            if fd.is_none() {
                libc::madvise(p, len as usize, libc::MADV_WIPEONFORK);
            }
        }
        let m = Mem {
            addr: p as u64,
            len,
            fd,
        };
        for i in 0..len / PAGE {
            m.write(i, i | 0xa500);
        }
        m
    }

    fn write(&self, page: u64, v: u64) {
        // SAFETY: inside our mapping.
        unsafe { ((self.addr + page * PAGE) as *mut u64).write_volatile(v) };
    }

    fn read(&self, page: u64) -> u64 {
        // SAFETY: inside our mapping.
        unsafe { ((self.addr + page * PAGE) as *const u64).read_volatile() }
    }

    fn kind(&self) -> BackingKind {
        match self.fd {
            Some(fd) => BackingKind::SharedFile { fd, offset: 0 },
            None => BackingKind::Anonymous,
        }
    }

    /// (c) `mincore` of every page.
    fn resident(&self) -> Vec<bool> {
        let n = (self.len / PAGE) as usize;
        let mut v = vec![0u8; n];
        // SAFETY: `v` has one byte per page of our mapping.
        let rc = unsafe { libc::mincore(self.addr as *mut _, self.len as usize, v.as_mut_ptr()) };
        assert_eq!(rc, 0);
        v.iter().map(|b| b & 1 == 1).collect()
    }

    /// (b) the mapping's RSS, from its own smaps entry.
    fn rss(&self) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((s, e)) = range.split_once('-') {
                    if let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16))
                    {
                        inside = s <= self.addr && self.addr < e;
                        if inside {
                            assert_eq!(
                                (s, e),
                                (self.addr, self.addr + self.len),
                                "the mapping shares its VMA"
                            );
                        }
                        continue;
                    }
                }
            }
            if inside {
                if let Some(kb) = line.strip_prefix("Rss:") {
                    let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap();
                    return kb * 1024;
                }
            }
        }
        panic!("mapping {:#x} not in smaps", self.addr);
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: our mapping and fd.
        unsafe {
            libc::munmap(self.addr as *mut _, self.len as usize);
            if let Some(fd) = self.fd {
                libc::close(fd);
            }
        }
    }
}

/// A table mapping `mem` at GPA 0 with 4 KiB leaves; with `scatter`, in
/// reverse page order (guest page `i` at host page `n - 1 - i`), so that
/// pages released together coalesce into no run.
fn table(mem: &Mem, scatter: bool) -> std::sync::Arc<Stage2Table> {
    let t = Stage2Table::new(TableConfig::default()).unwrap();
    t.register_backing(BackingRegion {
        hva: Hva(mem.addr),
        len: mem.len,
        kind: mem.kind(),
    })
    .unwrap();
    let n = mem.len / PAGE;
    for i in 0..n {
        let h = if scatter { n - 1 - i } else { i };
        t.map(
            Gpa(i * PAGE),
            Hva(mem.addr + h * PAGE),
            PAGE,
            Perms::RW,
            PageSize::Size4K,
        )
        .unwrap();
    }
    t
}

/// The host page of guest page `i`.
fn host_page(t: &Stage2Table, mem: &Mem, i: u64) -> Option<u64> {
    match t.query(Gpa(i * PAGE)) {
        PageState::Present { hva, .. }
        | PageState::Discarded { hva, .. }
        | PageState::Ballooned { hva, .. } => Some((hva.0 - mem.addr) / PAGE),
        PageState::Unmapped => None,
    }
}

fn on_list(list: &[(Hva, u64)], hva: u64) -> bool {
    list.iter().any(|&(h, l)| h.0 <= hva && hva < h.0 + l)
}

/// The checks (a)-(c) after a release of guest pages `released` (of
/// `n`) in `mode`: every released page has the mode's state; it is
/// resident exactly when it is on the unreleased list; every other page
/// is present, resident and keeps its contents; RSS matches residency and
/// `unreleased_bytes` the list. Returns the unreleased host pages.
fn check(t: &Stage2Table, mem: &Mem, released: &[u64], mode: UnmapMode, hosts: &[u64]) -> u64 {
    let res = mem.resident();
    let list = t.unreleased();
    let st = t.stats();
    assert_eq!(
        st.unreleased_bytes,
        list.iter().map(|&(_, l)| l).sum::<u64>(),
        "unreleased_bytes does not match the list {list:?}"
    );
    let n = mem.len / PAGE;
    let mut unreleased = 0;
    for i in 0..n {
        let st = t.query(Gpa(i * PAGE));
        let h = hosts[i as usize];
        let hva = mem.addr + h * PAGE;
        if released.contains(&i) {
            match (mode, st) {
                (UnmapMode::Remove, PageState::Unmapped)
                | (UnmapMode::Discard, PageState::Discarded { .. })
                | (UnmapMode::Balloon, PageState::Ballooned { .. }) => {}
                _ => panic!("guest page {i}: {st:?} after {mode:?}"),
            }
            let listed = on_list(&list, hva);
            assert_eq!(
                res[h as usize], listed,
                "guest page {i} (host page {h}): resident {} but on the unreleased list: {listed}",
                res[h as usize]
            );
            unreleased += u64::from(listed);
        } else {
            assert!(
                matches!(st, PageState::Present { hva: v, .. } if v.0 == hva),
                "guest page {i}: {st:?}"
            );
            assert!(res[h as usize], "mapped guest page {i} is not resident");
            assert_eq!(
                mem.read(h),
                h | 0xa500,
                "mapped guest page {i} lost its contents"
            );
            assert!(
                !on_list(&list, hva),
                "mapped page {i} on the unreleased list"
            );
        }
    }
    let resident = res.iter().filter(|&&r| r).count() as u64 * PAGE;
    assert_eq!(mem.rss(), resident, "RSS vs mincore");
    unreleased
}

/// The host page of every guest page, before anything is released.
fn hosts(t: &Stage2Table, mem: &Mem) -> Vec<u64> {
    (0..mem.len / PAGE)
        .map(|i| host_page(t, mem, i).unwrap())
        .collect()
}

/// Teardown: everything is released, the unreleased list included.
fn teardown_frees_everything(t: &Stage2Table, mem: &Mem) {
    let mut g = t.gather_full_mm();
    t.teardown(&mut g).unwrap();
    g.finish()
        .expect("the teardown releases what failed before");
    t.rcu_barrier();
    assert!(t.unreleased().is_empty(), "{:?}", t.unreleased());
    assert_eq!(t.stats().unreleased_bytes, 0);
    assert!(mem.resident().iter().all(|r| !r), "resident after teardown");
    assert_eq!(mem.rss(), 0);
}

/// Unmaps guest pages `pages` (one gather) in `mode`.
fn release(t: &Stage2Table, pages: &[u64], mode: UnmapMode) -> Result<GatherStats, ReleaseError> {
    let mut g = t.gather();
    for &p in pages {
        t.unmap(&mut g, Gpa(p * PAGE), PAGE, mode).unwrap();
    }
    g.finish()
}

#[test]
fn madvise_failure_is_retried() {
    let _s = serial();
    let mem = Mem::anon(64 * PAGE);
    let t = table(&mem, false);
    let hs = hosts(&t, &mem);
    let pages: Vec<u64> = (8..24).collect();
    t.faults.madvise.fail_next(RELEASE_ATTEMPTS_LESS_ONE);
    release(&t, &pages, UnmapMode::Discard).expect("a retry succeeds");
    assert_eq!(t.faults.madvise.injected(), RELEASE_ATTEMPTS_LESS_ONE);
    assert_eq!(t.stats().release_failed_attempts, RELEASE_ATTEMPTS_LESS_ONE);
    assert_eq!(check(&t, &mem, &pages, UnmapMode::Discard, &hs), 0);
    teardown_frees_everything(&t, &mem);
}

const RELEASE_ATTEMPTS_LESS_ONE: u64 = backing::RELEASE_ATTEMPTS as u64 - 1;

fn madvise_failure_keeps_the_range_accounted(mode: UnmapMode) {
    let _s = serial();
    let mem = Mem::anon(64 * PAGE);
    let t = table(&mem, false);
    let hs = hosts(&t, &mem);
    let pages: Vec<u64> = (8..24).collect();
    let rss0 = mem.rss();
    t.faults.madvise.fail_always();
    let e = release(&t, &pages, mode).expect_err("every attempt failed");
    assert_eq!(e.op, "madvise(MADV_DONTNEED)");
    assert_eq!(e.attempts, backing::RELEASE_ATTEMPTS);
    assert_eq!((e.hva.0, e.len), (mem.addr + 8 * PAGE, 16 * PAGE), "{e}");
    assert!(e.to_string().contains("unreleased_bytes"), "{e}");
    assert_eq!(t.unreleased(), vec![(Hva(mem.addr + 8 * PAGE), 16 * PAGE)]);
    assert_eq!(check(&t, &mem, &pages, mode, &hs), 16);
    assert_eq!(mem.rss(), rss0, "nothing was released");
    assert!(t.stats().release_errors >= 1);
    // Cleared: the teardown releases the listed range with the rest.
    t.faults.madvise.clear();
    teardown_frees_everything(&t, &mem);
}

#[test]
fn madvise_failure_discard_keeps_the_range_accounted() {
    madvise_failure_keeps_the_range_accounted(UnmapMode::Discard);
}

#[test]
fn madvise_failure_remove_keeps_the_range_accounted() {
    madvise_failure_keeps_the_range_accounted(UnmapMode::Remove);
}

#[test]
fn madvise_failure_balloon_keeps_the_range_accounted() {
    madvise_failure_keeps_the_range_accounted(UnmapMode::Balloon);
}

#[test]
fn a_teardown_that_fails_again_keeps_the_range_listed() {
    let _s = serial();
    let mem = Mem::anon(32 * PAGE);
    let t = table(&mem, false);
    t.faults.madvise.fail_always();
    release(&t, &[4, 5], UnmapMode::Discard).unwrap_err();
    // The teardown's two runs would go as one process_madvise: fail it too.
    t.faults.batch_release.fail_always();
    let mut g = t.gather_full_mm();
    t.teardown(&mut g).unwrap();
    let e = g.finish().expect_err("the teardown's release fails too");
    assert_eq!(e.attempts, backing::RELEASE_ATTEMPTS);
    // Every page stays listed and resident: the earlier range and the rest.
    let list = t.unreleased();
    assert_eq!(
        list.iter().map(|&(_, l)| l).sum::<u64>(),
        32 * PAGE,
        "{list:?}"
    );
    assert_eq!(t.stats().unreleased_bytes, 32 * PAGE);
    assert!(mem.resident().iter().all(|&r| r));
    assert_eq!(mem.rss(), 32 * PAGE);
}

#[test]
fn a_page_mapped_again_leaves_the_unreleased_list() {
    let _s = serial();
    let mem = Mem::anon(16 * PAGE);
    let t = table(&mem, false);
    t.faults.madvise.fail_always();
    release(&t, &[2, 3], UnmapMode::Discard).unwrap_err();
    assert_eq!(t.unreleased(), vec![(Hva(mem.addr + 2 * PAGE), 2 * PAGE)]);
    // A fault restores page 2: in use again, never released behind it.
    assert!(matches!(
        t.fault_in(Gpa(2 * PAGE)),
        Ok(FaultOutcome::Restored { .. })
    ));
    assert_eq!(t.unreleased(), vec![(Hva(mem.addr + 3 * PAGE), PAGE)]);
    mem.write(2, 77);
    // A remove and a fresh map of page 3's host page: off the list too.
    t.faults.madvise.clear();
    let mut g = t.gather();
    t.unmap(&mut g, Gpa(3 * PAGE), PAGE, UnmapMode::Remove)
        .unwrap();
    g.finish().unwrap();
    t.map(
        Gpa(3 * PAGE),
        Hva(mem.addr + 3 * PAGE),
        PAGE,
        Perms::RW,
        PageSize::Size4K,
    )
    .unwrap();
    assert!(t.unreleased().is_empty());
    assert_eq!(t.stats().unreleased_bytes, 0);
    assert_eq!(mem.read(2), 77, "a restored page kept what was written");
    teardown_frees_everything(&t, &mem);
}

#[test]
fn process_madvise_failure_falls_back_to_one_madvise_per_run() {
    let _s = serial();
    let mem = Mem::anon(64 * PAGE);
    let t = table(&mem, true);
    let hs = hosts(&t, &mem);
    // Every second guest page: 16 runs that do not coalesce.
    let pages: Vec<u64> = (0..32).map(|i| 2 * i + 1).collect();
    t.faults.batch_release.fail_always();
    let st = release(&t, &pages, UnmapMode::Discard).expect("the fallback releases");
    assert!(t.faults.batch_release.injected() >= 1);
    assert_eq!(st.release_runs, 32, "{st:?}");
    let ts = t.stats();
    assert!(ts.release_batch_fallbacks >= 1, "{ts:?}");
    assert_eq!(ts.release_batched_calls, 0, "{ts:?}");
    assert_eq!(check(&t, &mem, &pages, UnmapMode::Discard, &hs), 0);
    // Both fail: every run is listed, each one resident.
    t.faults.madvise.fail_always();
    let more: Vec<u64> = (0..8).map(|i| 2 * i).collect();
    release(&t, &more, UnmapMode::Discard).unwrap_err();
    assert_eq!(t.unreleased().len(), 8);
    let all: Vec<u64> = pages.iter().chain(&more).copied().collect();
    assert_eq!(check(&t, &mem, &all, UnmapMode::Discard, &hs), 8);
    t.faults.batch_release.clear();
    t.faults.madvise.clear();
    teardown_frees_everything(&t, &mem);
}

#[test]
fn punch_hole_failure_is_retried_then_kept_accounted() {
    let _s = serial();
    let mem = Mem::memfd(64 * PAGE);
    let t = table(&mem, false);
    let hs = hosts(&t, &mem);
    t.faults.punch_hole.fail_next(RELEASE_ATTEMPTS_LESS_ONE);
    release(&t, &[0, 1, 2, 3], UnmapMode::Discard).expect("a retry succeeds");
    assert_eq!(check(&t, &mem, &[0, 1, 2, 3], UnmapMode::Discard, &hs), 0);
    t.faults.punch_hole.fail_always();
    let e = release(&t, &[10, 11, 12], UnmapMode::Balloon).expect_err("every attempt failed");
    assert_eq!(e.op, "fallocate(PUNCH_HOLE|KEEP_SIZE)");
    assert_eq!(t.unreleased(), vec![(Hva(mem.addr + 10 * PAGE), 3 * PAGE)]);
    // Discarded pages 0..4 are not resident; ballooned 10..13 are, listed.
    let mut res = mem.resident();
    assert!(res[10] && res[11] && res[12] && !res[0]);
    res.truncate(4);
    assert!(res.iter().all(|r| !r));
    assert_eq!(mem.rss(), 60 * PAGE);
    t.faults.punch_hole.clear();
    teardown_frees_everything(&t, &mem);
}

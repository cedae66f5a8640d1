//! A stress harness for the lockless protocol on real memory, shared by the
//! test suite and `gmm stress`.
//!
//! Mutator threads each own a slice of a real anonymous region and map,
//! unmap (remove or discard), fault in and re-protect pages of it at random,
//! keeping a per-page oracle. Walker threads translate random addresses of
//! the whole region through the fast walk and read the page through the
//! translation. Violations counted:
//!
//! - `use_after_free`: a walk read a poisoned (freed) table page;
//! - `stale_translations`: a walker read released memory (zero) through a
//!   translation, a translation pointed elsewhere than the oracle says, or
//!   a mutator's fresh walk still translated a range after its unmap returned;
//! - `not_released`: memory of a range was still resident after its unmap
//!   returned (`mincore`);
//! - `oracle_mismatch`: the table disagreed with a mutator's oracle.
//!
//! Every page is stamped with its own address before it is mapped, so a
//! walker that reads zero read memory after its release.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::{
    Access, BackingKind, BackingRegion, Gpa, Hva, PageSize, PageState, Perms, Stage2Table,
    TableConfig, UnmapMode, WalkError,
};

/// Parameters of a stress run.
#[derive(Clone, Debug)]
pub struct StressConfig {
    /// How long to run.
    pub duration: Duration,
    /// Walker threads.
    pub walkers: usize,
    /// Mutator (map/unmap) threads.
    pub mutators: usize,
    /// Bytes of real memory (a multiple of 2 MiB per mutator).
    pub mem_bytes: u64,
    /// Table lock budget.
    pub yield_entries: u32,
    /// Make every n-th gather batch allocation fail (0 = never).
    pub fail_batch_every: u64,
}

impl Default for StressConfig {
    fn default() -> Self {
        StressConfig {
            duration: Duration::from_secs(2),
            walkers: 2,
            mutators: 2,
            mem_bytes: 64 << 20,
            yield_entries: 2048,
            fail_batch_every: 0,
        }
    }
}

/// What a stress run saw.
#[derive(Clone, Debug, Default)]
pub struct StressReport {
    /// Translations attempted by walkers.
    pub walks: u64,
    /// Translations that succeeded and were read through.
    pub walks_ok: u64,
    /// Unmap calls.
    pub unmaps: u64,
    /// Map calls.
    pub maps: u64,
    /// Fault-ins.
    pub faults: u64,
    /// Protect calls.
    pub protects: u64,
    /// Flushes.
    pub flushes: u64,
    /// Batch allocations that fell back to the on-stack array.
    pub fallback_batches: u64,
    /// Grace periods.
    pub grace_periods: u64,
    /// Huge-leaf splits.
    pub splits: u64,
    /// Bytes released to the host.
    pub released_bytes: u64,
    /// Longest table-lock hold in microseconds.
    pub max_lock_hold_us: f64,
    /// Violations: reads of freed table pages.
    pub use_after_free: u64,
    /// Violations: stale translations.
    pub stale_translations: u64,
    /// Violations: memory still resident after its unmap returned.
    pub not_released: u64,
    /// Violations: the table disagreed with the oracle.
    pub oracle_mismatch: u64,
    /// Process RSS at start, bytes.
    pub rss_start_bytes: u64,
    /// Highest RSS sampled.
    pub rss_peak_bytes: u64,
    /// RSS after teardown.
    pub rss_end_bytes: u64,
    /// Resident bytes of the region after teardown (mincore).
    pub region_resident_end_bytes: u64,
    /// Table pages left after teardown and barrier (the root only: 1).
    pub table_pages_end: u64,
}

impl StressReport {
    /// Total violations.
    pub fn violations(&self) -> u64 {
        self.use_after_free + self.stale_translations + self.not_released + self.oracle_mismatch
    }
}

/// Errors setting up a stress run.
#[derive(Debug, Error)]
pub enum StressError {
    /// Bad parameters.
    #[error("invalid stress configuration: {0}")]
    Config(String),
    /// mmap failed.
    #[error("could not map {0} bytes of memory for the stress run: {1}")]
    Mmap(u64, std::io::Error),
    /// The table refused something it should not.
    #[error("table set-up failed: {0}")]
    Table(String),
}

/// Resident set size of this process, from `/proc/self/statm`.
pub fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let psz = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(psz).unwrap_or(4096)
}

/// Resident bytes of `[addr, addr + len)` (page aligned), by `mincore`.
pub fn resident_bytes(addr: u64, len: u64) -> u64 {
    let pages = len.div_ceil(4096) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: the range is a mapping of ours (callers pass regions they
    // mapped); vec has one byte per page as mincore requires.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
    if rc != 0 {
        return u64::MAX;
    }
    vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * 4096
}

struct Region {
    base: u64,
    len: u64,
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: mapped in run(); every user (table, threads) is gone.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len as usize) };
    }
}

const STAMP_TAG: u64 = 0x5eed << 48;

fn stamp_of(gpa: u64) -> u64 {
    STAMP_TAG | gpa
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Slot {
    Unmapped,
    Mapped,
    Discarded,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// Run the stress test.
pub fn run(cfg: &StressConfig) -> Result<StressReport, StressError> {
    const TWO_M: u64 = 2 << 20;
    if cfg.walkers == 0 || cfg.mutators == 0 {
        return Err(StressError::Config(
            "need at least one walker and one mutator".into(),
        ));
    }
    let slice = (cfg.mem_bytes / cfg.mutators as u64) & !(TWO_M - 1);
    if slice == 0 {
        return Err(StressError::Config(format!(
            "{} bytes is too little for {} mutators: give each at least 2 MiB",
            cfg.mem_bytes, cfg.mutators
        )));
    }
    let len = slice * cfg.mutators as u64;
    let rss_start = rss_bytes();
    // Over-map by 2 MiB so the region can be 2 MiB aligned (huge leaves).
    // SAFETY: anonymous private mapping, checked below.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            (len + TWO_M) as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(StressError::Mmap(len, std::io::Error::last_os_error()));
    }
    let region = Region {
        base: raw as u64,
        len: len + TWO_M,
    };
    let base = (region.base + TWO_M - 1) & !(TWO_M - 1);
    let table = Stage2Table::new(TableConfig {
        yield_entries: cfg.yield_entries,
    })
    .map_err(|e| StressError::Table(e.to_string()))?;
    table
        .register_backing(BackingRegion {
            hva: Hva(base),
            len,
            kind: BackingKind::Anonymous,
        })
        .map_err(|e| StressError::Table(e.to_string()))?;
    if cfg.fail_batch_every > 0 {
        table.faults.batch_alloc.fail_every(cfg.fail_batch_every);
    }
    // Start fully mapped (2 MiB leaves where possible), stamped.
    for off in (0..len).step_by(4096) {
        // SAFETY: inside our mapping.
        unsafe { ((base + off) as *mut u64).write_volatile(stamp_of(off)) };
    }
    table
        .map(Gpa(0), Hva(base), len, Perms::RW, PageSize::Size2M)
        .map_err(|e| StressError::Table(e.to_string()))?;

    let stop = Arc::new(AtomicBool::new(false));
    let stale = Arc::new(AtomicU64::new(0));
    let uaf = Arc::new(AtomicU64::new(0));
    let not_released = Arc::new(AtomicU64::new(0));
    let mismatch = Arc::new(AtomicU64::new(0));
    let rss_peak = Arc::new(AtomicU64::new(rss_bytes()));
    let counts: Arc<[AtomicU64; 6]> = Arc::new(std::array::from_fn(|_| AtomicU64::new(0)));

    let mut handles = Vec::new();
    for w in 0..cfg.walkers {
        let table = table.clone();
        let stop = stop.clone();
        let stale = stale.clone();
        let uaf = uaf.clone();
        let counts = counts.clone();
        handles.push(std::thread::spawn(move || {
            let mut walker = table.walker();
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1));
            let (mut walks, mut ok) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let g = walker.pin();
                for _ in 0..64 {
                    let gpa = rng.below(len) & !7;
                    walks += 1;
                    match g.translate(Gpa(gpa), Access::Read) {
                        Ok(t) => {
                            ok += 1;
                            let page = t.hva.0 & !4095;
                            // SAFETY: translated inside our read section:
                            // the page is registered backing and cannot be
                            // released before we unpin.
                            let v = unsafe { (page as *const u64).read_volatile() };
                            if v != stamp_of(gpa & !4095) || page != base + (gpa & !4095) {
                                stale.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(WalkError::UseAfterFree(_)) => {
                            uaf.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {}
                    }
                }
                drop(g);
            }
            counts[0].fetch_add(walks, Ordering::Relaxed);
            counts[1].fetch_add(ok, Ordering::Relaxed);
        }));
    }
    for m in 0..cfg.mutators {
        let table = table.clone();
        let stop = stop.clone();
        let stale = stale.clone();
        let not_released = not_released.clone();
        let mismatch = mismatch.clone();
        let counts = counts.clone();
        let rss_peak = rss_peak.clone();
        handles.push(std::thread::spawn(move || {
            let lo = m as u64 * slice;
            let npages = (slice / 4096) as usize;
            let mut st = vec![Slot::Mapped; npages];
            let mut rng = Rng(0xdead_beef_cafe_f00d ^ (m as u64 + 7) << 20);
            let mut walker = table.walker();
            let (mut maps, mut unmaps, mut faults, mut protects) = (0u64, 0u64, 0u64, 0u64);
            let mut iter = 0u64;
            while !stop.load(Ordering::Relaxed) {
                iter += 1;
                if m == 0 && iter.is_multiple_of(64) {
                    rss_peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                }
                let p = rng.below(npages as u64) as usize;
                // A run of same-state pages from p, of random length.
                let want = match rng.below(4) {
                    0 => 1,
                    1 => 1 + rng.below(16) as usize,
                    2 => 512,
                    _ => 1 + rng.below(2048) as usize,
                };
                let s0 = st[p];
                let mut q = p;
                while q < npages
                    && q - p < want
                    && (st[q] == s0 || (s0 != Slot::Unmapped && st[q] != Slot::Unmapped))
                {
                    q += 1;
                }
                let gpa = lo + p as u64 * 4096;
                let n = (q - p) as u64 * 4096;
                match s0 {
                    Slot::Unmapped => {
                        for off in (0..n).step_by(4096) {
                            // SAFETY: inside our mapping; unmapped in the table, so no walker reads it.
                            unsafe {
                                ((base + gpa + off) as *mut u64).write_volatile(stamp_of(gpa + off))
                            };
                        }
                        let leaf = if rng.below(2) == 0 {
                            PageSize::Size2M
                        } else {
                            PageSize::Size4K
                        };
                        match table.map(Gpa(gpa), Hva(base + gpa), n, Perms::RW, leaf) {
                            Ok(()) => st[p..q].iter_mut().for_each(|s| *s = Slot::Mapped),
                            Err(_) => {
                                mismatch.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        maps += 1;
                    }
                    Slot::Discarded if rng.below(2) == 0 => {
                        // Fault the page back in: stamp its whole leaf first.
                        let size = match table.query(Gpa(gpa)) {
                            PageState::Discarded { size, .. } => size.bytes(),
                            _ => {
                                mismatch.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        };
                        let leaf = gpa & !(size - 1);
                        for off in (0..size).step_by(4096) {
                            // SAFETY: inside our slice (leaves never cross slices: slices are 2 MiB aligned).
                            unsafe {
                                ((base + leaf + off) as *mut u64)
                                    .write_volatile(stamp_of(leaf + off))
                            };
                        }
                        match table.fault_in(Gpa(gpa)) {
                            Ok(_) => {
                                let first = ((leaf - lo) / 4096) as usize;
                                st[first..first + (size / 4096) as usize]
                                    .iter_mut()
                                    .for_each(|s| *s = Slot::Mapped);
                            }
                            Err(_) => {
                                mismatch.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        faults += 1;
                    }
                    _ if rng.below(8) == 0 => {
                        let perms = if rng.below(2) == 0 {
                            Perms::R
                        } else {
                            Perms::RW
                        };
                        let mut g = table.gather();
                        if table.protect(&mut g, Gpa(gpa), n, perms).is_err() {
                            mismatch.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = g.finish();
                        protects += 1;
                    }
                    _ if q - p >= 16 && rng.below(4) == 0 => {
                        // Checkerboard: every other page in one gather, so
                        // the release runs cannot coalesce and the batches fill.
                        let mut g = table.gather();
                        let mut ok = true;
                        for i in (p..q).step_by(2) {
                            let a = lo + i as u64 * 4096;
                            ok &= table
                                .unmap(&mut g, Gpa(a), 4096, UnmapMode::Discard)
                                .is_ok();
                        }
                        let _ = g.finish();
                        unmaps += 1;
                        if !ok {
                            mismatch.fetch_add(1, Ordering::Relaxed);
                        }
                        let g = walker.pin();
                        for i in (p..q).step_by(2) {
                            st[i] = Slot::Discarded;
                            let a = lo + i as u64 * 4096;
                            if g.translate(Gpa(a), Access::Read).is_ok() {
                                stale.fetch_add(1, Ordering::Relaxed);
                            }
                            if resident_bytes(base + a, 4096) != 0 {
                                not_released.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    _ => {
                        let discard = rng.below(2) == 0;
                        let mode = if discard {
                            UnmapMode::Discard
                        } else {
                            UnmapMode::Remove
                        };
                        let mut g = table.gather();
                        let r = table.unmap(&mut g, Gpa(gpa), n, mode);
                        let _ = g.finish();
                        unmaps += 1;
                        if r.is_err() {
                            mismatch.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let to = if discard {
                            Slot::Discarded
                        } else {
                            Slot::Unmapped
                        };
                        st[p..q].iter_mut().for_each(|s| *s = to);
                        // After unmap returns: no fresh walk translates it...
                        {
                            let g = walker.pin();
                            for off in (0..n).step_by(4096) {
                                if g.translate(Gpa(gpa + off), Access::Read).is_ok() {
                                    stale.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        // ...and its memory went back to the host.
                        if resident_bytes(base + gpa, n) != 0 {
                            not_released.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            // Final oracle check of the whole slice.
            for (i, s) in st.iter().enumerate() {
                let gpa = lo + i as u64 * 4096;
                let ok = matches!(
                    (s, table.query(Gpa(gpa))),
                    (Slot::Unmapped, PageState::Unmapped)
                        | (Slot::Mapped, PageState::Present { .. })
                        | (Slot::Discarded, PageState::Discarded { .. })
                );
                if !ok {
                    mismatch.fetch_add(1, Ordering::Relaxed);
                }
            }
            counts[2].fetch_add(maps, Ordering::Relaxed);
            counts[3].fetch_add(unmaps, Ordering::Relaxed);
            counts[4].fetch_add(faults, Ordering::Relaxed);
            counts[5].fetch_add(protects, Ordering::Relaxed);
        }));
    }
    std::thread::sleep(cfg.duration);
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let during = table.stats();
    // Teardown through a full-mm gather, then wait for the table pages.
    let mut g = table.gather_full_mm();
    table
        .teardown(&mut g)
        .map_err(|e| StressError::Table(e.to_string()))?;
    let _ = g.finish();
    table.rcu_barrier();
    let end = table.stats();
    let report = StressReport {
        walks: counts[0].load(Ordering::Relaxed),
        walks_ok: counts[1].load(Ordering::Relaxed),
        maps: counts[2].load(Ordering::Relaxed),
        unmaps: counts[3].load(Ordering::Relaxed),
        faults: counts[4].load(Ordering::Relaxed),
        protects: counts[5].load(Ordering::Relaxed),
        flushes: end.flushes,
        fallback_batches: end.fallback_batches,
        grace_periods: end.grace_periods,
        splits: end.splits,
        released_bytes: end.released_bytes,
        max_lock_hold_us: during.lock_hold_max_ns as f64 / 1000.0,
        use_after_free: uaf.load(Ordering::Relaxed) + end.use_after_free,
        stale_translations: stale.load(Ordering::Relaxed),
        not_released: not_released.load(Ordering::Relaxed),
        oracle_mismatch: mismatch.load(Ordering::Relaxed),
        rss_start_bytes: rss_start,
        rss_peak_bytes: rss_peak.load(Ordering::Relaxed),
        rss_end_bytes: rss_bytes(),
        region_resident_end_bytes: resident_bytes(base, len),
        table_pages_end: end.table_pages,
    };
    drop(table);
    drop(region);
    Ok(report)
}

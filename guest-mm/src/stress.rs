//! A stress harness for the lockless protocol on real memory, shared by the
//! test suite and `gmm stress`.
//!
//! The guest range is backed by two *banks* of real anonymous memory: a
//! guest page `gpa` is mapped either at `base + gpa` (bank 0) or at
//! `base + len + gpa` (bank 1), chosen at random at every map, so a
//! translation that outlived its mapping points at a page that was released
//! (it reads zero) rather than at the page's new backing. Every page is
//! stamped before it is mapped (or faulted back in) with its guest address
//! and a generation, so whoever reads through a translation can tell whether
//! it reads what is mapped there.
//!
//! - *Mutator* threads each own a slice of the guest range and map, unmap
//!   (remove or discard, whole runs or a checkerboard), fault in and
//!   re-protect pages of it at random, keeping a per-page oracle (state and
//!   bank). Before an unmap they translate the run through their walker (so
//!   its translation cache holds it), after it they check that no new walk,
//!   cached or not, translates it and that both banks of it left memory
//!   (`mincore`). After a map or fault-in they read the new stamp back
//!   through the walker. Now and then a mutator *churns* a 2 MiB block:
//!   with the rest of the block unmapped, it maps the block's last page
//!   with a 4 KiB leaf (a fresh leaf table), discards it and removes it,
//!   several times; the removal unlinks the leaf table (which stays in the
//!   leaf arena) in a flush that invalidates nothing. Or it churns the
//!   last 2 MiB of a GiB where nothing else is mapped (simulated backing,
//!   past both banks): then the removal also unlinks the GiB's level-2
//!   page, and only deferred freeing keeps that page alive for readers
//!   still inside it.
//! - *Walker* threads translate through the fast walk and read the page
//!   through the translation: three read sections in four re-translate a
//!   working set of 64 consecutive pages (one per cache slot, so the cache
//!   answers them across read sections and unmaps), the fourth random pages
//!   of the whole range. Every other read section, chosen at random, goes
//!   through the vm-memory view of the read section instead
//!   ([`crate::view`]): `read_slice` of a page's stamp, or `get_slices`
//!   over one to three pages, each slice checked to point at the pages'
//!   backing and read through the slice (volatile loads), so a
//!   `get_slices` that raced an unmap is seen if it ever reads backing
//!   after its release. After every unmap, the mutator's own view must
//!   refuse every page of the range as well.
//! - One *scanner* thread keeps asking `map` for the block being churned
//!   and the page after it (kept in use meanwhile): the map's pinned check
//!   for a used page walks the block's leaf table through its 511 empty
//!   entries while the churn unlinks and retires it, and is always refused,
//!   so it changes nothing.
//!
//! Violations counted:
//!
//! - `use_after_free`: a walk or scan read a poisoned (freed) table page;
//! - `stale_translations`: a walker read released memory (zero) or another
//!   page's stamp through a translation or a view's slice (also counted
//!   in `view_stale_reads`), a translation or slice pointed outside the
//!   page's two banks, a mutator's walk disagreed with its oracle before an
//!   unmap or after a map, or still translated a range after its unmap
//!   returned;
//! - `not_released`: memory of a range was still resident after its unmap
//!   returned (`mincore`, both banks);
//! - `oracle_mismatch`: the table's state disagreed with a mutator's oracle;
//! - `op_errors`: a map, unmap, protect, fault-in or gather flush returned
//!   an error the oracle does not allow;
//! - `thread_panics`: a thread of the run panicked.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Thread;
use std::time::Duration;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::view::GuestMemoryView;
use crate::walk::CACHE_SLOTS;
use crate::{
    Access, BackingKind, BackingRegion, FaultOutcome, Gather, Gpa, Hva, MapError, PageSize,
    PageState, Perms, Stage2Table, TableConfig, UnmapMode, WalkError, WalkGuard, Walker,
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
    /// Bytes of guest memory (a multiple of 2 MiB per mutator); twice as
    /// much host address space is reserved (two banks), at most this much
    /// of it resident.
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
    /// Walker translations answered by the translation cache.
    pub cache_hits: u64,
    /// Walker reads through the vm-memory view (`read_slice` or
    /// `get_slices`), included in `walks`.
    pub view_reads: u64,
    /// Of those, reads that found every page mapped and read it through.
    pub view_reads_ok: u64,
    /// Violations through the view: a slice pointing outside its pages'
    /// backing, or a read through it that found released memory or
    /// another page's stamp (included in `stale_translations`).
    pub view_stale_reads: u64,
    /// Translation-cache shootdowns seen by walkers at pin time.
    pub shootdowns: u64,
    /// Unmap calls.
    pub unmaps: u64,
    /// Map calls.
    pub maps: u64,
    /// Fault-ins.
    pub faults: u64,
    /// Protect calls by mutators.
    pub protects: u64,
    /// Churn cycles (map 4 KiB leaves, discard, remove) of a 2 MiB block.
    pub churns: u64,
    /// Scans (a refused map's pinned check) of a block being churned.
    pub scans: u64,
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
    /// Violations: errors returned by map, unmap, protect, fault-in or a
    /// gather's flush (including the teardown's) that the oracle does not
    /// allow.
    pub op_errors: u64,
    /// Violations: threads of the run that panicked.
    pub thread_panics: u64,
    /// The first violation seen, described (`None` if there was none).
    pub first_violation: Option<String>,
    /// Process RSS at start, bytes.
    pub rss_start_bytes: u64,
    /// Highest RSS sampled.
    pub rss_peak_bytes: u64,
    /// RSS after teardown.
    pub rss_end_bytes: u64,
    /// Resident bytes of the region (both banks) after teardown (mincore).
    pub region_resident_end_bytes: u64,
    /// Table pages left after teardown and barrier (the root only: 1).
    pub table_pages_end: u64,
}

impl StressReport {
    /// Total violations.
    pub fn violations(&self) -> u64 {
        self.use_after_free
            + self.stale_translations
            + self.not_released
            + self.oracle_mismatch
            + self.op_errors
            + self.thread_panics
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

const PAGE: u64 = 4096;
const TWO_M: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
const STAMP_TAG: u64 = 0x5eed << 48;
/// `hot` value: no block is being churned.
const NO_BLOCK: u64 = u64::MAX;
/// Map / discard / remove cycles of one churn.
const CHURN_CYCLES: usize = 16;
/// Read sections a walker keeps its working set for.
const WORKING_SET_PINS: u64 = 256;

fn stamp_of(gpa: u64) -> u64 {
    STAMP_TAG | gpa
}

/// Where the guest range lives on the host: two banks of `len` bytes.
#[derive(Clone, Copy)]
struct Geo {
    base: u64,
    len: u64,
}

impl Geo {
    /// Host address of guest address `gpa` in `bank`.
    fn hva(self, bank: u8, gpa: u64) -> u64 {
        self.base + u64::from(bank) * self.len + gpa
    }

    /// Whether host page `hva_page` is one of guest page `gpa_page`'s two
    /// possible backings (so it is inside our mapping).
    fn backs(self, hva_page: u64, gpa_page: u64) -> bool {
        let off = hva_page.wrapping_sub(self.base);
        off == gpa_page || off == gpa_page + self.len
    }

    /// Stamp the pages of `[gpa, gpa + n)` in `bank` with their guest
    /// address and `gen`. The caller makes sure the table does not map
    /// them (no walker may read them meanwhile).
    fn stamp(self, bank: u8, gpa: u64, n: u64, gen: u64) {
        assert!(gpa + n <= self.len && bank < 2, "stamp outside the region");
        for off in (0..n).step_by(PAGE as usize) {
            let p = self.hva(bank, gpa + off) as *mut u64;
            // SAFETY: inside our mapping (asserted above: both banks of
            // [0, len) are mapped and live as long as the run); 16 bytes
            // at the start of a page.
            unsafe {
                p.write_volatile(stamp_of(gpa + off));
                p.add(1).write_volatile(gen);
            }
        }
    }

    /// Read the stamp (guest address, generation) of host page `hva_page`,
    /// if it is one of guest page `gpa_page`'s backings.
    fn read_stamp(self, hva_page: u64, gpa_page: u64) -> Option<(u64, u64)> {
        if !self.backs(hva_page, gpa_page) {
            return None;
        }
        let p = hva_page as *const u64;
        // SAFETY: `backs` checked that the page is inside our mapping.
        Some(unsafe { (p.read_volatile(), p.add(1).read_volatile()) })
    }

    /// Bytes of both banks of `[gpa, gpa + n)` that are resident.
    fn resident(self, gpa: u64, n: u64) -> u64 {
        resident_bytes(self.hva(0, gpa), n).saturating_add(resident_bytes(self.hva(1, gpa), n))
    }
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

/// What all threads of a run share.
struct Shared {
    geo: Geo,
    /// Where the GiB churns start: the first GiB past both banks' host
    /// addresses, backed by simulated memory (see [`Mutator::churn_gib`]).
    gib_churn: u64,
    stop: AtomicBool,
    stale: AtomicU64,
    view_stale: AtomicU64,
    not_released: AtomicU64,
    mismatch: AtomicU64,
    op_errors: AtomicU64,
    any_violation: AtomicBool,
    first_violation: Mutex<Option<String>>,
    rss_peak: AtomicU64,
    walks: AtomicU64,
    walks_ok: AtomicU64,
    cache_hits: AtomicU64,
    view_reads: AtomicU64,
    view_reads_ok: AtomicU64,
    shootdowns: AtomicU64,
    maps: AtomicU64,
    unmaps: AtomicU64,
    faults: AtomicU64,
    protects: AtomicU64,
    churns: AtomicU64,
    scans: AtomicU64,
    /// Per mutator: the guest address of the 2 MiB block it churns now, or
    /// [`NO_BLOCK`].
    hot: Vec<AtomicU64>,
    /// Per mutator: the block the scanner is inside a map of, or
    /// [`NO_BLOCK`].
    scanning: Vec<AtomicU64>,
}

impl Shared {
    fn note(&self, what: impl FnOnce() -> String) {
        if !self.any_violation.swap(true, Ordering::Relaxed) {
            let mut f = self
                .first_violation
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            f.get_or_insert_with(what);
        }
    }
    fn stale(&self, what: impl FnOnce() -> String) {
        self.stale.fetch_add(1, Ordering::Relaxed);
        self.note(|| format!("stale translation: {}", what()));
    }
    fn view_stale(&self, what: impl FnOnce() -> String) {
        self.view_stale.fetch_add(1, Ordering::Relaxed);
        self.stale(|| format!("through the vm-memory view: {}", what()));
    }
    fn not_released(&self, gpa: u64, n: u64, resident: u64) {
        self.not_released.fetch_add(1, Ordering::Relaxed);
        self.note(|| {
            format!("not released: {resident} bytes of {gpa:#x}+{n:#x} resident after its unmap")
        });
    }
    fn mismatch(&self, what: impl FnOnce() -> String) {
        self.mismatch.fetch_add(1, Ordering::Relaxed);
        self.note(|| format!("oracle mismatch: {}", what()));
    }
    fn op_error(&self, what: &str, e: &dyn Display) {
        self.op_errors.fetch_add(1, Ordering::Relaxed);
        self.note(|| format!("{what} failed: {e}"));
    }
    /// Finish a gather, counting an error.
    fn finish(&self, g: Gather<'_>, what: &str) {
        if let Err(e) = g.finish() {
            self.op_error(&format!("{what}: gather flush"), &e);
        }
    }
}

/// Check one walker translation of `gpa`: it must point at one of the
/// page's banks, and the page there must carry the page's stamp (a
/// released page reads zero).
fn check_read(sh: &Shared, gpa: u64, hva: u64) {
    let (gp, hp) = (gpa & !(PAGE - 1), hva & !(PAGE - 1));
    match sh.geo.read_stamp(hp, gp) {
        Some((s, _)) if s == stamp_of(gp) => {}
        Some((s, gen)) => sh.stale(|| {
            format!("walker read {s:#x} (generation {gen}) for {gp:#x} at {hp:#x}; released?")
        }),
        None => sh.stale(|| format!("walker translated {gp:#x} to {hp:#x}, not its backing")),
    }
}

/// Read the `n` pages from `gpa` (page aligned, inside the range) through
/// the vm-memory view: with `whole`, `get_slices` over all of them, each
/// slice checked to point at its pages' backing and each page's stamp
/// read through the slice; else `read_slice` of the first page's stamp.
/// Returns whether every page was mapped and read through.
fn read_via_view(sh: &Shared, mem: &GuestMemoryView<'_>, gpa: u64, n: u64, whole: bool) -> bool {
    if !whole {
        let mut b = [0u8; 16];
        if mem.read_slice(&mut b, GuestAddress(gpa)).is_err() {
            return false;
        }
        let (s, gen) = split_stamp(b);
        if s != stamp_of(gpa) {
            sh.view_stale(|| {
                format!("read_slice of {gpa:#x} read {s:#x} (generation {gen}); released?")
            });
        }
        return true;
    }
    let Ok(slices) = mem.get_slices(GuestAddress(gpa), (n * PAGE) as usize, Permissions::Read)
    else {
        return false;
    };
    let mut at = gpa;
    for r in slices {
        let Ok(slice) = r else {
            return false;
        };
        let host = slice.ptr_guard().as_ptr() as u64;
        let len = slice.len() as u64;
        for off in (0..len).step_by(PAGE as usize) {
            let (gp, hp) = (at + off, host + off);
            if !sh.geo.backs(hp, gp) {
                sh.view_stale(|| format!("a slice for {gp:#x} points at {hp:#x}, not its backing"));
                continue;
            }
            let stamp = slice.read_obj::<[u64; 2]>(off as usize);
            match stamp {
                Ok([s, _]) if s == stamp_of(gp) => {}
                Ok([s, gen]) => sh.view_stale(|| {
                    format!(
                        "a slice of {gp:#x} at {hp:#x} read {s:#x} (generation {gen}); released?"
                    )
                }),
                Err(e) => sh.view_stale(|| format!("a slice of {gp:#x} could not be read: {e}")),
            }
        }
        at += len;
    }
    at == gpa + n * PAGE
}

/// A page's stamp (guest address, generation) from its first 16 bytes.
fn split_stamp(b: [u8; 16]) -> (u64, u64) {
    let mut s = [0u8; 8];
    let mut g = [0u8; 8];
    s.copy_from_slice(&b[..8]);
    g.copy_from_slice(&b[8..]);
    (u64::from_ne_bytes(s), u64::from_ne_bytes(g))
}

fn walker_thread(sh: &Shared, table: &Arc<Stage2Table>, w: usize) {
    let mut walker = table.walker();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1));
    let pages = sh.geo.len / PAGE;
    let ws_len = (CACHE_SLOTS as u64).min(pages);
    let mut ws = rng.below(pages - ws_len + 1);
    let (mut walks, mut ok) = (0u64, 0u64);
    let (mut view_reads, mut view_ok) = (0u64, 0u64);
    let mut pins = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        pins += 1;
        if pins.is_multiple_of(WORKING_SET_PINS) {
            ws = rng.below(pages - ws_len + 1);
        }
        // One read section in four: random pages; one: the last pages of
        // a block being churned (walks through its leaf table, or a GiB
        // churn's level-2 page); the rest: the working set.
        let hot = sh.hot[(pins / 4) as usize % sh.hot.len()].load(Ordering::Relaxed);
        let (random, first) = match pins % 4 {
            0 => (true, 0),
            1 if hot != NO_BLOCK => (false, (hot + TWO_M) / PAGE - ws_len),
            _ => (false, ws),
        };
        // A GiB churn's block (`Mutator::churn_gib`) has simulated backing:
        // its translations are checked, never read through.
        let simulated = !random && first * PAGE >= sh.gib_churn;
        let g = walker.pin();
        // Every other read section (at random): through the vm-memory view.
        let view = (!simulated && rng.below(2) == 0).then(|| g.memory());
        for i in 0..ws_len {
            let page = if random { rng.below(pages) } else { first + i };
            walks += 1;
            if let Some(mem) = &view {
                let n = 1 + rng.below(3).min(pages - 1 - page);
                let whole = rng.below(2) == 0;
                view_reads += 1;
                view_ok += u64::from(read_via_view(sh, mem, page * PAGE, n, whole));
                continue;
            }
            let gpa = page * PAGE + (rng.below(PAGE / 8) * 8);
            match g.translate(Gpa(gpa), Access::Read) {
                Ok(t) => {
                    ok += 1;
                    if !simulated {
                        check_read(sh, gpa, t.hva.0);
                    } else if t.hva.0 != sh.geo.hva(0, gpa) {
                        let h = t.hva.0;
                        sh.stale(|| {
                            format!("walker translated {gpa:#x} to {h:#x}, not its backing")
                        });
                    }
                }
                // Counted by the table (with scans and queries); described here.
                Err(WalkError::UseAfterFree(_)) => {
                    sh.note(|| format!("walker read a freed table page translating {gpa:#x}"))
                }
                Err(_) => {}
            }
        }
        drop(g);
    }
    let st = walker.stats();
    sh.walks.fetch_add(walks, Ordering::Relaxed);
    sh.walks_ok.fetch_add(ok + view_ok, Ordering::Relaxed);
    sh.view_reads.fetch_add(view_reads, Ordering::Relaxed);
    sh.view_reads_ok.fetch_add(view_ok, Ordering::Relaxed);
    sh.cache_hits.fetch_add(st.cache_hits, Ordering::Relaxed);
    sh.shootdowns.fetch_add(st.shootdowns, Ordering::Relaxed);
}

/// Keeps asking `map` for the blocks being churned plus the page after
/// each (the *sentinel*, kept in use meanwhile). The churn keeps all but
/// the block's last page unmapped, so the map's pinned check for a used
/// page walks the block's leaf table through 511 empty entries, while the
/// churn unlinks and retires that table, and always ends refused
/// (`AlreadyMapped`: the last page, or the sentinel): it changes nothing.
fn scanner_thread(sh: &Shared, table: &Arc<Stage2Table>) {
    /// Drops every claim even if the scanner panics, so that no churn
    /// waits for it forever.
    struct Claims<'a>(&'a [AtomicU64]);
    impl Drop for Claims<'_> {
        fn drop(&mut self) {
            self.0
                .iter()
                .for_each(|c| c.store(NO_BLOCK, Ordering::SeqCst));
        }
    }
    let _claims = Claims(&sh.scanning);
    let mut scans = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        let mut any = false;
        for (hot, scanning) in sh.hot.iter().zip(&sh.scanning) {
            let b = hot.load(Ordering::SeqCst);
            if b == NO_BLOCK {
                continue;
            }
            any = true;
            // Claim the block, then make sure it is still being churned:
            // the churn clears `hot` and then waits while we hold a claim.
            scanning.store(b, Ordering::SeqCst);
            if hot.load(Ordering::SeqCst) == b {
                let hva = sh.geo.hva(0, b);
                match table.map(Gpa(b), Hva(hva), TWO_M + PAGE, Perms::RW, PageSize::Size4K) {
                    Err(MapError::AlreadyMapped(_)) => {}
                    Ok(()) => sh.op_error(
                        "scanner",
                        &format!("map of the churned block {b:#x} succeeded (sentinel gone?)"),
                    ),
                    Err(e) => sh.op_error("scanner map", &e),
                }
                scans += 1;
            }
            scanning.store(NO_BLOCK, Ordering::SeqCst);
        }
        if !any {
            // Woken by a mutator that starts a churn, or by the end.
            std::thread::park();
        }
    }
    sh.scans.fetch_add(scans, Ordering::Relaxed);
}

struct Mutator<'a> {
    sh: &'a Shared,
    table: &'a Arc<Stage2Table>,
    scanner: Thread,
    m: usize,
    lo: u64,
    st: Vec<Slot>,
    bank: Vec<u8>,
    gen: u64,
    rng: Rng,
    walker: Walker,
    maps: u64,
    unmaps: u64,
    faults: u64,
    protects: u64,
    churns: u64,
}

impl Mutator<'_> {
    fn idx(&self, gpa: u64) -> usize {
        ((gpa - self.lo) / PAGE) as usize
    }

    /// Check a translation of `gpa` (page aligned) that the oracle says
    /// is mapped in `bank`; with `gen`, also the generation stamped.
    fn check_mapped(sh: &Shared, g: &WalkGuard<'_>, gpa: u64, bank: u8, gen: Option<u64>) {
        let want = sh.geo.hva(bank, gpa);
        match g.translate(Gpa(gpa), Access::Read) {
            Ok(t) if t.hva.0 == want => match sh.geo.read_stamp(want, gpa) {
                Some((s, gn)) if s == stamp_of(gpa) && gen.is_none_or(|x| x == gn) => {}
                x => sh.stale(|| format!("{gpa:#x} mapped at {want:#x} reads {x:?}")),
            },
            r => sh.stale(|| format!("{gpa:#x} is mapped at {want:#x}, the walk says {r:?}")),
        }
    }

    /// Translate every page of `[gpa, gpa + n)` through the walker (filling
    /// its cache) and check it against the oracle.
    fn check_run(&mut self, gpa: u64, n: u64) {
        let sh = self.sh;
        let first = self.idx(gpa);
        let g = self.walker.pin();
        for i in 0..(n / PAGE) as usize {
            let a = gpa + i as u64 * PAGE;
            match self.st[first + i] {
                Slot::Mapped => Self::check_mapped(sh, &g, a, self.bank[first + i], None),
                Slot::Discarded => match g.translate(Gpa(a), Access::Read) {
                    Err(WalkError::Discarded(_)) => {}
                    r => sh.stale(|| format!("{a:#x} is discarded, the walk says {r:?}")),
                },
                Slot::Unmapped => match g.translate(Gpa(a), Access::Read) {
                    Err(WalkError::NotMapped(_)) => {}
                    r => sh.stale(|| format!("{a:#x} is unmapped, the walk says {r:?}")),
                },
            }
        }
    }

    /// After an unmap of every `step`-th page of `[gpa, gpa + n)` returned:
    /// no new walk (cached or not) translates them, and neither bank of
    /// them is resident.
    fn check_gone(&mut self, gpa: u64, n: u64, step: u64) {
        let sh = self.sh;
        {
            let g = self.walker.pin();
            let mem = g.memory();
            for a in (gpa..gpa + n).step_by(step as usize) {
                if let Ok(t) = g.translate(Gpa(a), Access::Read) {
                    sh.stale(|| format!("{a:#x} still translates to {} after its unmap", t.hva));
                }
                if mem.check_range(GuestAddress(a), PAGE as usize, Permissions::No) {
                    sh.view_stale(|| format!("{a:#x} is still in the view after its unmap"));
                }
            }
        }
        // One mincore per bank for a whole run, one per page otherwise.
        let (stride, len) = if step == PAGE { (n, n) } else { (step, PAGE) };
        for a in (gpa..gpa + n).step_by(stride as usize) {
            let r = sh.geo.resident(a, len);
            if r != 0 {
                sh.not_released(a, len, r);
            }
        }
    }

    fn set(&mut self, gpa: u64, n: u64, s: Slot, bank: Option<u8>) {
        let first = self.idx(gpa);
        let last = first + (n / PAGE) as usize;
        self.st[first..last].iter_mut().for_each(|x| *x = s);
        if let Some(b) = bank {
            self.bank[first..last].iter_mut().for_each(|x| *x = b);
        }
    }

    /// Stamp and map `[gpa, gpa + n)` (unmapped) into a random bank, then
    /// read the new stamps back through the walker.
    fn map(&mut self, gpa: u64, n: u64, leaf: PageSize) -> bool {
        let sh = self.sh;
        let bank = (self.rng.below(2)) as u8;
        self.gen += 1;
        sh.geo.stamp(bank, gpa, n, self.gen);
        self.maps += 1;
        let hva = sh.geo.hva(bank, gpa);
        if let Err(e) = self.table.map(Gpa(gpa), Hva(hva), n, Perms::RW, leaf) {
            sh.op_error(&format!("map {gpa:#x}+{n:#x}"), &e);
            return false;
        }
        self.set(gpa, n, Slot::Mapped, Some(bank));
        let g = self.walker.pin();
        for a in [gpa, gpa + n - PAGE] {
            Self::check_mapped(sh, &g, a, bank, Some(self.gen));
        }
        true
    }

    /// Unmap `[gpa, gpa + n)` (every page mapped or discarded) in one gather.
    fn unmap(&mut self, gpa: u64, n: u64, mode: UnmapMode) -> bool {
        let sh = self.sh;
        self.check_run(gpa, n);
        let mut g = self.table.gather();
        let r = self.table.unmap(&mut g, Gpa(gpa), n, mode);
        sh.finish(g, "unmap");
        self.unmaps += 1;
        if let Err(e) = r {
            sh.op_error(&format!("unmap {gpa:#x}+{n:#x} ({mode:?})"), &e);
            return false;
        }
        let to = if mode == UnmapMode::Discard {
            Slot::Discarded
        } else {
            Slot::Unmapped
        };
        self.set(gpa, n, to, None);
        self.check_gone(gpa, n, PAGE);
        true
    }

    /// Every other page of `[gpa, gpa + n)` in one gather, so the release
    /// runs cannot coalesce and the batches fill.
    fn checkerboard(&mut self, gpa: u64, n: u64) {
        let sh = self.sh;
        self.check_run(gpa, n);
        let mut g = self.table.gather();
        let mut err = None;
        for a in (gpa..gpa + n).step_by(2 * PAGE as usize) {
            if let Err(e) = self.table.unmap(&mut g, Gpa(a), PAGE, UnmapMode::Discard) {
                err.get_or_insert(e);
            }
        }
        sh.finish(g, "checkerboard unmap");
        self.unmaps += 1;
        if let Some(e) = err {
            sh.op_error(&format!("checkerboard unmap in {gpa:#x}+{n:#x}"), &e);
            return;
        }
        for a in (gpa..gpa + n).step_by(2 * PAGE as usize) {
            self.set(a, PAGE, Slot::Discarded, None);
        }
        self.check_gone(gpa, n, 2 * PAGE);
    }

    /// Fault the discarded page at `gpa` back in, its whole leaf restamped.
    fn fault(&mut self, gpa: u64) {
        let sh = self.sh;
        let (hva, size) = match self.table.query(Gpa(gpa)) {
            PageState::Discarded { hva, size } => (hva.0, size.bytes()),
            s => {
                return sh.mismatch(|| format!("{gpa:#x} is discarded, the table says {s:?}"));
            }
        };
        let leaf = gpa & !(size - 1);
        let bank = self.bank[self.idx(gpa)];
        if hva != sh.geo.hva(bank, gpa) {
            return sh.mismatch(|| format!("{gpa:#x} discarded at {hva:#x}, not in bank {bank}"));
        }
        // The leaf never crosses slices: slices are 2 MiB aligned.
        self.gen += 1;
        sh.geo.stamp(bank, leaf, size, self.gen);
        self.faults += 1;
        match self.table.fault_in(Gpa(gpa)) {
            Ok(FaultOutcome::Restored { leaf_gpa, .. }) if leaf_gpa.0 == leaf => {
                self.set(leaf, size, Slot::Mapped, None);
                let g = self.walker.pin();
                Self::check_mapped(sh, &g, gpa, bank, Some(self.gen));
            }
            Ok(o) => sh.mismatch(|| format!("fault at {gpa:#x} (leaf {leaf:#x}): {o:?}")),
            Err(e) => sh.op_error(&format!("fault-in {gpa:#x}"), &e),
        }
    }

    fn protect(&mut self, gpa: u64, n: u64) {
        let sh = self.sh;
        let perms = if self.rng.below(2) == 0 {
            Perms::R
        } else {
            Perms::RW
        };
        let mut g = self.table.gather();
        if let Err(e) = self.table.protect(&mut g, Gpa(gpa), n, perms) {
            sh.op_error(&format!("protect {gpa:#x}+{n:#x}"), &e);
        }
        sh.finish(g, "protect");
        self.protects += 1;
    }

    /// Churn the 2 MiB block at `b` (not the slice's last): keep the page
    /// after it (the scanner's sentinel) in use, clear the block, then map
    /// its last page with a 4 KiB leaf (a fresh leaf table), discard it and
    /// remove it, [`CHURN_CYCLES`] times, while the scanner walks the leaf
    /// table. The remove clears only a marker: its flush invalidates
    /// nothing and so waits for no grace period, and the leaf table it
    /// unlinks must outlive any reader inside it (deferred free).
    fn churn(&mut self, b: u64) {
        let sh = self.sh;
        let sentinel = b + TWO_M;
        if self.st[self.idx(sentinel)] == Slot::Unmapped
            && !self.map(sentinel, PAGE, PageSize::Size4K)
        {
            return;
        }
        if self.st[self.idx(b)..self.idx(b + TWO_M)]
            .iter()
            .any(|&s| s != Slot::Unmapped)
        {
            self.check_run(b, TWO_M);
            let mut g = self.table.gather();
            let r = self
                .table
                .unmap_existing(&mut g, Gpa(b), TWO_M, UnmapMode::Remove);
            sh.finish(g, "churn clear");
            self.unmaps += 1;
            if let Err(e) = r {
                return sh.op_error(&format!("churn clear {b:#x}"), &e);
            }
            self.set(b, TWO_M, Slot::Unmapped, None);
            self.check_gone(b, TWO_M, PAGE);
        }
        sh.hot[self.m].store(b, Ordering::SeqCst);
        self.scanner.unpark();
        let last = b + TWO_M - PAGE;
        for _ in 0..CHURN_CYCLES {
            if !self.map(last, PAGE, PageSize::Size4K)
                || !self.unmap(last, PAGE, UnmapMode::Discard)
            {
                break;
            }
            // Remove while the scanner is running, inside a map of this
            // block: its scans overlap the removal instead of missing it
            // because it is not scheduled.
            while sh.scanning[self.m].load(Ordering::SeqCst) != b
                && !sh.stop.load(Ordering::Relaxed)
            {
                std::thread::yield_now();
            }
            if !self.unmap(last, PAGE, UnmapMode::Remove) {
                break;
            }
            self.churns += 1;
        }
        sh.hot[self.m].store(NO_BLOCK, Ordering::SeqCst);
        // The scanner may be inside a map of [b, sentinel]: the sentinel
        // must stay in use until it is out.
        while sh.scanning[self.m].load(Ordering::SeqCst) == b {
            std::thread::yield_now();
        }
    }

    /// Churn a level-2 table page: as [`Mutator::churn`], but the block
    /// is the last 2 MiB of a GiB where nothing else is mapped, and its
    /// sentinel the first page of the next GiB. So each remove empties
    /// the block's leaf page (which stays in the leaf arena) and the GiB's
    /// level-2 page, which is unlinked and retired in a flush that waits
    /// for no grace period, while the scanner walks it: only deferred
    /// freeing keeps it alive for readers still inside it. (Leaf pages
    /// are never freed, so [`Mutator::churn`] no longer tests that.)
    fn churn_gib(&mut self) {
        let sh = self.sh;
        let b = sh.gib_churn + (2 * self.m as u64 + 1) * GIB - TWO_M;
        let sentinel = b + TWO_M;
        let map = |gpa: u64| {
            self.table.map(
                Gpa(gpa),
                Hva(sh.geo.hva(0, gpa)),
                PAGE,
                Perms::RW,
                PageSize::Size4K,
            )
        };
        let unmap = |gpa: u64, mode: UnmapMode| {
            let mut g = self.table.gather();
            let r = self.table.unmap_existing(&mut g, Gpa(gpa), PAGE, mode);
            sh.finish(g, "GiB churn");
            r
        };
        if let Err(e) = map(sentinel) {
            return sh.op_error("GiB churn: map of the sentinel", &e);
        }
        sh.hot[self.m].store(b, Ordering::SeqCst);
        self.scanner.unpark();
        let last = sentinel - PAGE;
        for _ in 0..CHURN_CYCLES {
            if let Err(e) = map(last) {
                sh.op_error("GiB churn: map", &e);
                break;
            }
            if let Err(e) = unmap(last, UnmapMode::Discard) {
                sh.op_error("GiB churn: discard", &e);
                break;
            }
            while sh.scanning[self.m].load(Ordering::SeqCst) != b
                && !sh.stop.load(Ordering::Relaxed)
            {
                std::thread::yield_now();
            }
            if let Err(e) = unmap(last, UnmapMode::Remove) {
                sh.op_error("GiB churn: remove", &e);
                break;
            }
            self.churns += 1;
        }
        sh.hot[self.m].store(NO_BLOCK, Ordering::SeqCst);
        while sh.scanning[self.m].load(Ordering::SeqCst) == b {
            std::thread::yield_now();
        }
        // Leave the GiBs empty, as found: a later churn starts the same.
        let mut g = self.table.gather();
        let r = self
            .table
            .unmap_existing(&mut g, Gpa(last), TWO_M, UnmapMode::Remove);
        sh.finish(g, "GiB churn: clean-up");
        if let Err(e) = r {
            sh.op_error("GiB churn: clean-up", &e);
        }
    }

    fn run(&mut self, slice: u64) {
        let sh = self.sh;
        let npages = (slice / PAGE) as usize;
        let mut iter = 0u64;
        while !sh.stop.load(Ordering::Relaxed) {
            iter += 1;
            if self.m == 0 && iter.is_multiple_of(64) {
                sh.rss_peak.fetch_max(rss_bytes(), Ordering::Relaxed);
            }
            if slice > TWO_M && self.rng.below(8) == 0 {
                // Any block but the last: its sentinel is in the slice.
                let b = self.lo + self.rng.below(slice / TWO_M - 1) * TWO_M;
                if self.rng.below(2) == 0 {
                    self.churn(b);
                } else {
                    self.churn_gib();
                }
                continue;
            }
            let p = self.rng.below(npages as u64) as usize;
            // A run of same-state pages from p, of random length.
            let want = match self.rng.below(4) {
                0 => 1,
                1 => 1 + self.rng.below(16) as usize,
                2 => 512,
                _ => 1 + self.rng.below(2048) as usize,
            };
            let s0 = self.st[p];
            let mut q = p;
            while q < npages
                && q - p < want
                && (self.st[q] == s0 || (s0 != Slot::Unmapped && self.st[q] != Slot::Unmapped))
            {
                q += 1;
            }
            let gpa = self.lo + p as u64 * PAGE;
            let n = (q - p) as u64 * PAGE;
            match s0 {
                Slot::Unmapped => {
                    let leaf = if self.rng.below(2) == 0 {
                        PageSize::Size2M
                    } else {
                        PageSize::Size4K
                    };
                    self.map(gpa, n, leaf);
                }
                Slot::Discarded if self.rng.below(2) == 0 => self.fault(gpa),
                _ if self.rng.below(8) == 0 => self.protect(gpa, n),
                _ if q - p >= 16 && self.rng.below(4) == 0 => self.checkerboard(gpa, n),
                _ => {
                    let mode = if self.rng.below(2) == 0 {
                        UnmapMode::Discard
                    } else {
                        UnmapMode::Remove
                    };
                    self.unmap(gpa, n, mode);
                }
            }
        }
        // Final oracle check of the whole slice.
        for i in 0..npages {
            let gpa = self.lo + i as u64 * PAGE;
            let hva = sh.geo.hva(self.bank[i], gpa);
            let got = self.table.query(Gpa(gpa));
            let ok = match (self.st[i], got) {
                (Slot::Unmapped, PageState::Unmapped) => true,
                (Slot::Mapped, PageState::Present { hva: h, .. })
                | (Slot::Discarded, PageState::Discarded { hva: h, .. }) => h.0 == hva,
                _ => false,
            };
            if !ok {
                let s = self.st[i];
                sh.mismatch(|| format!("{gpa:#x}: oracle {s:?} at {hva:#x}, table {got:?}"));
            }
        }
        sh.maps.fetch_add(self.maps, Ordering::Relaxed);
        sh.unmaps.fetch_add(self.unmaps, Ordering::Relaxed);
        sh.faults.fetch_add(self.faults, Ordering::Relaxed);
        sh.protects.fetch_add(self.protects, Ordering::Relaxed);
        sh.churns.fetch_add(self.churns, Ordering::Relaxed);
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Run the stress test.
pub fn run(cfg: &StressConfig) -> Result<StressReport, StressError> {
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
    // Two banks, over-mapped by 2 MiB so they can be 2 MiB aligned (huge
    // leaves). Only what is mapped in the table is ever resident.
    let host_len = 2 * len;
    // SAFETY: anonymous private mapping, checked below.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            (host_len + TWO_M) as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(StressError::Mmap(host_len, std::io::Error::last_os_error()));
    }
    let region = Region {
        base: raw as u64,
        len: host_len + TWO_M,
    };
    let base = (region.base + TWO_M - 1) & !(TWO_M - 1);
    // No transparent huge pages: stamping one page of a bank must not make
    // its released neighbours resident again (both banks are checked).
    // SAFETY: inside the mapping just made; advice only.
    unsafe {
        libc::madvise(
            base as *mut libc::c_void,
            host_len as usize,
            libc::MADV_NOHUGEPAGE,
        )
    };
    let geo = Geo { base, len };
    let table = Stage2Table::new(TableConfig {
        yield_entries: cfg.yield_entries,
        ..TableConfig::default()
    })
    .map_err(|e| StressError::Table(e.to_string()))?;
    table
        .register_backing(BackingRegion {
            hva: Hva(base),
            len: host_len,
            kind: BackingKind::Anonymous,
        })
        .map_err(|e| StressError::Table(e.to_string()))?;
    if cfg.fail_batch_every > 0 {
        table.faults.batch_alloc.fail_every(cfg.fail_batch_every);
    }
    // The GiB churns' guest memory: two GiB per mutator past both banks,
    // simulated (never touched: the churn maps one page at a time and
    // only the scanner's refused maps walk it).
    let gib_churn = (host_len + GIB - 1) & !(GIB - 1);
    table
        .register_backing(BackingRegion {
            hva: Hva(base + gib_churn),
            len: 2 * GIB * cfg.mutators.max(1) as u64,
            kind: BackingKind::Simulated { hook: None },
        })
        .map_err(|e| StressError::Table(e.to_string()))?;
    // Start fully mapped in bank 0 (2 MiB leaves where possible), stamped
    // with generation 0.
    geo.stamp(0, 0, len, 0);
    table
        .map(Gpa(0), Hva(base), len, Perms::RW, PageSize::Size2M)
        .map_err(|e| StressError::Table(e.to_string()))?;

    let sh = Arc::new(Shared {
        geo,
        gib_churn,
        stop: AtomicBool::new(false),
        stale: AtomicU64::new(0),
        view_stale: AtomicU64::new(0),
        not_released: AtomicU64::new(0),
        mismatch: AtomicU64::new(0),
        op_errors: AtomicU64::new(0),
        any_violation: AtomicBool::new(false),
        first_violation: Mutex::new(None),
        rss_peak: AtomicU64::new(rss_bytes()),
        walks: AtomicU64::new(0),
        walks_ok: AtomicU64::new(0),
        cache_hits: AtomicU64::new(0),
        view_reads: AtomicU64::new(0),
        view_reads_ok: AtomicU64::new(0),
        shootdowns: AtomicU64::new(0),
        maps: AtomicU64::new(0),
        unmaps: AtomicU64::new(0),
        faults: AtomicU64::new(0),
        protects: AtomicU64::new(0),
        churns: AtomicU64::new(0),
        scans: AtomicU64::new(0),
        hot: (0..cfg.mutators)
            .map(|_| AtomicU64::new(NO_BLOCK))
            .collect(),
        scanning: (0..cfg.mutators)
            .map(|_| AtomicU64::new(NO_BLOCK))
            .collect(),
    });

    let mut handles = Vec::new();
    let scanner = {
        let (sh, table) = (sh.clone(), table.clone());
        std::thread::spawn(move || scanner_thread(&sh, &table))
    };
    let scanner_thread_handle = scanner.thread().clone();
    handles.push(scanner);
    for w in 0..cfg.walkers {
        let (sh, table) = (sh.clone(), table.clone());
        handles.push(std::thread::spawn(move || walker_thread(&sh, &table, w)));
    }
    for m in 0..cfg.mutators {
        let (sh, table) = (sh.clone(), table.clone());
        let scanner = scanner_thread_handle.clone();
        handles.push(std::thread::spawn(move || {
            let npages = (slice / PAGE) as usize;
            let mut mu = Mutator {
                sh: &sh,
                table: &table,
                scanner,
                m,
                lo: m as u64 * slice,
                st: vec![Slot::Mapped; npages],
                bank: vec![0; npages],
                gen: 0,
                rng: Rng(0xdead_beef_cafe_f00d ^ (m as u64 + 7) << 20),
                walker: table.walker(),
                maps: 0,
                unmaps: 0,
                faults: 0,
                protects: 0,
                churns: 0,
            };
            mu.run(slice);
        }));
    }
    // The run's length, not a wait for some state: the threads run until
    // told to stop.
    std::thread::sleep(cfg.duration);
    sh.stop.store(true, Ordering::Relaxed);
    scanner_thread_handle.unpark();
    let mut thread_panics = 0u64;
    for h in handles {
        if let Err(p) = h.join() {
            thread_panics += 1;
            let msg = panic_message(&*p);
            sh.note(|| format!("a stress thread panicked: {msg}"));
        }
    }
    let during = table.stats();
    // Teardown through a full-mm gather, then wait for the table pages.
    let mut g = table.gather_full_mm();
    table
        .teardown(&mut g)
        .map_err(|e| StressError::Table(e.to_string()))?;
    sh.finish(g, "teardown");
    table.rcu_barrier();
    let end = table.stats();
    if end.use_after_free > 0 {
        sh.note(|| {
            format!(
                "{} reads of freed table pages (walks, scans or queries)",
                end.use_after_free
            )
        });
    }
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let report = StressReport {
        walks: l(&sh.walks),
        walks_ok: l(&sh.walks_ok),
        cache_hits: l(&sh.cache_hits),
        view_reads: l(&sh.view_reads),
        view_reads_ok: l(&sh.view_reads_ok),
        view_stale_reads: l(&sh.view_stale),
        shootdowns: l(&sh.shootdowns),
        maps: l(&sh.maps),
        unmaps: l(&sh.unmaps),
        faults: l(&sh.faults),
        protects: l(&sh.protects),
        churns: l(&sh.churns),
        scans: l(&sh.scans),
        flushes: end.flushes,
        fallback_batches: end.fallback_batches,
        grace_periods: end.grace_periods,
        splits: end.splits,
        released_bytes: end.released_bytes,
        max_lock_hold_us: during.lock_hold_max_ns as f64 / 1000.0,
        // Every walk, query and scan that read poison, counted by the table.
        use_after_free: end.use_after_free,
        stale_translations: l(&sh.stale),
        not_released: l(&sh.not_released),
        oracle_mismatch: l(&sh.mismatch),
        op_errors: l(&sh.op_errors),
        thread_panics,
        first_violation: sh
            .first_violation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        rss_start_bytes: rss_start,
        rss_peak_bytes: l(&sh.rss_peak),
        rss_end_bytes: rss_bytes(),
        region_resident_end_bytes: resident_bytes(base, host_len),
        table_pages_end: end.table_pages,
    };
    drop(table);
    drop(region);
    Ok(report)
}

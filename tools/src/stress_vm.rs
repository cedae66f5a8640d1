//! `gmm stress-vm`: a real microVM under balloon churn, with device threads
//! reading guest memory through the fast walk; exits non-zero on any
//! violation.
//!
//! The guest runs [`Workload::BalloonStress`]: every vCPU writes and
//! verifies `gpa ^ seed` over its share once, then keeps rewriting and
//! verifying it (vCPUs 1..N over their whole share, vCPU 0 below its
//! balloon, a chunk between two polls of the target), counting passes and
//! bad words in the control page. vCPU 0's ring-3 virtio-balloon driver
//! follows the target the host sets, inflating and deflating at most
//! `MAX_PFNS` pages (64 MiB) per request, going down from the end of its
//! share (each request is one gather: clear, invalidate, grace period,
//! release); after a deflate it rewrites and verifies the pages that came
//! back (each first touch faults in through the userfaultfd handler).
//!
//! The controller thread alternates, until `--seconds` have passed: set
//! the target to a random number of pages (between a quarter of and
//! `--max-fraction` of vCPU 0's share), wait for the driver to report it,
//! hold; set it to 0, wait, hold; have the driver report a random number
//! of pages below the empty balloon as free (free page reporting: the
//! device discards them through the gather, in chunks going down, and the
//! driver writes and verifies them again), wait, hold (unless
//! `--no-report-free`). That is one *cycle*. A sampler thread reads the
//! process RSS every 10 ms.
//!
//! **The device threads** (`--device-threads`) loop over *read sections*
//! (one [`guest_mm::Walker`] pin each, 100 µs apart, back to back while
//! a thread waits at an inflate's front for its chunk). A section holds:
//!
//! - a *window* of 64 consecutive pages (one per slot of the walker's
//!   direct-mapped translation cache). While a release is in flight (an
//!   inflate's or a free page report's pages), a binary search with table
//!   walks finds its *front* (the lowest page from which on nothing is
//!   present) and the window is the bottom (even threads) or the top (odd
//!   threads) of the next chunk the driver will send; it is kept, section
//!   after section, until its pages are gone. Otherwise a random run of the
//!   balloonable range, kept for 8 sections;
//! - 16 random pages (half in the part of vCPU 0's share the balloon may
//!   take, half anywhere in workload RAM).
//!
//! Each page is translated (through the cache) and **copied out at once**,
//! word by word with atomic loads, and checked against the pattern. Then
//! everything held is copied and checked again, with no pause: 3 more
//! times, or, for a window at a front, until a table walk sees the window
//! cleared and for 500 µs more (at most 2 ms if nothing is cleared). With
//! the grace period, the gather that cleared the window waits for the
//! section before it releases anything; without it, the release (which
//! zeroes anonymous memory, and a later touch faults in the handler's zero
//! page) runs under the reader. Kept windows are translated again in the
//! next section, so a cache that outlives an invalidation answers for
//! released pages and the copies read their zeros.
//!
//! **The shadow.** Before each change (new target, free page report) the
//! controller publishes whether it only inflates and which pages it
//! releases, and makes `epoch` odd; once the driver reported the change
//! done (it writes the new size only after the device returned its buffer,
//! i.e. after the gather released the pages, and after a deflate or a
//! report only once it rewrote every page that came back) it publishes the
//! first ballooned GPA and makes `epoch` even again. A device thread reads
//! `epoch` before it pins and after it unpins: a section whose two reads
//! are equal and even ran inside one stable state, equal and odd inside
//! one change. Counted:
//!
//! - `stale_released`: a translation succeeded for a page the balloon had
//!   taken (its entry was released before the section began);
//! - `stale_data`: a page copied through a translation did not hold the
//!   guest's pattern: a word that is neither the pattern nor zero; a zero
//!   word, except in the balloonable range during a deflate or a report (a
//!   page that just came back reads zero until the guest rewrote it), since
//!   in stable states and during inflates a page translated inside a read
//!   section cannot have been released yet, and never in a page that a
//!   table walk right after its translation did not find mapped (a change
//!   starts only once the guest rewrote every page that came back, so a
//!   page is cleared holding the pattern, and its backing stays while a
//!   reader holds its translation); or, anywhere and at any time,
//!   a word that read the pattern and then something else in a later copy
//!   of the same section (`changed_under_reader`, a part of `stale_data`:
//!   the page was released under a reader that held its translation);
//! - `shadow_mismatches`: a page that must be present did not translate,
//!   or a ballooned page translated to another error (in the balloonable
//!   range: in stable states, and during inflates, where a page is present
//!   or ballooned; elsewhere always);
//! - `use_after_free`: a walk read a poisoned (freed) table page (the
//!   walker's error, and the table's own count of such lookups);
//! - `stuck_readers`: a device thread stayed inside one read section for
//!   more than 5 s. A reader never waits, so it is blocked: it faulted on
//!   released backing whose handler waits for a gather that waits for the
//!   reader. The run then stops at once (a stall), reports what the device
//!   threads counted and exits without tearing the wedged VM down.
//!
//! `stale_translations` = `stale_released + stale_data`. After the last
//! cycle the controller deflates to 0, posts `CMD_EXIT` and waits for every
//! vCPU, checks the pattern over all workload RAM from the host
//! (`final_bad_words`) and that no page is left ballooned, then destroys
//! the VM **while the device threads keep walking** (teardown gather, grace
//! period, table pages freed and poisoned, RAM unmapped): a walk that
//! succeeds must still read the pattern, and none may succeed once
//! reclamation is complete. (During teardown a page is read only if a
//! table walk in the same section confirms its translation: RAM is
//! unmapped once the teardown's barrier passed, and only a cache that
//! outlived the teardown could still answer for it. A section that began
//! before the teardown and ended after it started is judged as a teardown
//! section: the teardown may clear entries under it.)
//!
//! After each inflate the controller also checks with `mincore` that no
//! ballooned page is resident (`not_released`).
//!
//! `guest_errors` = bad words the guest found (first pass, later passes,
//! deflated pages) + balloon driver errors + vCPUs that did not end with
//! `Done`. Device and transport errors, unexplained demand faults, and a
//! driver that did not reach a target (`stalls`) are violations too.
//!
//! `front_sections` counts sections that held a window at a front,
//! `front_releases` those of them that saw their window cleared while
//! holding it: a clean run with none never held a page across its release,
//! and proves nothing about the grace period.
//!
//! Guest RAM has 4 KiB leaves by default; `--page-size 2M` also exercises
//! the splits of THP-backed leaves and whole-leaf demand faults.
//!
//! **Proven detectors.** Hidden `--inject` modes: `stale-cache` gives
//! device thread 0 a translation cache of its own that is never shot down
//! and that it reads through (a device keeping a translation across an
//! invalidation): its reads of released pages are counted
//! (`injected_stale_reads`) and caught as `stale_data` (and
//! `stale_released`); `corrupt-page` has a host thread overwrite one guest
//! word behind the guest's back every millisecond (`guest_bad_words`). In
//! a build with the test-only `mutation` feature, `GMM_BREAK_RULE` breaks
//! one guest-mm rule (the JSON's `broken_rule`): without the grace period
//! (`grace_period`) pages change under their readers
//! (`changed_under_reader`); without the cache shootdown
//! (`cache_shootdown`) walkers translate ballooned pages and read their
//! zeros (`stale_released`, `stale_data`) at 2 MiB leaves (`--page-size
//! 2M`: at 4 KiB leaves the fast walk answers every present page by one
//! live load in the leaf arena, and its translation cache holds none).

use std::io::Write as _;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicU8,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_mm::{Access, Gpa, PageState, Stage2Table, WalkError, WalkGuard};
use vmm::devices::virtio::balloon::BalloonConfig;
use vmm::guest::balloon::{DriverState, MAX_PFNS};
use vmm::guest::layout::WORKLOAD_START;
use vmm::vstate::vcpu::VcpuOutcome;
use vmm::{Backing, Console, MemSize, PageSize, Vm, VmConfig, Workload};

use crate::rng::{ms, Rng};
use crate::schema::StressVmResult;
use crate::units::human_bytes;

const PAGE: u64 = 4096;
/// Random pages a device thread translates and copies per read section
/// (half in the balloonable range, half anywhere in workload RAM).
const SCATTER: usize = 16;
/// Consecutive pages a device thread also holds per read section (one per
/// slot of the walker's translation cache, which is direct-mapped by
/// guest frame).
const WINDOW: u64 = 64;
/// Copies of each held page per read section: the first right after its
/// translation, the others after every page was taken, with no pause.
const COPIES: usize = 4;
/// Sections a window chosen at random is held before another is chosen.
const WINDOW_KEEP: u32 = 8;
/// A section holding a window at a release front keeps copying for this
/// long after it saw the window cleared (the release, without the grace
/// period, runs meanwhile)...
const HOLD_AFTER_CLEAR: Duration = Duration::from_micros(500);
/// ... and for at most this long if it sees nothing cleared.
const HOLD_MAX: Duration = Duration::from_millis(2);
/// A device thread inside one read section for longer than this is stuck.
const STUCK: Duration = Duration::from_secs(5);
/// Pause of a device thread between two read sections (not while it holds
/// an inflate's front that was not cleared yet).
const PAUSE: Duration = Duration::from_micros(100);
/// Limit for the guest's first pass and for each balloon change.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Options of `gmm stress-vm`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// How long to cycle the balloon, in seconds (fractions allowed).
    #[arg(long, default_value = "10", value_parser = crate::units::parse_seconds)]
    pub seconds: f64,
    /// Guest RAM (a multiple of 2 MiB; at least 2 MiB plus 2 MiB per vCPU).
    #[arg(long, default_value = "256M", value_parser = crate::units::parse_size)]
    pub mem: u64,
    /// vCPUs: 0 drives the balloon, the others rewrite and verify.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vcpus: u32,
    /// Device threads translating and copying guest memory.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub device_threads: u32,
    /// Guest RAM backing: anon or memfd.
    #[arg(long, default_value = "anon", value_parser = parse_backing)]
    pub backing: Backing,
    /// Guest RAM leaf size: 4K (the balloon's granularity: every page that
    /// comes back faults in on its own) or 2M.
    #[arg(long, default_value = "4K", value_parser = parse_page_size)]
    pub page_size: PageSize,
    /// Largest inflate, as a fraction of vCPU 0's share (0.05 to 0.9).
    #[arg(long, default_value_t = 0.75, value_parser = parse_fraction)]
    pub max_fraction: f64,
    /// How long each balloon size is held before the next change, ms.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub hold_ms: u64,
    /// Skip the free page report that ends each cycle.
    #[arg(long)]
    pub no_report_free: bool,
    /// Seed of the target sequence and of the device threads' addresses.
    #[arg(long, default_value_t = 0x57e5_5e5d)]
    pub seed: u64,
    /// Break something on purpose (tests of the detectors).
    #[arg(long, value_enum, hide = true)]
    pub inject: Option<Inject>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// Deliberate faults.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inject {
    /// Device thread 0 keeps translations in a cache that is never shot down.
    StaleCache,
    /// A host thread overwrites one guest word every millisecond.
    CorruptPage,
}

impl Inject {
    fn name(self) -> &'static str {
        match self {
            Inject::StaleCache => "stale-cache",
            Inject::CorruptPage => "corrupt-page",
        }
    }
}

fn parse_backing(s: &str) -> Result<Backing, String> {
    match s {
        "anon" => Ok(Backing::Anon),
        "memfd" => Ok(Backing::Memfd),
        _ => Err(format!("invalid backing {s:?}: expected anon or memfd")),
    }
}

fn parse_page_size(s: &str) -> Result<PageSize, String> {
    s.parse::<PageSize>()
        .map_err(|_| format!("invalid page size {s:?}: expected 4K or 2M"))
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("invalid fraction {s:?}: expected e.g. 0.5"))?;
    if !(0.05..=0.9).contains(&v) {
        return Err(format!("fraction {s:?} must be between 0.05 and 0.9"));
    }
    Ok(v)
}

/// Where the run is, for the device threads.
const PHASE_STRESS: u8 = 0;
const PHASE_TEARDOWN: u8 = 1;
const PHASE_RECLAIMED: u8 = 2;

/// The host-side shadow of the balloon, published by the controller.
struct Shadow {
    /// Even: stable; odd: a change is in flight.
    epoch: AtomicU64,
    /// First ballooned GPA (vCPU 0's share end when empty).
    ballooned_lo: AtomicU64,
    /// The change in flight (epoch odd) only adds pages to the balloon.
    inflating: AtomicBool,
    /// `[inflight_lo, inflight_hi)`: the pages the change in flight
    /// releases (an inflate's new pages, a free page report's pages; empty
    /// for a deflate). The driver sends them in chunks of at most
    /// `MAX_PFNS` pages going down from `inflight_hi`, one gather each.
    inflight_lo: AtomicU64,
    inflight_hi: AtomicU64,
    phase: AtomicU8,
    stop: AtomicBool,
    /// The time base of `section_start`.
    t0: Instant,
    /// Per device thread: ns since `t0` + 1 at which its current read
    /// section began (0: not in one).
    section_start: Box<[AtomicU64]>,
}

impl Shadow {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Device threads inside one read section for longer than [`STUCK`]:
    /// blocked in it (a reader never waits for anything, so this only
    /// happens when it faulted on backing it should never have reached,
    /// and the fault waits for a gather that waits for the reader).
    fn stuck_readers(&self) -> u64 {
        let now = self.now_ns();
        let limit = u64::try_from(STUCK.as_nanos()).unwrap_or(u64::MAX);
        self.section_start
            .iter()
            .filter(|s| {
                let t = s.load(SeqCst);
                t != 0 && now.saturating_sub(t - 1) > limit
            })
            .count() as u64
    }

    /// Publishes a change about to start (epoch odd).
    fn begin(&self, inflating: bool, inflight: (u64, u64)) {
        self.inflating.store(inflating, SeqCst);
        self.inflight_lo.store(inflight.0, SeqCst);
        self.inflight_hi.store(inflight.1, SeqCst);
        self.epoch.fetch_add(1, SeqCst);
    }
}

/// Fixed geometry of the run.
#[derive(Clone, Copy)]
struct Geometry {
    seed: u64,
    /// The range the balloon may take: `[bal_lo, share0_end)`.
    bal_lo: u64,
    share0_end: u64,
    /// Workload RAM end.
    mem: u64,
}

impl Geometry {
    fn balloonable(&self, gpa: u64) -> bool {
        gpa >= self.bal_lo && gpa < self.share0_end
    }
}

/// Device-thread counters (summed over threads).
#[derive(Default)]
struct WalkCounts {
    walks: AtomicU64,
    walks_ok: AtomicU64,
    ballooned: AtomicU64,
    discarded: AtomicU64,
    bytes_copied: AtomicU64,
    read_sections: AtomicU64,
    front_sections: AtomicU64,
    front_releases: AtomicU64,
    read_section_max_ns: AtomicU64,
    stable_batches: AtomicU64,
    inflate_batches: AtomicU64,
    stale_released: AtomicU64,
    stale_data: AtomicU64,
    changed_under_reader: AtomicU64,
    shadow_mismatches: AtomicU64,
    use_after_free: AtomicU64,
    teardown_walks: AtomicU64,
    teardown_walks_ok: AtomicU64,
    injected_hits: AtomicU64,
    injected_stale_reads: AtomicU64,
    first_violation: FirstViolation,
}

/// The first walk violation of the run, described.
#[derive(Default)]
struct FirstViolation(Mutex<Option<String>>);

impl FirstViolation {
    fn note(&self, what: impl FnOnce() -> String) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(what());
        }
    }

    fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// How one page of a read section went.
#[derive(Clone, Copy, Debug)]
enum Seen {
    /// Copied through a translation, [`COPIES`] times or more.
    /// `injected`: the translation came from the injected stale cache.
    /// `unmapped`: a table walk right after the translation did not give
    /// that host page (legitimate only if a gather cleared the entry in
    /// between; the page's backing, which held the pattern then, stays
    /// until we unpin).
    Copied {
        injected: bool,
        unmapped: bool,
    },
    Failed(WalkError),
    /// Translated after reclamation finished (not read).
    LateOk,
    /// During teardown, a translation that a table walk in the same
    /// section did not confirm (teardown may clear an entry after the
    /// section began; not read: the RAM behind an entry the table no
    /// longer holds may already be unmapped once the teardown's barrier
    /// passed, and only a cache that outlived it could still answer).
    Unconfirmed,
}

/// One page held in a read section.
struct Held {
    gpa: u64,
    /// The host address its copies read (used only inside the section).
    hva: u64,
    seen: Seen,
    /// Some copy read a zero word.
    zero: bool,
    /// Some copy read a word that is neither zero nor the pattern.
    other: bool,
    /// A word that read the pattern read something else in a later copy
    /// of the same section: the page was released (or written) under a
    /// reader that still held its translation.
    changed: bool,
}

/// The run of consecutive pages a device thread holds in its sections.
#[derive(Clone, Copy)]
struct Window {
    start: u64,
    pages: u64,
    /// The shadow epoch it was chosen in.
    epoch: u64,
    /// Sections it was held in.
    uses: u32,
    /// Chosen just below the front of a release in flight.
    front: bool,
    /// Some page of it was copied in the last section.
    alive: bool,
}

/// One device thread's state.
struct Device<'a> {
    geo: Geometry,
    counts: &'a WalkCounts,
    inject_stale: bool,
    /// Hold the bottom of a release front's next chunk (else its top).
    bottom: bool,
    rng: Rng,
    /// The latest copy of every held page, [`WORDS`] words each.
    buf: Vec<u64>,
    held: Vec<Held>,
    /// The injected bug's translations: host address + 1 per balloonable
    /// page (0: none), never invalidated.
    fake: Vec<u64>,
    window: Option<Window>,
    /// Copies of the held pages in this section (the first included).
    copies: u64,
    /// This section saw its front window's entries cleared while it held them.
    released_under: bool,
}

const WORDS: usize = (PAGE / 8) as usize;

/// One device thread: translate and copy pages, check them against the
/// shadow and against themselves.
fn device_thread(
    idx: u32,
    table: &Arc<Stage2Table>,
    shadow: &Shadow,
    geo: Geometry,
    counts: &WalkCounts,
    inject_stale: bool,
) {
    let mut walker = table.walker();
    let bal_pages = (geo.share0_end - geo.bal_lo) / PAGE;
    let all_pages = (geo.mem - WORKLOAD_START) / PAGE;
    let mut d = Device {
        geo,
        counts,
        inject_stale,
        bottom: idx.is_multiple_of(2),
        rng: Rng::new(geo.seed ^ (u64::from(idx) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        buf: vec![0; (WINDOW as usize + SCATTER) * WORDS],
        held: Vec::with_capacity(WINDOW as usize + SCATTER),
        fake: if inject_stale {
            vec![0; bal_pages as usize]
        } else {
            Vec::new()
        },
        window: None,
        copies: 0,
        released_under: false,
    };
    let mut scatter = [0u64; SCATTER];
    while !shadow.stop.load(SeqCst) {
        for (k, g) in scatter.iter_mut().enumerate() {
            *g = if k % 2 == 0 {
                geo.bal_lo + d.rng.below(bal_pages) * PAGE
            } else {
                WORKLOAD_START + d.rng.below(all_pages) * PAGE
            };
        }
        let e1 = shadow.epoch.load(SeqCst);
        let lo = shadow.ballooned_lo.load(SeqCst);
        let inflating = shadow.inflating.load(SeqCst);
        let inflight = (
            shadow.inflight_lo.load(SeqCst),
            shadow.inflight_hi.load(SeqCst),
        );
        d.held.clear();
        d.copies = 0;
        d.released_under = false;
        let t0 = Instant::now();
        shadow.section_start[idx as usize].store(shadow.now_ns() + 1, SeqCst);
        let phase = {
            let g = walker.pin();
            // Read inside the section: a section that still sees
            // PHASE_STRESS began before the teardown, whose barrier then
            // waits for it before guest RAM is unmapped.
            let phase = shadow.phase.load(SeqCst);
            let win = d.choose_window(&g, e1, inflight);
            for gpa in (win.0..win.0 + win.1 * PAGE).step_by(PAGE as usize) {
                d.take(&g, gpa, phase);
            }
            for &gpa in &scatter {
                d.take(&g, gpa, phase);
            }
            // Hold everything a while longer: copy it all again, with no
            // pause, while the balloon may be releasing it.
            if d.window.is_some_and(|w| w.front) && phase == PHASE_STRESS {
                d.hold_front(&g, shadow, e1);
            } else {
                for _ in 1..COPIES {
                    d.copy_all();
                }
            }
            phase
        };
        shadow.section_start[idx as usize].store(0, SeqCst);
        let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        counts.read_section_max_ns.fetch_max(ns, SeqCst);
        let e2 = shadow.epoch.load(SeqCst);
        // A section that began before the teardown and ended after it
        // started is judged as a teardown section: entries may have been
        // cleared under it (their backing still waits for it).
        let phase = phase.max(shadow.phase.load(SeqCst));
        d.account(e1, e2, lo, inflating, phase);
        // Leave the two host cores to the vCPUs part of the time, except
        // while holding an inflate's front that was not cleared yet: the
        // driver sends the next chunk at once, and a thread that is not
        // pinned when the gather clears it learns nothing. (Pinning again
        // at once does not hold a grace period up: a reader pinned after
        // it began is not waited for.)
        let waiting =
            inflating && !d.released_under && d.window.is_some_and(|w| w.front && w.alive);
        if !waiting {
            std::thread::sleep(PAUSE);
        }
    }
}

/// Whether a table walk for `gpa` now fails to give `hva`.
fn unmapped(g: &WalkGuard<'_>, gpa: u64, hva: u64) -> bool {
    g.translate_uncached(Gpa(gpa), Access::Read)
        .map(|t| t.hva.0)
        != Ok(hva)
}

impl Device<'_> {
    /// The window of this section: `(first GPA, pages)`. While a release is
    /// in flight, the pages just below its front (the next chunk the
    /// driver sends), kept until they are gone; otherwise a random run of
    /// the balloonable range, kept for [`WINDOW_KEEP`] sections. Kept
    /// windows are translated again through the walker's cache, so a
    /// cache that outlives an invalidation answers for released pages.
    fn choose_window(&mut self, g: &WalkGuard<'_>, e1: u64, inflight: (u64, u64)) -> (u64, u64) {
        if let Some(w) = &mut self.window {
            let keep = w.epoch == e1
                && if w.front {
                    w.alive
                } else {
                    w.uses < WINDOW_KEEP
                };
            if keep {
                w.uses += 1;
                return (w.start, w.pages);
            }
        }
        let (flo, fhi) = inflight;
        let mut w = Window {
            start: 0,
            pages: 0,
            epoch: e1,
            uses: 1,
            front: false,
            alive: true,
        };
        if !e1.is_multiple_of(2) && flo < fhi {
            // The front: the lowest page from which on nothing is present
            // (chunks go down from the top). A binary search with table
            // walks (not the cache, which is what is under test).
            let (mut a, mut b) = (0, (fhi - flo) / PAGE);
            while a < b {
                let mid = a + (b - a) / 2;
                if g.translate_uncached(Gpa(flo + mid * PAGE), Access::Read)
                    .is_ok()
                {
                    a = mid + 1;
                } else {
                    b = mid;
                }
            }
            let front = flo + a * PAGE;
            if front > flo {
                // The next chunk: [front - MAX_PFNS pages, front). Even
                // threads hold its bottom (cleared and released first),
                // odd ones its top (cleared last, released last).
                let chunk_lo = front.saturating_sub(MAX_PFNS * PAGE).max(flo);
                w.start = if self.bottom {
                    chunk_lo
                } else {
                    front.saturating_sub(WINDOW * PAGE).max(flo)
                };
                w.pages = WINDOW.min((front - w.start) / PAGE);
                w.front = true;
            }
        }
        if !w.front {
            let bal_pages = (self.geo.share0_end - self.geo.bal_lo) / PAGE;
            w.pages = WINDOW.min(bal_pages);
            w.start = self.geo.bal_lo + self.rng.below(bal_pages - w.pages + 1) * PAGE;
        }
        self.window = Some(w);
        (w.start, w.pages)
    }

    /// Copies every held page again.
    fn copy_all(&mut self) {
        for k in 0..self.held.len() {
            if matches!(self.held[k].seen, Seen::Copied { .. }) {
                self.copy(k, false);
            }
        }
        self.copies += 1;
    }

    /// Holds a window taken at a release front: copies everything again
    /// and again until a table walk sees the window's first page cleared,
    /// then for [`HOLD_AFTER_CLEAR`] more; if nothing is cleared, for at
    /// most [`HOLD_MAX`], and not past the end of the change. With the
    /// grace period, the gather that cleared it waits for this section
    /// before it releases anything; without it, the release runs while we
    /// copy and the copies read the page zeroed under us.
    fn hold_front(&mut self, g: &WalkGuard<'_>, shadow: &Shadow, e1: u64) {
        let Some(w) = self.window else { return };
        let t0 = Instant::now();
        let mut cleared: Option<Instant> = None;
        loop {
            self.copy_all();
            let now = Instant::now();
            if cleared.is_none() && g.translate_uncached(Gpa(w.start), Access::Read).is_err() {
                cleared = Some(now);
                self.released_under = true;
            }
            let done = match cleared {
                Some(c) => now - c >= HOLD_AFTER_CLEAR,
                None => now - t0 >= HOLD_MAX || shadow.epoch.load(SeqCst) != e1,
            };
            if done && self.copies >= COPIES as u64 {
                return;
            }
        }
    }

    /// Translates `gpa` and copies its page out at once.
    fn take(&mut self, g: &WalkGuard<'_>, gpa: u64, phase: u8) {
        let slot = self
            .geo
            .balloonable(gpa)
            .then(|| ((gpa - self.geo.bal_lo) / PAGE) as usize);
        let inject = self.inject_stale && phase == PHASE_STRESS;
        if let Some(hva) = slot
            .filter(|_| inject)
            .map(|s| self.fake[s])
            .filter(|&h| h != 0)
            .map(|h| h - 1)
        {
            // The injected bug: a translation kept from an earlier
            // section, used without asking the table.
            let unmapped = unmapped(g, gpa, hva);
            self.hold(
                gpa,
                hva,
                Seen::Copied {
                    injected: true,
                    unmapped,
                },
            );
            return;
        }
        match g.translate(Gpa(gpa), Access::Read) {
            Ok(_) if phase == PHASE_RECLAIMED => self.push(gpa, Seen::LateOk),
            Ok(t) if t.len_in_leaf < PAGE || t.hva.0 % PAGE != 0 => {
                // A page-aligned GPA translates to a page-aligned host
                // address with a whole page left in its leaf.
                self.push(gpa, Seen::Failed(WalkError::OutOfRange(Gpa(gpa))));
            }
            Ok(t)
                if phase != PHASE_STRESS
                    && g.translate_uncached(Gpa(gpa), Access::Read).map(|u| u.hva) != Ok(t.hva) =>
            {
                self.push(gpa, Seen::Unconfirmed);
            }
            Ok(t) => {
                if let Some(s) = slot.filter(|_| inject) {
                    self.fake[s] = t.hva.0 + 1;
                }
                let unmapped = unmapped(g, gpa, t.hva.0);
                self.hold(
                    gpa,
                    t.hva.0,
                    Seen::Copied {
                        injected: false,
                        unmapped,
                    },
                );
            }
            Err(e) => self.push(gpa, Seen::Failed(e)),
        }
    }

    fn push(&mut self, gpa: u64, seen: Seen) {
        self.held.push(Held {
            gpa,
            hva: 0,
            seen,
            zero: false,
            other: false,
            changed: false,
        });
    }

    /// Records a page translated to `hva` and makes its first copy.
    fn hold(&mut self, gpa: u64, hva: u64, seen: Seen) {
        self.push(gpa, seen);
        let k = self.held.len() - 1;
        self.held[k].hva = hva;
        self.copy(k, true);
        self.copies = 1;
    }

    /// Copies held page `k` into its buffer and checks every word against
    /// the pattern and against the previous copy.
    fn copy(&mut self, k: usize, first: bool) {
        let Device { held, buf, geo, .. } = self;
        let h = &mut held[k];
        let src = h.hva as *const AtomicU64;
        for (w, prev) in buf[k * WORDS..][..WORDS].iter_mut().enumerate() {
            // Word by word with atomic loads: the guest stores whole words
            // concurrently (the same value, or the pattern over a page that
            // just came back as zeros), so a word reads old or new, never
            // torn.
            // SAFETY: `h.hva` was translated inside the read section we are
            // in (by the walker, or by the injected stale cache, which
            // only answers with a guest RAM address while the run is in
            // PHASE_STRESS: RAM stays mapped until the teardown's barrier,
            // which waits for this section), so it is a page of registered
            // guest RAM that is neither released nor unmapped before we
            // unpin (releases and the final unmap wait for a grace period;
            // reading it anyway is what the detectors are for: a released
            // page of a mapping reads zeros or faults in through the
            // userfaultfd handler, it never faults the process). The page
            // is 8-aligned and `w` stays inside it; AtomicU64 has u64's
            // layout. The guest writes it from outside this program, as a
            // device's DMA peer would.
            let v = unsafe { &*src.add(w) }.load(Relaxed);
            let pat = vmm::guest::pattern(h.gpa + w as u64 * 8, geo.seed);
            if v != pat {
                if !first && *prev == pat {
                    h.changed = true;
                }
                if v == 0 {
                    h.zero = true;
                } else {
                    h.other = true;
                }
            }
            *prev = v;
        }
    }

    /// Checks the section that ran between epochs `e1` and `e2` against the
    /// shadow (`lo`, `inflating` as read before it; `phase`, the latest the
    /// section saw) and counts.
    fn account(&mut self, e1: u64, e2: u64, lo: u64, inflating: bool, phase: u8) {
        let (geo, counts) = (self.geo, self.counts);
        let same = e1 == e2 && phase == PHASE_STRESS;
        let stable = same && e1.is_multiple_of(2);
        // Inside one inflate: pages only go from present to ballooned.
        let inflating = same && !stable && inflating;
        if stable {
            counts.stable_batches.fetch_add(1, SeqCst);
        }
        if inflating {
            counts.inflate_batches.fetch_add(1, SeqCst);
        }
        let (mut walks_ok, mut stale_rel, mut stale_data, mut changed, mut mism, mut uaf) =
            (0, 0, 0, 0, 0, 0);
        let (mut injected, mut injected_stale, mut copied) = (0, 0, 0);
        let win = self.window.map_or(0, |w| w.pages as usize);
        let mut win_alive = false;
        // The first violation of the run, described (for the report).
        let note = |kind: &str, k: usize, h: &Held| {
            counts.first_violation.note(|| {
                format!(
                    "{kind}: gpa {:#x} ({:?}, {} page {k}; zero {}, other {}, changed {}) in a \
                     section {} (epochs {e1}..{e2}, phase {phase}, first ballooned {lo:#x}, \
                     balloonable {:#x}..{:#x})",
                    h.gpa,
                    h.seen,
                    if k < win { "window" } else { "scatter" },
                    h.zero,
                    h.other,
                    h.changed,
                    if stable {
                        "in a stable state"
                    } else if inflating {
                        "inside an inflate"
                    } else {
                        "across or inside another change"
                    },
                    geo.bal_lo,
                    geo.share0_end
                )
            });
        };
        for (k, h) in self.held.iter().enumerate() {
            let gpa = h.gpa;
            let in_range = geo.balloonable(gpa);
            let ballooned = stable && gpa >= lo && gpa < geo.share0_end;
            match h.seen {
                Seen::LateOk => {
                    stale_rel += 1;
                    note("translated after reclamation", k, h);
                }
                Seen::Unconfirmed => {}
                Seen::Copied {
                    injected: inj,
                    unmapped,
                } => {
                    copied += 1;
                    win_alive |= k < win;
                    if inj {
                        injected += 1;
                        injected_stale += u64::from(unmapped);
                    } else {
                        walks_ok += 1;
                    }
                    if ballooned {
                        stale_rel += 1;
                        note("a ballooned page translated", k, h);
                    }
                    // Zero is allowed only in the balloonable range while
                    // a deflate or a free page report may be in flight (a
                    // page that came back, not yet rewritten by the
                    // guest), and only in a page the table still mapped
                    // after we translated it (the controller starts a
                    // change only once the guest rewrote every page that
                    // came back, so a page is cleared holding the
                    // pattern). During an inflate a page translated inside
                    // the read section cannot have been released yet: it
                    // still holds the pattern. And nowhere may a word go
                    // from the pattern to anything else while a reader
                    // holds the page's translation.
                    let zero_ok =
                        in_range && !stable && !inflating && !unmapped && phase == PHASE_STRESS;
                    if h.changed || h.other || (h.zero && !zero_ok) {
                        stale_data += 1;
                        note("stale data", k, h);
                    }
                    changed += u64::from(h.changed);
                }
                Seen::Failed(e) => {
                    match e {
                        WalkError::UseAfterFree(_) => {
                            uaf += 1;
                            note("use after free", k, h);
                        }
                        WalkError::Ballooned(_) => {
                            counts.ballooned.fetch_add(1, SeqCst);
                        }
                        WalkError::Discarded(_) => {
                            counts.discarded.fetch_add(1, SeqCst);
                        }
                        _ => {}
                    }
                    if phase != PHASE_STRESS || matches!(e, WalkError::UseAfterFree(_)) {
                        continue;
                    }
                    // Outside the balloonable range a page is always
                    // present; inside it, in a stable state, exactly the
                    // ballooned pages are ballooned and the rest present;
                    // during an inflate a page is present or ballooned.
                    let expected = if !in_range {
                        false
                    } else if stable {
                        ballooned && matches!(e, WalkError::Ballooned(_))
                    } else if inflating {
                        matches!(e, WalkError::Ballooned(_))
                    } else {
                        true
                    };
                    if !expected {
                        mism += 1;
                        note("shadow mismatch", k, h);
                    }
                }
            }
        }
        if let Some(w) = &mut self.window {
            w.alive = win_alive;
            if w.front && win_alive && phase == PHASE_STRESS {
                counts.front_sections.fetch_add(1, SeqCst);
                if self.released_under {
                    counts.front_releases.fetch_add(1, SeqCst);
                }
            }
        }
        let n = self.held.len() as u64;
        if phase == PHASE_STRESS {
            counts.read_sections.fetch_add(1, SeqCst);
            counts.walks.fetch_add(n, SeqCst);
            counts.walks_ok.fetch_add(walks_ok, SeqCst);
            counts
                .bytes_copied
                .fetch_add(copied * PAGE * self.copies, SeqCst);
        } else {
            counts.teardown_walks.fetch_add(n, SeqCst);
            counts.teardown_walks_ok.fetch_add(walks_ok, SeqCst);
        }
        counts.injected_hits.fetch_add(injected, SeqCst);
        counts
            .injected_stale_reads
            .fetch_add(injected_stale, SeqCst);
        counts.stale_released.fetch_add(stale_rel, SeqCst);
        counts.stale_data.fetch_add(stale_data, SeqCst);
        counts.changed_under_reader.fetch_add(changed, SeqCst);
        counts.shadow_mismatches.fetch_add(mism, SeqCst);
        counts.use_after_free.fetch_add(uaf, SeqCst);
    }
}

/// Waits until the driver reports `pages` in the balloon; false if it
/// stopped or timed out.
fn change(vm: &Vm, shadow: &Shadow, geo: &Geometry, pages: u64) -> Result<bool> {
    let now_lo = shadow.ballooned_lo.load(SeqCst);
    let new_lo = geo.share0_end - pages * PAGE;
    shadow.begin(new_lo < now_lo, (new_lo.min(now_lo), now_lo));
    vm.set_balloon_target(u32::try_from(pages).context("balloon target too large")?)?;
    let (_, ok) = vm
        .wait_balloon_driver(TIMEOUT, |s| {
            (s.pages == pages && s.target == pages) || shadow.stuck_readers() > 0
        })
        .context("reading the guest's balloon driver status")?;
    let ok = ok && shadow.stuck_readers() == 0;
    if ok {
        shadow
            .ballooned_lo
            .store(geo.share0_end - pages * PAGE, SeqCst);
        shadow.epoch.fetch_add(1, SeqCst);
    }
    Ok(ok)
}

/// 4 KiB pages of `[start, end)` whose host backing is resident (mincore).
fn resident_pages(vm: &Vm, start: u64, end: u64) -> u64 {
    let regions = vm.memory().regions();
    let mut n = 0;
    let mut gpa = start;
    while gpa < end {
        let Some(r) = regions.iter().find(|r| r.contains(gpa, PAGE)) else {
            gpa += PAGE;
            continue;
        };
        let stop = end.min(r.gpa.0 + r.len);
        let bytes = guest_mm::stress::resident_bytes(r.host_of(gpa) as u64, stop - gpa);
        n += if bytes == u64::MAX { 0 } else { bytes / PAGE };
        gpa = stop;
    }
    n
}

/// Has the driver report `pages` pages below its (empty) balloon as free
/// (free page reporting: the device discards them through the gather), and
/// waits until it wrote and verified them again; false if it stopped or
/// timed out.
fn report_free(vm: &mut Vm, shadow: &Shadow, pages: u64) -> Result<bool> {
    let before = vm
        .balloon_driver_status()
        .context("reading the guest's balloon driver status")?;
    // The driver reports the pages just below its balloon, which is empty.
    let hi = shadow.ballooned_lo.load(SeqCst);
    shadow.begin(false, (hi - pages * PAGE, hi));
    let seq = vm
        .balloon_report_free(pages)
        .context("posting a free page report")?;
    let want = before.reverified + pages;
    let (_, ok) = vm
        .wait_balloon_driver(TIMEOUT, |s| {
            (s.seq == seq && s.reverified >= want) || shadow.stuck_readers() > 0
        })
        .context("reading the guest's balloon driver status")?;
    let ok = ok && shadow.stuck_readers() == 0;
    if ok {
        shadow.epoch.fetch_add(1, SeqCst);
    }
    Ok(ok)
}

fn last_lines(console: &Mutex<Vec<u8>>, n: usize) -> String {
    let text =
        String::from_utf8_lossy(&console.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Run `gmm stress-vm`.
pub fn cmd(a: &Args) -> Result<()> {
    let mem = MemSize::from_bytes(a.mem).with_context(|| format!("--mem {}", a.mem))?;
    vmm::guest::check_config(mem.bytes(), a.vcpus).context("--mem / --vcpus")?;
    let console = Arc::new(Mutex::new(Vec::new()));
    let mut c = VmConfig::new(mem);
    c.vcpus = a.vcpus;
    c.backing = a.backing;
    c.page_size = a.page_size;
    c.workload = Workload::BalloonStress;
    c.console = Console::Capture(Arc::clone(&console));
    c.balloon = Some(BalloonConfig::default());
    let seed = c.seed;
    crate::say(
        a.json,
        &format!(
            "stress-vm: {} guest, {} vCPUs, {} device threads, {:?} RAM in {} leaves, {:.1} s{}\n",
            human_bytes(a.mem),
            a.vcpus,
            a.device_threads,
            a.backing,
            a.page_size,
            a.seconds,
            a.inject
                .map(|i| format!(", INJECTING {}", i.name()))
                .unwrap_or_default()
        ),
    );
    let mut vm = Vm::new(c).context("creating the VM (is /dev/kvm usable?)")?;
    let table = Arc::clone(vm.stage2().table());
    let (s0, e0) = vmm::guest::share(mem.bytes(), a.vcpus, 0);
    let share_pages = (e0 - s0) / PAGE;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let max_pages = ((share_pages as f64 * a.max_fraction) as u64).clamp(1, share_pages - 1);
    let geo = Geometry {
        seed,
        bal_lo: e0 - max_pages * PAGE,
        share0_end: e0,
        mem: mem.bytes(),
    };
    let t_boot = Instant::now();
    vm.start().context("starting the vCPUs")?;
    if !vm.wait_results(TIMEOUT) {
        bail!(
            "the guest did not finish its first pass in {TIMEOUT:?}: {:?}\n{}",
            vm.outcomes(),
            last_lines(&console, 20)
        );
    }
    let (st, ok) = vm
        .wait_balloon_driver(TIMEOUT, |s| s.state == DriverState::Running)
        .context("reading the guest's balloon driver status")?;
    if !ok {
        bail!(
            "the guest's balloon driver did not start ({st:?}): {:?}\n{}",
            vm.outcomes(),
            last_lines(&console, 20)
        );
    }
    crate::say(
        a.json,
        &format!(
            "boot + first pass + driver ready in {:.0} ms; balloon up to {} pages of vCPU 0's {}\n",
            ms(t_boot.elapsed()),
            max_pages,
            share_pages
        ),
    );
    // Lock holds of the stress only (building the table at boot excluded),
    // in wall clock and in the holder's CPU time: on a small host a holder
    // may be descheduled while it holds the lock (the vCPUs spin), and the
    // balloon's device thread, which makes most holds, runs at nice 19.
    table.set_cpu_lock_stats(true);
    table.reset_lock_stats();

    let shadow = Arc::new(Shadow {
        epoch: AtomicU64::new(0),
        ballooned_lo: AtomicU64::new(e0),
        inflating: AtomicBool::new(false),
        inflight_lo: AtomicU64::new(0),
        inflight_hi: AtomicU64::new(0),
        phase: AtomicU8::new(PHASE_STRESS),
        stop: AtomicBool::new(false),
        t0: Instant::now(),
        section_start: (0..a.device_threads).map(|_| AtomicU64::new(0)).collect(),
    });
    let counts = Arc::new(WalkCounts::default());
    let mut threads = Vec::new();
    for i in 0..a.device_threads {
        let (table, shadow, counts) =
            (Arc::clone(&table), Arc::clone(&shadow), Arc::clone(&counts));
        let inject = a.inject == Some(Inject::StaleCache) && i == 0;
        threads.push(
            std::thread::Builder::new()
                .name(format!("device{i}"))
                .spawn(move || device_thread(i, &table, &shadow, geo, &counts, inject))
                .context("spawning a device thread")?,
        );
    }
    // RSS sampler.
    let rss_stop = Arc::new(AtomicBool::new(false));
    let rss_min = Arc::new(AtomicU64::new(u64::MAX));
    let rss_max = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, lo, hi) = (
            Arc::clone(&rss_stop),
            Arc::clone(&rss_min),
            Arc::clone(&rss_max),
        );
        std::thread::Builder::new()
            .name("rss".into())
            .spawn(move || {
                while !stop.load(SeqCst) {
                    let r = vmm::proc_stats::rss().rss;
                    if r > 0 {
                        lo.fetch_min(r, SeqCst);
                        hi.fetch_max(r, SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
            .context("spawning the RSS sampler")?
    };
    // Injected corruption: one word of the last vCPU's share, rewritten
    // behind the guest's back every millisecond.
    let corrupter = if a.inject == Some(Inject::CorruptPage) {
        let (s, e) = vmm::guest::share(mem.bytes(), a.vcpus, a.vcpus - 1);
        let at = if a.vcpus == 1 {
            s + 3 * PAGE
        } else {
            s + (e - s) / 2
        } + 8;
        let mut acc = vm.stage2().access();
        let stop = Arc::clone(&shadow);
        Some(
            std::thread::Builder::new()
                .name("corrupter".into())
                .spawn(move || {
                    while !stop.stop.load(SeqCst) && stop.phase.load(SeqCst) == PHASE_STRESS {
                        let _ = acc.store_u64(at, !vmm::guest::pattern(at, seed), SeqCst);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
                .context("spawning the corrupter")?,
        )
    } else {
        None
    };

    // The balloon cycles.
    let mut rng = Rng::new(a.seed);
    let hold = Duration::from_millis(a.hold_ms);
    let t0 = Instant::now();
    let mut last_line = Instant::now();
    let (mut cycles, mut stalls, mut balloon_max, mut not_released) = (0u64, 0u64, 0u64, 0u64);
    std::thread::sleep(hold);
    while t0.elapsed().as_secs_f64() < a.seconds {
        let lo_pages = (max_pages / 4).max(1);
        let pages = lo_pages + rng.below(max_pages - lo_pages + 1);
        if !change(&vm, &shadow, &geo, pages)? {
            stalls += 1;
            break;
        }
        balloon_max = balloon_max.max(pages);
        // The driver saw its buffers back: the device released them, and
        // nothing may have brought them back since.
        not_released += resident_pages(&vm, e0 - pages * PAGE, e0);
        std::thread::sleep(hold);
        if !change(&vm, &shadow, &geo, 0)? {
            stalls += 1;
            break;
        }
        std::thread::sleep(hold);
        if !a.no_report_free {
            let pages = 1 + rng.below(max_pages / 2);
            if !report_free(&mut vm, &shadow, pages)? {
                stalls += 1;
                break;
            }
            std::thread::sleep(hold);
        }
        cycles += 1;
        if last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            let c = vm.balloon().map(|d| d.counters()).unwrap_or_default();
            let bad = counts.stale_released.load(SeqCst)
                + counts.stale_data.load(SeqCst)
                + counts.shadow_mismatches.load(SeqCst)
                + counts.use_after_free.load(SeqCst);
            crate::say(
                a.json,
                &format!(
                    "  {:>5.1} s: {cycles} cycles, {} pages inflated, {} deflated, {} walks, \
                     {bad} walk violations, RSS {}\n",
                    t0.elapsed().as_secs_f64(),
                    c.pages_inflated,
                    c.pages_deflated,
                    counts.walks.load(SeqCst),
                    human_bytes(vmm::proc_stats::rss().rss)
                ),
            );
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    // Stop the churn: everything back, then the guest leaves.
    if stalls == 0 && !change(&vm, &shadow, &geo, 0)? {
        stalls += 1;
    }
    let holds = table.stats();
    let max_lock_hold_us = holds.lock_hold_max_ns as f64 / 1e3;
    let max_lock_hold_cpu_us = holds.lock_hold_cpu_max_ns as f64 / 1e3;
    rss_stop.store(true, SeqCst);
    let _ = sampler.join();
    let ld = |x: &AtomicU64| x.load(SeqCst);
    let rss_lo = ld(&rss_min);
    let mut j = StressVmResult {
        tool: "stress-vm".into(),
        seconds: a.seconds,
        elapsed_s: elapsed,
        mem_bytes: a.mem,
        vcpus: a.vcpus,
        device_threads: a.device_threads,
        backing: format!("{:?}", a.backing).to_lowercase(),
        page_size: a.page_size.to_string(),
        membarrier: crate::membarrier(),
        inject: a.inject.map(|i| i.name().to_string()),
        broken_rule: guest_mm::mutation::active().map(|r| r.name().to_string()),
        cycles,
        balloon_max_pages: balloon_max,
        not_released,
        stalls,
        max_lock_hold_us,
        max_lock_hold_cpu_us,
        rss_min_bytes: if rss_lo == u64::MAX { 0 } else { rss_lo },
        rss_max_bytes: ld(&rss_max),
        ..StressVmResult::default()
    };

    let stuck_readers = shadow.stuck_readers();
    if stuck_readers > 0 {
        // Wedged: a device thread blocked inside its read section (it
        // faulted on released backing, and the fault waits for the gather
        // that waits for the reader). Anything that registers a reader,
        // takes the balloon's lock or joins a vCPU would wait forever now,
        // so report what the device threads counted and leave without
        // tearing the VM down: the process exit reclaims it.
        shadow.stop.store(true, SeqCst);
        j.fill_walks(&counts);
        j.stuck_readers = stuck_readers;
        j.finish();
        let h = j.human()
            + &format!(
                "WEDGED: {stuck_readers} device thread(s) inside one read section for more than \
                 {STUCK:?}; the VM was left as it is\nlast console lines:\n{}\n",
                last_lines(&console, 12)
            );
        crate::say(a.json, &h);
        crate::emit_json(a.json, &j)?;
        let _ = std::io::stderr().flush();
        std::mem::forget(vm);
        bail!("{} violations (wedged)", j.violations);
    }

    vm.finish_probes().context("posting CMD_EXIT")?;
    // A driver that missed a target does not take the command: do not wait
    // long for it.
    let all_done = vm.wait(if stalls == 0 {
        TIMEOUT
    } else {
        Duration::from_secs(5)
    });
    let outcomes = vm.outcomes();
    j.vcpu_failures = u64::from(a.vcpus)
        - outcomes
            .iter()
            .filter(|(_, o)| *o == VcpuOutcome::Done)
            .count() as u64;
    let blocks = vm
        .stress_status()
        .context("reading the guest's stress blocks")?;
    let st = vm
        .balloon_driver_status()
        .context("reading the guest's balloon driver status")?;
    let (_, results, _) = vm.reports();
    let mut first_pass_bad = 0;
    for i in 0..a.vcpus {
        first_pass_bad += results
            .iter()
            .find(|r| r.vcpu == i)
            .map_or(0, |r| r.bad_words);
    }
    j.guest_passes = blocks.iter().map(|b| b.passes).sum();
    j.guest_bad_words = first_pass_bad + blocks.iter().map(|b| b.bad_words).sum::<u64>();
    j.driver_bad_words = st.bad_words;
    j.driver_pages_inflated = st.inflated;
    j.driver_pages_deflated = st.deflated;
    j.driver_pages_reverified = st.reverified;
    j.driver_errors = (vm.balloon_driver_errors().len() as u64).max(u64::from(st.error.is_some()));
    if let Some(d) = vm.balloon() {
        let c = d.counters();
        j.pages_inflated = c.pages_inflated;
        j.pages_deflated = c.pages_deflated;
        j.pages_reported = c.bytes_reported / PAGE;
        j.bytes_released = c.bytes_released;
        j.device_errors = c.errors + d.lock().errors();
    }
    // Host-side: the whole workload RAM holds the pattern, no page is left
    // in the balloon (only when the guest stopped cleanly: a vCPU still
    // rewriting would not change the outcome, but a stall might leave pages
    // ballooned on purpose).
    if stalls == 0 {
        j.final_bad_words = vm
            .check_pattern(WORKLOAD_START, mem.bytes())
            .context("host-side pattern check")?;
    }
    let mut left_ballooned = 0;
    if stalls == 0 {
        for gpa in (geo.bal_lo..geo.share0_end).step_by(PAGE as usize) {
            if !matches!(table.query(Gpa(gpa)), PageState::Present { .. }) {
                left_ballooned += 1;
            }
        }
    }
    j.unexpected_faults = vm.stage2().unexpected_faults();
    j.demand_faults = vm.fault_stats().summary().faults;
    let console_tail = last_lines(&console, 12);

    // Teardown while the device threads keep walking.
    shadow.phase.store(PHASE_TEARDOWN, SeqCst);
    if let Some(c) = corrupter {
        let _ = c.join();
    }
    let mut td = vm.destroy();
    let reclaimed = td.wait_reclaim();
    shadow.phase.store(PHASE_RECLAIMED, SeqCst);
    std::thread::sleep(Duration::from_millis(20));
    shadow.stop.store(true, SeqCst);
    for t in threads {
        let _ = t.join();
    }
    drop(td);
    let ts = table.stats();
    j.rss_after_reclaim_bytes = vmm::proc_stats::rss().rss;
    j.reclaim_ms = reclaimed.reclaim_ms;
    j.tables_freed = ts.tables_freed;
    j.table_pages_end = ts.table_pages;
    j.fill_walks(&counts);
    j.use_after_free = j.use_after_free.max(ts.use_after_free);
    j.left_not_present = left_ballooned;
    j.shadow_mismatches += left_ballooned;
    j.finish();
    let mut h = j.human();
    if j.violations > 0 || !all_done {
        h += &format!("vCPU outcomes: {outcomes:?}\nlast console lines:\n{console_tail}\n");
    }
    crate::say(a.json, &h);
    crate::emit_json(a.json, &j)?;
    let _ = std::io::stderr().flush();
    if j.violations > 0 {
        bail!("{} violations", j.violations);
    }
    Ok(())
}

impl StressVmResult {
    /// The device threads' counts.
    fn fill_walks(&mut self, counts: &WalkCounts) {
        let ld = |x: &AtomicU64| x.load(SeqCst);
        self.walks = ld(&counts.walks);
        self.walks_ok = ld(&counts.walks_ok);
        self.walks_ballooned = ld(&counts.ballooned);
        self.walks_discarded = ld(&counts.discarded);
        self.walks_per_s = self.walks as f64 / self.elapsed_s.max(1e-9);
        self.bytes_copied = ld(&counts.bytes_copied);
        self.read_sections = ld(&counts.read_sections);
        self.front_sections = ld(&counts.front_sections);
        self.front_releases = ld(&counts.front_releases);
        self.read_section_max_us = ld(&counts.read_section_max_ns) as f64 / 1e3;
        self.stable_batches = ld(&counts.stable_batches);
        self.inflate_batches = ld(&counts.inflate_batches);
        self.teardown_walks = ld(&counts.teardown_walks);
        self.teardown_walks_ok = ld(&counts.teardown_walks_ok);
        self.injected_hits = ld(&counts.injected_hits);
        self.injected_stale_reads = ld(&counts.injected_stale_reads);
        self.stale_released = ld(&counts.stale_released);
        self.stale_data = ld(&counts.stale_data);
        self.changed_under_reader = ld(&counts.changed_under_reader);
        self.stale_translations = self.stale_released + self.stale_data;
        self.use_after_free = ld(&counts.use_after_free);
        self.shadow_mismatches = ld(&counts.shadow_mismatches);
        self.first_walk_violation = counts.first_violation.get();
    }

    /// Sums the violations.
    fn finish(&mut self) {
        self.guest_errors =
            self.guest_bad_words + self.driver_bad_words + self.driver_errors + self.vcpu_failures;
        self.violations = self.guest_errors
            + self.stale_released
            + self.stale_data
            + self.use_after_free
            + self.shadow_mismatches
            + self.device_errors
            + self.unexpected_faults
            + self.final_bad_words
            + self.not_released
            + self.stalls
            + self.stuck_readers;
        self.ok = self.violations == 0;
    }

    /// The human-readable summary.
    fn human(&self) -> String {
        let j = self;
        let mut h = String::new();
        h += &format!(
            "balloon      {:>12} cycles, {} pages inflated, {} deflated, {} reported free (driver {} / {}, {} re-verified), max {} pages\n",
            j.cycles,
            j.pages_inflated,
            j.pages_deflated,
            j.pages_reported,
            j.driver_pages_inflated,
            j.driver_pages_deflated,
            j.driver_pages_reverified,
            j.balloon_max_pages
        );
        h += &format!(
            "guest        {:>12} passes, {} bad words, {} driver bad words, {} driver errors, {} vCPUs not done\n",
            j.guest_passes, j.guest_bad_words, j.driver_bad_words, j.driver_errors, j.vcpu_failures
        );
        h += &format!(
            "device walks {:>12} ({} ok, {} ballooned, {} discarded, {:.2} M/s, {} copied; {} read \
             sections, longest {:.0} us: {} stable, {} inside an inflate, {} held at a release \
             front, {} of them across its clear); teardown {} ({} ok)\n",
            j.walks,
            j.walks_ok,
            j.walks_ballooned,
            j.walks_discarded,
            j.walks_per_s / 1e6,
            human_bytes(j.bytes_copied),
            j.read_sections,
            j.read_section_max_us,
            j.stable_batches,
            j.inflate_batches,
            j.front_sections,
            j.front_releases,
            j.teardown_walks,
            j.teardown_walks_ok
        );
        if j.inject.is_some() {
            h += &format!(
                "injected     {:>12} answers of the stale cache, {} of them read backing the table \
                 no longer mapped\n",
                j.injected_hits, j.injected_stale_reads
            );
        }
        h += &format!(
            "table        max lock hold {:.1} us ({:.1} us on the holder's CPU), {} demand \
             faults, {} table pages freed at teardown, {} left\n",
            j.max_lock_hold_us,
            j.max_lock_hold_cpu_us,
            j.demand_faults,
            j.tables_freed,
            j.table_pages_end
        );
        h += &format!(
            "rss          min {}, max {}, after reclaim {} (reclaim {:.1} ms)\n",
            human_bytes(j.rss_min_bytes),
            human_bytes(j.rss_max_bytes),
            human_bytes(j.rss_after_reclaim_bytes),
            j.reclaim_ms
        );
        h += &format!(
            "violations   {:>12} (guest errors {}, stale {} = released {} + data {} ({} changed \
             under the reader), use-after-free {}, shadow mismatches {}, device errors {}, \
             unexpected faults {}, final bad words {}, not released {}, stalls {}, stuck \
             readers {})\n",
            j.violations,
            j.guest_errors,
            j.stale_translations,
            j.stale_released,
            j.stale_data,
            j.changed_under_reader,
            j.use_after_free,
            j.shadow_mismatches,
            j.device_errors,
            j.unexpected_faults,
            j.final_bad_words,
            j.not_released,
            j.stalls,
            j.stuck_readers
        );
        if let Some(f) = &j.first_walk_violation {
            h += &format!("first walk violation: {f}\n");
        }
        h
    }
}

//! `gmm stress-vm`: a real microVM under balloon churn, with device threads
//! reading guest memory through the fast walk; exits non-zero on any
//! violation.
//!
//! The guest runs [`Workload::BalloonStress`]: every vCPU writes and
//! verifies `gpa ^ seed` over its share once, then keeps rewriting and
//! verifying it (vCPUs 1..N over their whole share, vCPU 0 below its
//! balloon, a chunk between two polls of the target), counting passes and
//! bad words in the control page. vCPU 0's ring-3 virtio-balloon driver
//! follows the target the host sets; after a deflate it rewrites and
//! verifies the pages that came back (each first touch faults in through
//! the userfaultfd handler).
//!
//! The controller thread alternates, until `--seconds` have passed: set
//! the target to a random number of pages (between a quarter of and
//! `--max-fraction` of vCPU 0's share), wait for the driver to report it,
//! hold; set it to 0, wait, hold; have the driver report a random number
//! of pages below the empty balloon as free (free page reporting: the
//! device discards them through the gather, the driver writes and verifies
//! them again), wait, hold (unless `--no-report-free`). That is one
//! *cycle*. `--device-threads` threads meanwhile translate random pages
//! (half in the part of vCPU 0's share that the balloon may take, half
//! anywhere in workload RAM) with a [`guest_mm::Walker`] and copy them out
//! inside the read section, 16 pages per pin. A sampler thread reads the process RSS every 10 ms.
//!
//! **The shadow.** Before each change (new target, free page report) the
//! controller publishes whether it only inflates and makes `epoch` odd;
//! once the driver reported the change done (it writes the new size only
//! after the device returned its buffer, i.e. after the gather released
//! the pages, and after a deflate or a report only once it rewrote every
//! page that came back) it publishes the first ballooned GPA and makes
//! `epoch` even again. A device thread reads `epoch` before it pins and
//! after it unpins: a batch whose two reads are equal and even was walked
//! inside one stable state, equal and odd inside one change. Counted:
//!
//! - `stale_released`: a translation succeeded for a page the balloon had
//!   taken (its entry was released before the walk began);
//! - `stale_data`: a page copied through a translation did not hold the
//!   guest's pattern (in the balloonable range during a deflate, zero is
//!   also allowed: a page that just came back reads zero until the guest
//!   rewrote it; everywhere else, in stable states and during inflates,
//!   only the pattern: a page translated inside a read section cannot have
//!   been released yet, the release waits for the reader);
//! - `shadow_mismatches`: a page that must be present did not translate,
//!   or a ballooned page translated to another error (in the balloonable
//!   range: in stable states, and during inflates, where a page is present
//!   or ballooned; elsewhere always);
//! - `use_after_free`: a walk read a poisoned (freed) table page (the
//!   walker's error, and the table's own count of such lookups).
//!
//! `stale_translations` = `stale_released + stale_data`. After the last
//! cycle the controller deflates to 0, posts `CMD_EXIT` and waits for every
//! vCPU, checks the pattern over all workload RAM from the host
//! (`final_bad_words`) and that no page is left ballooned, then destroys
//! the VM **while the device threads keep walking** (teardown gather, grace
//! period, table pages freed and poisoned, RAM unmapped): a walk that
//! succeeds must still read the pattern, and none may succeed once
//! reclamation is complete.
//!
//! After each inflate the controller also checks with `mincore` that no
//! ballooned page is resident (`not_released`).
//!
//! `guest_errors` = bad words the guest found (first pass, later passes,
//! deflated pages) + balloon driver errors + vCPUs that did not end with
//! `Done`. Device and transport errors, unexplained demand faults, and a
//! driver that did not reach a target (`stalls`) are violations too.
//!
//! Guest RAM has 4 KiB leaves by default; `--page-size 2M` also exercises
//! the splits of THP-backed leaves and whole-leaf demand faults.
//!
//! Hidden `--inject` modes prove the detectors fire: `stale-cache` gives
//! device thread 0 a translation cache that is never shot down (a device
//! keeping a translation across an invalidation); `corrupt-page` has a host
//! thread overwrite one guest word behind the guest's back every
//! millisecond.

use std::io::Write as _;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicU8,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_mm::{Access, Gpa, PageState, Stage2Table, WalkError};
use serde::Serialize;
use vmm::devices::virtio::balloon::BalloonConfig;
use vmm::guest::balloon::DriverState;
use vmm::guest::layout::WORKLOAD_START;
use vmm::vstate::vcpu::VcpuOutcome;
use vmm::{Backing, Console, MemSize, PageSize, Vm, VmConfig, Workload};

use crate::rng::{ms, Rng};
use crate::units::human_bytes;

const PAGE: u64 = 4096;
/// Pages a device thread translates and copies per read section.
const BATCH: usize = 16;
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
    phase: AtomicU8,
    stop: AtomicBool,
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
    stable_batches: AtomicU64,
    inflate_batches: AtomicU64,
    stale_released: AtomicU64,
    stale_data: AtomicU64,
    shadow_mismatches: AtomicU64,
    use_after_free: AtomicU64,
    teardown_walks: AtomicU64,
    teardown_walks_ok: AtomicU64,
    injected_hits: AtomicU64,
}

enum Seen {
    Copied,
    Failed(WalkError),
    /// The injected stale cache answered (nothing was read).
    Injected,
    /// Translated after reclamation finished (not read).
    LateOk,
}

/// One device thread: translate and copy random pages, check them against
/// the shadow.
fn device_thread(
    idx: u32,
    table: &Arc<Stage2Table>,
    shadow: &Shadow,
    geo: Geometry,
    counts: &WalkCounts,
    inject_stale: bool,
) {
    let mut walker = table.walker();
    let mut rng = Rng::new(geo.seed ^ (u64::from(idx) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    const WORDS: usize = (PAGE / 8) as usize;
    let mut buf = vec![0u64; BATCH * WORDS];
    let mut gpas = [0u64; BATCH];
    let mut seen: Vec<Seen> = Vec::with_capacity(BATCH);
    // The injected bug: translations remembered forever (per balloonable
    // page), consulted before the real walk.
    let mut fake_cache = vec![false; ((geo.share0_end - geo.bal_lo) / PAGE) as usize];
    let bal_pages = (geo.share0_end - geo.bal_lo) / PAGE;
    let all_pages = (geo.mem - WORKLOAD_START) / PAGE;
    while !shadow.stop.load(SeqCst) {
        for (k, g) in gpas.iter_mut().enumerate() {
            *g = if k % 2 == 0 {
                geo.bal_lo + rng.below(bal_pages) * PAGE
            } else {
                WORKLOAD_START + rng.below(all_pages) * PAGE
            };
        }
        let e1 = shadow.epoch.load(SeqCst);
        let lo = shadow.ballooned_lo.load(SeqCst);
        let inflating = shadow.inflating.load(SeqCst);
        let phase = shadow.phase.load(SeqCst);
        seen.clear();
        {
            let g = walker.pin();
            for (k, &gpa) in gpas.iter().enumerate() {
                let slot = geo
                    .balloonable(gpa)
                    .then(|| ((gpa - geo.bal_lo) / PAGE) as usize);
                if inject_stale && slot.is_some_and(|s| fake_cache[s]) {
                    seen.push(Seen::Injected);
                    continue;
                }
                match g.translate(Gpa(gpa), Access::Read) {
                    Ok(t) if phase == PHASE_RECLAIMED => {
                        let _ = t;
                        seen.push(Seen::LateOk);
                    }
                    Ok(t) if t.len_in_leaf < PAGE || t.hva.0 % PAGE != 0 => {
                        // A page-aligned GPA translates to a page-aligned
                        // host address with a whole page left in its leaf.
                        seen.push(Seen::Failed(WalkError::OutOfRange(Gpa(gpa))));
                    }
                    Ok(t) => {
                        // Word by word with atomic loads: the guest stores
                        // whole words concurrently (the same value, or the
                        // pattern over a page that just came back as
                        // zeros), so a word reads old or new, never torn.
                        let src = t.hva.0 as *const AtomicU64;
                        for (w, d) in buf[k * WORDS..][..WORDS].iter_mut().enumerate() {
                            // SAFETY: `t` was translated inside this read
                            // section, so its page is registered guest RAM
                            // that is neither released nor unmapped before
                            // we unpin (releases and the final unmap wait
                            // for a grace period); the page is 8-aligned
                            // and `w` stays inside it; AtomicU64 has u64's
                            // layout. The guest writes it from outside this
                            // program, as a device's DMA peer would.
                            *d = unsafe { &*src.add(w) }.load(Relaxed);
                        }
                        if let Some(s) = slot.filter(|_| inject_stale) {
                            fake_cache[s] = true;
                        }
                        seen.push(Seen::Copied);
                    }
                    Err(e) => seen.push(Seen::Failed(e)),
                }
            }
        }
        let e2 = shadow.epoch.load(SeqCst);
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
        let (mut walks_ok, mut stale_rel, mut stale_data, mut mism, mut uaf) = (0, 0, 0, 0, 0);
        for (k, (&gpa, s)) in gpas.iter().zip(&seen).enumerate() {
            let in_range = geo.balloonable(gpa);
            let ballooned = stable && gpa >= lo && gpa < geo.share0_end;
            match s {
                Seen::Injected => {
                    counts.injected_hits.fetch_add(1, SeqCst);
                    if ballooned {
                        stale_rel += 1;
                    }
                }
                Seen::LateOk => stale_rel += 1,
                Seen::Copied => {
                    walks_ok += 1;
                    if ballooned {
                        stale_rel += 1;
                    }
                    // Zero is allowed only in the balloonable range while
                    // a deflate may be in flight (a page that came back,
                    // not yet rewritten by the guest). During an inflate a
                    // page translated inside the read section cannot have
                    // been released yet: it still holds the pattern.
                    let zero_ok = in_range && !stable && !inflating && phase == PHASE_STRESS;
                    let page = &buf[k * WORDS..][..WORDS];
                    let bad = page.iter().enumerate().any(|(w, &v)| {
                        v != vmm::guest::pattern(gpa + w as u64 * 8, geo.seed)
                            && !(zero_ok && v == 0)
                    });
                    if bad {
                        stale_data += 1;
                    }
                }
                Seen::Failed(e) => {
                    match e {
                        WalkError::UseAfterFree(_) => uaf += 1,
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
                    }
                }
            }
        }
        let n = seen.len() as u64;
        if phase == PHASE_STRESS {
            counts.walks.fetch_add(n, SeqCst);
            counts.walks_ok.fetch_add(walks_ok, SeqCst);
            counts.bytes_copied.fetch_add(walks_ok * PAGE, SeqCst);
        } else {
            counts.teardown_walks.fetch_add(n, SeqCst);
            counts.teardown_walks_ok.fetch_add(walks_ok, SeqCst);
        }
        counts.stale_released.fetch_add(stale_rel, SeqCst);
        counts.stale_data.fetch_add(stale_data, SeqCst);
        counts.shadow_mismatches.fetch_add(mism, SeqCst);
        counts.use_after_free.fetch_add(uaf, SeqCst);
        // Leave the two host cores to the vCPUs part of the time.
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The JSON line of `gmm stress-vm`.
#[derive(Serialize, Default)]
struct StressVmJson {
    tool: &'static str,
    seconds: f64,
    elapsed_s: f64,
    mem_bytes: u64,
    vcpus: u32,
    device_threads: u32,
    backing: String,
    page_size: String,
    membarrier: bool,
    inject: Option<&'static str>,
    cycles: u64,
    pages_inflated: u64,
    pages_deflated: u64,
    pages_reported: u64,
    driver_pages_inflated: u64,
    driver_pages_deflated: u64,
    driver_pages_reverified: u64,
    balloon_max_pages: u64,
    bytes_released: u64,
    demand_faults: u64,
    guest_passes: u64,
    guest_bad_words: u64,
    driver_bad_words: u64,
    driver_errors: u64,
    vcpu_failures: u64,
    guest_errors: u64,
    walks: u64,
    walks_ok: u64,
    walks_ballooned: u64,
    walks_discarded: u64,
    walks_per_s: f64,
    bytes_copied: u64,
    stable_batches: u64,
    inflate_batches: u64,
    teardown_walks: u64,
    teardown_walks_ok: u64,
    injected_hits: u64,
    stale_released: u64,
    stale_data: u64,
    stale_translations: u64,
    use_after_free: u64,
    shadow_mismatches: u64,
    device_errors: u64,
    unexpected_faults: u64,
    final_bad_words: u64,
    not_released: u64,
    stalls: u64,
    max_lock_hold_us: f64,
    rss_min_bytes: u64,
    rss_max_bytes: u64,
    rss_after_reclaim_bytes: u64,
    tables_freed: u64,
    table_pages_end: u64,
    violations: u64,
    ok: bool,
}

/// Waits until the driver reports `pages` in the balloon; false if it
/// stopped or timed out.
fn change(vm: &Vm, shadow: &Shadow, geo: &Geometry, pages: u64) -> Result<bool> {
    let dev = vm.balloon().context("the VM has no balloon")?;
    let now = (geo.share0_end - shadow.ballooned_lo.load(SeqCst)) / PAGE;
    shadow.inflating.store(pages > now, SeqCst);
    shadow.epoch.fetch_add(1, SeqCst);
    dev.set_target_pages(u32::try_from(pages).context("balloon target too large")?);
    let (_, ok) = vm
        .wait_balloon_driver(TIMEOUT, |s| s.pages == pages && s.target == pages)
        .context("reading the guest's balloon driver status")?;
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
    shadow.inflating.store(false, SeqCst);
    shadow.epoch.fetch_add(1, SeqCst);
    let seq = vm
        .balloon_report_free(pages)
        .context("posting a free page report")?;
    let want = before.reverified + pages;
    let (_, ok) = vm
        .wait_balloon_driver(TIMEOUT, |s| s.seq == seq && s.reverified >= want)
        .context("reading the guest's balloon driver status")?;
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
    // Lock holds of the stress only (building the table at boot excluded).
    // Wall clock: on a small host a holder may be descheduled while it
    // holds the lock (the vCPUs spin); the holder's CPU time is no better
    // here, since inflates run on vCPU 0's thread, whose guest time is
    // accounted lazily (a hold would include guest time run before it).
    table.reset_lock_stats();

    let shadow = Arc::new(Shadow {
        epoch: AtomicU64::new(0),
        ballooned_lo: AtomicU64::new(e0),
        inflating: AtomicBool::new(false),
        phase: AtomicU8::new(PHASE_STRESS),
        stop: AtomicBool::new(false),
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
    let max_lock_hold_us = table.stats().lock_hold_max_ns as f64 / 1e3;
    rss_stop.store(true, SeqCst);
    let _ = sampler.join();
    vm.finish_probes().context("posting CMD_EXIT")?;
    // A driver that missed a target does not take the command: do not wait
    // long for it.
    let all_done = vm.wait(if stalls == 0 {
        TIMEOUT
    } else {
        Duration::from_secs(5)
    });
    let outcomes = vm.outcomes();
    let vcpu_failures = u64::from(a.vcpus)
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
    let guest_bad_words = first_pass_bad + blocks.iter().map(|b| b.bad_words).sum::<u64>();
    let driver_errors =
        (vm.balloon_driver_errors().len() as u64).max(u64::from(st.error.is_some()));
    let (dev_counters, device_errors) = match vm.balloon() {
        Some(d) => {
            let c = d.counters();
            (c, c.errors + d.lock().errors())
        }
        None => Default::default(),
    };
    // Host-side: the whole workload RAM holds the pattern, no page is left
    // in the balloon (only when the guest stopped cleanly: a vCPU still
    // rewriting would not change the outcome, but a stall might leave pages
    // ballooned on purpose).
    let final_bad_words = if stalls == 0 {
        vm.check_pattern(WORKLOAD_START, mem.bytes())
            .context("host-side pattern check")?
    } else {
        0
    };
    let mut left_ballooned = 0;
    if stalls == 0 {
        for gpa in (geo.bal_lo..geo.share0_end).step_by(PAGE as usize) {
            if !matches!(table.query(Gpa(gpa)), PageState::Present { .. }) {
                left_ballooned += 1;
            }
        }
    }
    let unexpected_faults = vm.stage2().unexpected_faults();
    let demand_faults = vm.fault_stats().summary().faults;
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
    let rss_after_reclaim = vmm::proc_stats::rss().rss;

    let ld = |x: &AtomicU64| x.load(SeqCst);
    let stale_released = ld(&counts.stale_released);
    let stale_data = ld(&counts.stale_data);
    let use_after_free = ld(&counts.use_after_free).max(ts.use_after_free);
    let shadow_mismatches = ld(&counts.shadow_mismatches) + left_ballooned;
    let guest_errors = guest_bad_words + st.bad_words + driver_errors + vcpu_failures;
    let violations = guest_errors
        + stale_released
        + stale_data
        + use_after_free
        + shadow_mismatches
        + device_errors
        + unexpected_faults
        + final_bad_words
        + not_released
        + stalls;
    let walks = ld(&counts.walks);
    let rss_lo = ld(&rss_min);
    let j = StressVmJson {
        tool: "stress-vm",
        seconds: a.seconds,
        elapsed_s: elapsed,
        mem_bytes: a.mem,
        vcpus: a.vcpus,
        device_threads: a.device_threads,
        backing: format!("{:?}", a.backing).to_lowercase(),
        page_size: a.page_size.to_string(),
        membarrier: crate::membarrier(),
        inject: a.inject.map(Inject::name),
        cycles,
        pages_inflated: dev_counters.pages_inflated,
        pages_deflated: dev_counters.pages_deflated,
        pages_reported: dev_counters.bytes_reported / PAGE,
        driver_pages_inflated: st.inflated,
        driver_pages_deflated: st.deflated,
        driver_pages_reverified: st.reverified,
        balloon_max_pages: balloon_max,
        bytes_released: dev_counters.bytes_released,
        demand_faults,
        guest_passes: blocks.iter().map(|b| b.passes).sum(),
        guest_bad_words,
        driver_bad_words: st.bad_words,
        driver_errors,
        vcpu_failures,
        guest_errors,
        walks,
        walks_ok: ld(&counts.walks_ok),
        walks_ballooned: ld(&counts.ballooned),
        walks_discarded: ld(&counts.discarded),
        walks_per_s: walks as f64 / elapsed.max(1e-9),
        bytes_copied: ld(&counts.bytes_copied),
        stable_batches: ld(&counts.stable_batches),
        inflate_batches: ld(&counts.inflate_batches),
        teardown_walks: ld(&counts.teardown_walks),
        teardown_walks_ok: ld(&counts.teardown_walks_ok),
        injected_hits: ld(&counts.injected_hits),
        stale_released,
        stale_data,
        stale_translations: stale_released + stale_data,
        use_after_free,
        shadow_mismatches,
        device_errors,
        unexpected_faults,
        final_bad_words,
        not_released,
        stalls,
        max_lock_hold_us,
        rss_min_bytes: if rss_lo == u64::MAX { 0 } else { rss_lo },
        rss_max_bytes: ld(&rss_max),
        rss_after_reclaim_bytes: rss_after_reclaim,
        tables_freed: ts.tables_freed,
        table_pages_end: ts.table_pages,
        violations,
        ok: violations == 0,
    };
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
        "device walks {:>12} ({} ok, {} ballooned, {} discarded, {:.2} M/s, {} copied; batches {} stable, {} inside an inflate); teardown {} ({} ok)\n",
        j.walks,
        j.walks_ok,
        j.walks_ballooned,
        j.walks_discarded,
        j.walks_per_s / 1e6,
        human_bytes(j.bytes_copied),
        j.stable_batches,
        j.inflate_batches,
        j.teardown_walks,
        j.teardown_walks_ok
    );
    h += &format!(
        "table        max lock hold {:.1} us, {} demand faults, {} table pages freed at \
         teardown, {} left\n",
        j.max_lock_hold_us, j.demand_faults, j.tables_freed, j.table_pages_end
    );
    h += &format!(
        "rss          min {}, max {}, after reclaim {} (reclaim {:.1} ms)\n",
        human_bytes(j.rss_min_bytes),
        human_bytes(j.rss_max_bytes),
        human_bytes(j.rss_after_reclaim_bytes),
        reclaimed.reclaim_ms
    );
    h += &format!(
        "violations   {:>12} (guest errors {}, stale {} = released {} + data {}, use-after-free {}, \
         shadow mismatches {}, device errors {}, unexpected faults {}, final bad words {}, \
         not released {}, stalls {})\n",
        j.violations,
        j.guest_errors,
        j.stale_translations,
        j.stale_released,
        j.stale_data,
        j.use_after_free,
        j.shadow_mismatches,
        j.device_errors,
        j.unexpected_faults,
        j.final_bad_words,
        j.not_released,
        j.stalls
    );
    if violations > 0 || !all_done {
        h += &format!("vCPU outcomes: {outcomes:?}\nlast console lines:\n{console_tail}\n");
    }
    crate::say(a.json, &h);
    crate::emit_json(a.json, &j)?;
    let _ = std::io::stderr().flush();
    if violations > 0 {
        bail!("{violations} violations");
    }
    Ok(())
}

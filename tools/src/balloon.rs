//! `gmm bench balloon`: inflating a virtio-balloon through the real device
//! path against madvise baselines measured in the same run.
//!
//! A [`vmm::Vm`] with a balloon is built (no vCPU is run); the bench plays
//! the guest driver, like the tests' driver: it writes the virtqueues and
//! the PFN arrays into guest RAM through the stage-2 fast walk and issues
//! the virtio-mmio register accesses directly on the device object. The
//! pages are touched first, then inflated (contiguous PFNs, or every other
//! page in a shuffled order with a fixed seed), `--per-chain` PFNs per
//! descriptor (Linux sends 256) and up to a queue's worth of chains per
//! notify. `inflate_ms` runs from the first notify to the last used buffer.
//!
//! Baselines on an equally touched plain anonymous mapping:
//! `madvise_ms` is one `MADV_DONTNEED` per coalesced run of the same PFNs
//! (the runs are computed untimed), `per_page_ms` one `madvise` per 4 KiB
//! page (Cloud Hypervisor's pattern). Each repetition uses a fresh VM and
//! a fresh mapping; medians are reported. `mincore` must show every
//! inflated page gone after every strategy.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use guest_mm::PageSize as Leaf;
use serde::Serialize;
use vmm::devices::virtio::balloon::{Balloon, BalloonConfig, MAX_PFNS_PER_CHAIN};
use vmm::devices::virtio::mmio::{VirtioMmio, F_VERSION_1};
use vmm::devices::virtio::BusDevice;
use vmm::{Backing, GuestAccess, MemSize, PageSize, Vm, VmConfig, Workload};

use crate::mem::{AnonRegion, PAGE};
use crate::rng::{median, round, Rng};
use crate::units::human_bytes;

const MIB: u64 = 1 << 20;
/// Idle time before each timed section.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(50);

/// Options of `gmm bench balloon`.
#[derive(clap::Args, Debug)]
pub struct BalloonArgs {
    /// Bytes to inflate (e.g. 32M, 512M, 2G).
    #[arg(long, default_value = "512M", value_parser = crate::units::parse_size)]
    pub size: u64,
    /// PFN order: contiguous, or every other page shuffled (fixed seed).
    #[arg(long, value_enum, default_value_t = Pattern::Contiguous)]
    pub pattern: Pattern,
    /// Guest RAM leaf size: 4K or 2M (THP-backed).
    #[arg(long, default_value = "4K", value_parser = crate::units::parse_leaf)]
    pub page_size: Leaf,
    /// PFNs per descriptor (Linux sends 256).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=MAX_PFNS_PER_CHAIN))]
    pub per_chain: u64,
    /// Repetitions of each strategy (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub reps: u32,
    /// Seed of the scattered order.
    #[arg(long, default_value_t = 0xba11_0011)]
    pub seed: u64,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// PFN order.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// One run of consecutive pages.
    Contiguous,
    /// Every other page, in a shuffled order.
    Scattered,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Contiguous => "contiguous",
            Pattern::Scattered => "scattered",
        }
    }
}

/// The result.
#[derive(Serialize, Debug)]
struct BalloonResult {
    tool: &'static str,
    pattern: &'static str,
    size_bytes: u64,
    /// 4 KiB pages inflated.
    pages: u64,
    /// Coalesced runs of the PFNs.
    runs: u64,
    page_size: String,
    vm_mem_bytes: u64,
    per_chain: u64,
    notifies: u64,
    reps: u32,
    membarrier: bool,
    /// Median first notify → last used buffer.
    inflate_ms: f64,
    /// Median of the device's own release time (arm + gather), summed over
    /// the notifies of one inflate.
    device_release_ms: f64,
    /// Median one madvise per coalesced run.
    madvise_ms: f64,
    /// Median one madvise per 4 KiB page.
    per_page_ms: f64,
    /// madvise_ms / inflate_ms: the inflate's page rate relative to the
    /// per-run madvise rate (1.0 = as fast; higher = faster).
    inflate_rate_vs_madvise: f64,
    /// per_page_ms / inflate_ms: the inflate's rate relative to per-page
    /// madvise.
    inflate_rate_vs_per_page: f64,
    /// Process RSS drop across the inflate (median).
    rss_drop_bytes: u64,
    /// Inflated bytes still resident after the inflate (worst rep).
    resident_after_inflate: u64,
    resident_after_madvise: u64,
    resident_after_per_page: u64,
    /// Device errors over all repetitions.
    device_errors: u64,
    /// Every strategy brought every inflated page back, the device counted
    /// every page, and no errors.
    released_ok: bool,
    inflate_ms_all: Vec<f64>,
    madvise_ms_all: Vec<f64>,
    per_page_ms_all: Vec<f64>,
}

// virtio-mmio register offsets (virtio 1.x, §4.2.2).
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
const QUEUE_NOTIFY: u64 = 0x50;
const STATUS: u64 = 0x70;
const QUEUE_DESC_LOW: u64 = 0x80;
const QUEUE_AVAIL_LOW: u64 = 0x90;
const QUEUE_USED_LOW: u64 = 0xa0;

const QSIZE: u16 = 256;
/// Inflate queue index.
const INFLATEQ: u32 = 0;

/// A minimal host-side balloon driver: inflateq and deflateq, rings at
/// `area` (16 KiB each), PFN arrays from `area + 64 KiB`.
struct Driver {
    dev: Arc<VirtioMmio<Balloon>>,
    mem: GuestAccess,
    area: u64,
    avail_idx: u16,
}

/// Bytes of guest RAM the driver uses (rings + one queue's worth of the
/// largest PFN arrays).
const AREA: u64 = 0x1_0000 + QSIZE as u64 * MAX_PFNS_PER_CHAIN * 4;

impl Driver {
    fn new(vm: &Vm, area: u64) -> Result<Self> {
        let dev = Arc::clone(vm.balloon().context("VM has no balloon")?);
        Ok(Self {
            dev,
            mem: vm.stage2().access(),
            area,
            avail_idx: 0,
        })
    }

    fn w32(&self, off: u64, v: u32) {
        self.dev.write(off, &v.to_le_bytes());
    }

    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn ring(&self, q: u32) -> (u64, u64, u64) {
        let base = self.area + u64::from(q) * 0x4000;
        (base, base + 0x1000, base + 0x2000)
    }

    /// Reset, VERSION_1 only, both queues, DRIVER_OK.
    fn init(&mut self) -> Result<()> {
        self.w32(STATUS, 0);
        self.w32(STATUS, 1);
        self.w32(STATUS, 3);
        self.w32(DRIVER_FEATURES_SEL, 0);
        self.w32(DRIVER_FEATURES, F_VERSION_1 as u32);
        self.w32(DRIVER_FEATURES_SEL, 1);
        self.w32(DRIVER_FEATURES, (F_VERSION_1 >> 32) as u32);
        self.w32(STATUS, 0xb);
        for q in 0..2u32 {
            let (desc, avail, used) = self.ring(q);
            self.mem
                .write(desc, &[0u8; 0x4000])
                .map_err(|e| anyhow::anyhow!("clearing rings: {e:?}"))?;
            self.w32(QUEUE_SEL, q);
            self.w32(QUEUE_NUM, u32::from(QSIZE));
            for (reg, a) in [
                (QUEUE_DESC_LOW, desc),
                (QUEUE_AVAIL_LOW, avail),
                (QUEUE_USED_LOW, used),
            ] {
                self.w32(reg, a as u32);
                self.w32(reg + 4, (a >> 32) as u32);
            }
            self.w32(QUEUE_READY, 1);
        }
        self.w32(STATUS, 0xf);
        let s = self.r32(STATUS);
        if s != 0xf {
            bail!("balloon refused the driver (status {s:#x})");
        }
        Ok(())
    }

    fn write(&mut self, gpa: u64, b: &[u8]) -> Result<()> {
        self.mem
            .write(gpa, b)
            .map_err(|e| anyhow::anyhow!("guest write at {gpa:#x}: {e:?}"))
    }

    fn used_idx(&mut self) -> Result<u16> {
        let (_, _, used) = self.ring(INFLATEQ);
        let mut b = [0u8; 2];
        self.mem
            .read(used + 2, &mut b)
            .map_err(|e| anyhow::anyhow!("used idx: {e:?}"))?;
        Ok(u16::from_le_bytes(b))
    }

    /// Writes the PFN arrays and descriptors of one batch (untimed) and
    /// the available-ring entries; returns the new available index,
    /// not yet published.
    fn prepare(&mut self, batch: &[u32], per_chain: usize) -> Result<u16> {
        let (desc, avail, _) = self.ring(INFLATEQ);
        let mut off = self.area + 0x1_0000;
        let mut idx = self.avail_idx;
        for (i, chunk) in batch.chunks(per_chain).enumerate() {
            let bytes: Vec<u8> = chunk.iter().flat_map(|p| p.to_le_bytes()).collect();
            self.write(off, &bytes)?;
            let i = u16::try_from(i).context("too many chains")?;
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&off.to_le_bytes());
            d[8..12].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
            self.write(desc + 16 * u64::from(i), &d)?;
            let slot = u64::from(idx % QSIZE);
            self.write(avail + 4 + 2 * slot, &i.to_le_bytes())?;
            idx = idx.wrapping_add(1);
            off += bytes.len() as u64;
        }
        Ok(idx)
    }

    /// Publishes the available index and notifies.
    fn kick(&mut self, idx: u16) -> Result<()> {
        let (_, avail, _) = self.ring(INFLATEQ);
        self.write(avail + 2, &idx.to_le_bytes())?;
        self.avail_idx = idx;
        self.w32(QUEUE_NOTIFY, INFLATEQ);
        Ok(())
    }
}

/// Sorted PFNs → `(first, count)` runs.
fn runs_of(pfns: &[u32]) -> Vec<(u64, u64)> {
    let mut v: Vec<u64> = pfns.iter().map(|&p| u64::from(p)).collect();
    v.sort_unstable();
    v.dedup();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for p in v {
        match runs.last_mut() {
            Some((s, n)) if *s + *n == p => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}

/// Resident bytes among the pages of `runs` (page numbers relative to a
/// host mapping at `host`).
fn resident_in(host: u64, first_pfn: u64, runs: &[(u64, u64)]) -> u64 {
    runs.iter()
        .map(|&(s, n)| guest_mm::stress::resident_bytes(host + (s - first_pfn) * PAGE, n * PAGE))
        .sum()
}

struct InflateRun {
    ms: f64,
    device_ms: f64,
    rss_drop: u64,
    resident_after: u64,
    errors: u64,
    pages_counted: u64,
    notifies: u64,
}

fn inflate_once(
    a: &BalloonArgs,
    mem_bytes: u64,
    base: u64,
    span: u64,
    pfns: &[u32],
) -> Result<InflateRun> {
    let mut c = VmConfig::new(MemSize::from_bytes(mem_bytes).context("VM size")?);
    c.backing = Backing::Anon;
    c.page_size = if a.page_size == Leaf::Size4K {
        PageSize::Size4K
    } else {
        PageSize::Size2M
    };
    c.workload = Workload::Verify;
    c.balloon = Some(BalloonConfig::default());
    let vm = Vm::new(c).context("creating the VM (is /dev/kvm usable?)")?;
    let region = vm.memory().regions()[0];
    if !region.contains(base, span) {
        bail!("inflated range is not inside the VM's first RAM region");
    }
    let host = region.host_addr as u64 + (base - region.gpa.0);
    let mut d = Driver::new(&vm, 4 * MIB)?;
    d.init()?;
    // Touch the range and the driver's area host-side through the fast walk.
    let mut chunk = vec![0u8; MIB as usize];
    let mut at = base;
    while at < base + span {
        for (i, w) in chunk.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&((at + i as u64 * 8) | 1).to_le_bytes());
        }
        d.write(at, &chunk)?;
        at += MIB;
    }
    d.write(4 * MIB + 0x1_0000, &vec![0xa5; (AREA - 0x1_0000) as usize])?;
    let runs = runs_of(pfns);
    let first_pfn = base / PAGE;
    let per_chain = a.per_chain as usize;
    let batch_len = per_chain * usize::from(QSIZE);
    let before = d.dev.counters();
    let rss0 = vmm::proc_stats::rss().rss;
    std::thread::sleep(SETTLE);
    let mut timed = std::time::Duration::ZERO;
    let mut notifies = 0;
    for batch in pfns.chunks(batch_len) {
        let idx = d.prepare(batch, per_chain)?;
        let t = Instant::now();
        d.kick(idx)?;
        // The device handles the notify synchronously; wait for the used
        // index anyway, as a driver would.
        while d.used_idx()? != idx {
            std::hint::spin_loop();
            if t.elapsed().as_secs() > 60 {
                bail!("the balloon did not return the buffers");
            }
        }
        timed += t.elapsed();
        notifies += 1;
    }
    let rss1 = vmm::proc_stats::rss().rss;
    let after = d.dev.counters();
    let resident_after = resident_in(host, first_pfn, &runs);
    drop(d);
    drop(vm);
    Ok(InflateRun {
        ms: timed.as_secs_f64() * 1e3,
        device_ms: (after.inflate_ns_total - before.inflate_ns_total) as f64 / 1e6,
        rss_drop: rss0.saturating_sub(rss1),
        resident_after,
        errors: after.errors - before.errors,
        pages_counted: after.pages_inflated - before.pages_inflated,
        notifies,
    })
}

/// One madvise per run (`per_page` false) or per page, on a fresh touched
/// mapping. Returns (ms, resident inflated bytes after).
fn baseline_once(
    a: &BalloonArgs,
    span: u64,
    pfns: &[u32],
    first_pfn: u64,
    per_page: bool,
) -> Result<(f64, u64)> {
    let r = AnonRegion::new(span, a.page_size)?;
    r.touch();
    let runs = runs_of(pfns);
    std::thread::sleep(SETTLE);
    let t = Instant::now();
    if per_page {
        for &p in pfns {
            r.dontneed((u64::from(p) - first_pfn) * PAGE, PAGE)?;
        }
    } else {
        for &(s, n) in &runs {
            r.dontneed((s - first_pfn) * PAGE, n * PAGE)?;
        }
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    Ok((ms, resident_in(r.base, first_pfn, &runs)))
}

pub fn cmd(a: &BalloonArgs) -> Result<()> {
    if a.size == 0 || !a.size.is_multiple_of(2 * MIB) {
        bail!("--size must be a positive multiple of 2M");
    }
    // The inflated range starts at 16 MiB (the driver's area is at 4 MiB).
    let base = 16 * MIB;
    let pages = a.size / PAGE;
    let span = match a.pattern {
        Pattern::Contiguous => a.size,
        Pattern::Scattered => 2 * a.size,
    };
    let mem_bytes = (base + span + 16 * MIB)
        .max(1 << 30)
        .next_multiple_of(2 * MIB);
    let first_pfn = base / PAGE;
    let mut pfns: Vec<u32> = (0..pages)
        .map(|i| {
            let p = match a.pattern {
                Pattern::Contiguous => first_pfn + i,
                Pattern::Scattered => first_pfn + 2 * i,
            };
            u32::try_from(p).expect("RAM below 16 TiB")
        })
        .collect();
    if a.pattern == Pattern::Scattered {
        Rng::new(a.seed).shuffle(&mut pfns);
    }
    let nruns = runs_of(&pfns).len() as u64;
    crate::say(
        a.json,
        &format!(
            "bench balloon: inflate {} ({pages} pages, {}, {nruns} runs), {} leaves, VM {}, {} PFNs/chain, {} reps\n",
            human_bytes(a.size),
            a.pattern.name(),
            a.page_size,
            human_bytes(mem_bytes),
            a.per_chain,
            a.reps
        ),
    );
    let (mut inf, mut mad, mut pp, mut dev, mut drop_) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut res_inf, mut res_mad, mut res_pp, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let mut counted_ok = true;
    let mut notifies = 0;
    let pb = crate::progress::bar(u64::from(a.reps) * 3, "balloon");
    for rep in 0..a.reps {
        // Rotate the order of the strategies each repetition.
        for k in 0..3 {
            pb.inc(1);
            match (k + rep) % 3 {
                0 => {
                    let r = inflate_once(a, mem_bytes, base, span, &pfns)?;
                    inf.push(r.ms);
                    dev.push(r.device_ms);
                    drop_.push(r.rss_drop as f64);
                    res_inf = res_inf.max(r.resident_after);
                    errors += r.errors;
                    counted_ok &= r.pages_counted == pages;
                    notifies = r.notifies;
                }
                1 => {
                    let (ms, res) = baseline_once(a, span, &pfns, first_pfn, false)?;
                    mad.push(ms);
                    res_mad = res_mad.max(res);
                }
                _ => {
                    let (ms, res) = baseline_once(a, span, &pfns, first_pfn, true)?;
                    pp.push(ms);
                    res_pp = res_pp.max(res);
                }
            }
        }
    }
    pb.finish_and_clear();
    let (inflate_ms, madvise_ms, per_page_ms) = (median(&inf), median(&mad), median(&pp));
    let rss_drop_bytes = median(&drop_) as u64;
    let released_ok = res_inf == 0 && res_mad == 0 && res_pp == 0 && errors == 0 && counted_ok;
    let ratio = |b: f64| {
        if inflate_ms > 0.0 {
            round(b / inflate_ms, 3)
        } else {
            0.0
        }
    };
    let r = BalloonResult {
        tool: "bench-balloon",
        pattern: a.pattern.name(),
        size_bytes: a.size,
        pages,
        runs: nruns,
        page_size: a.page_size.to_string(),
        vm_mem_bytes: mem_bytes,
        per_chain: a.per_chain,
        notifies,
        reps: a.reps,
        membarrier: crate::membarrier(),
        inflate_ms: round(inflate_ms, 3),
        device_release_ms: round(median(&dev), 3),
        madvise_ms: round(madvise_ms, 3),
        per_page_ms: round(per_page_ms, 3),
        inflate_rate_vs_madvise: ratio(madvise_ms),
        inflate_rate_vs_per_page: ratio(per_page_ms),
        rss_drop_bytes,
        resident_after_inflate: res_inf,
        resident_after_madvise: res_mad,
        resident_after_per_page: res_pp,
        device_errors: errors,
        released_ok,
        inflate_ms_all: inf.iter().map(|x| round(*x, 3)).collect(),
        madvise_ms_all: mad.iter().map(|x| round(*x, 3)).collect(),
        per_page_ms_all: pp.iter().map(|x| round(*x, 3)).collect(),
    };
    crate::say(
        a.json,
        &format!(
            "  inflate   {:>10.3} ms  ({} notifies; device release {:.3} ms)\n  madvise   {:>10.3} ms  (one per run)  inflate rate x{:.3}\n  per-page  {:>10.3} ms  (one per page) inflate rate x{:.3}\n  rss drop {}  released_ok {}\n",
            r.inflate_ms, r.notifies, r.device_release_ms, r.madvise_ms, r.inflate_rate_vs_madvise,
            r.per_page_ms, r.inflate_rate_vs_per_page, human_bytes(rss_drop_bytes), released_ok
        ),
    );
    crate::emit_json(a.json, &r)?;
    if !released_ok {
        bail!("memory was not released in every strategy (or the device reported errors)");
    }
    Ok(())
}

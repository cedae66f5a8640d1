//! `gmm bench balloon`: inflating a virtio-balloon through the real device
//! path against madvise baselines measured in the same run.
//!
//! A [`vmm::Vm`] with a balloon is built (no vCPU is run); the bench plays
//! the guest driver, like the tests' driver: it writes the virtqueues and
//! the PFN arrays into guest RAM through the stage-2 fast walk and issues
//! the virtio-mmio register accesses directly on the device object. The
//! pages are touched first, then inflated, `--per-chain` PFNs per
//! descriptor (Linux sends 256) and up to a queue's worth of chains per
//! notify, then deflated. `inflate_ms` and `deflate_ms` run from the first
//! notify to the last used buffer. Patterns (fixed seed):
//!
//! - `contiguous`: one run;
//! - `scattered`: every other page, pages shuffled: isolated single pages,
//!   where nothing coalesces (the worst case);
//! - `fragmented`: runs of 1 to 32 pages with gaps of 1 to 32, the runs
//!   shuffled (a guest allocator's fragmented free memory).
//!
//! Baselines, each on equally touched memory, timing only the calls:
//! `madvise_ms` is one `MADV_DONTNEED` per coalesced run of the same PFNs
//! (the runs are computed untimed), `per_page_ms` one `madvise` per 4 KiB
//! page (Cloud Hypervisor's pattern); both on the RAM of a fresh VM (a KVM
//! memslot: every call also runs KVM's mmu_notifier, as in any VMM), and
//! as `*_plain_ms` on a plain anonymous mapping (the kernel alone). Each
//! repetition uses fresh memory; the strategies rotate; medians are
//! reported. `mincore` must show every inflated page gone after every
//! strategy, and the device must count every page inflated and deflated.
//!
//! `vcpu_notify_*`: a second VM runs the embedded guest's own balloon
//! driver, which times each of its `QueueNotify` writes with `rdtsc`
//! ([`vmm::guest::balloon::notify_timing`]); the host inflates `--size`
//! (clamped to 16-64 notifies of the driver's request size, 64 MiB:
//! 1-4 GiB) and deflates it again.
//! `vcpu_notify_p99_us` is over the inflate's notifies (each one a
//! release), `vcpu_notify_p99_us_idle` over the deflate's (nothing to
//! release); cycles are converted with the TSC rate calibrated against
//! `CLOCK_MONOTONIC` (`tsc_khz`); `vcpu_notify_path` says whether the
//! device thread (ioeventfd) or the vCPU ran them. `--no-guest-notify`
//! skips this VM and leaves these fields out (`gmm bench report` does: it
//! does not use them, and the guest's first write of its RAM and its
//! touches after the deflate take ~20 s per GiB on a host that emulates
//! guest ring 0).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_mm::PageSize as Leaf;
use vmm::devices::virtio::balloon::{Balloon, BalloonConfig, MAX_PFNS_PER_CHAIN};
use vmm::devices::virtio::mmio::{VirtioMmio, F_VERSION_1};
use vmm::devices::virtio::BusDevice;
use vmm::{Backing, GuestAccess, MemSize, PageSize, Vm, VmConfig, Workload};

use crate::mem::{AnonRegion, PAGE};
use crate::rng::{median, ms, round, Rng};
use crate::schema::{BalloonGuestNotify, BalloonResult};
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
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub reps: u32,
    /// Seed of the scattered order.
    #[arg(long, default_value_t = 0xba11_0011)]
    pub seed: u64,
    /// Skip the second VM, whose embedded guest driver inflates 1-4 GiB
    /// to time its own notifies (the `vcpu_notify_*` fields, then left
    /// out): most of a short run's time (~20 s per GiB the guest first
    /// writes and later touches again).
    #[arg(long)]
    pub no_guest_notify: bool,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

/// PFN order.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// One run of consecutive pages.
    Contiguous,
    /// Every other page, in a shuffled order: isolated single pages, the
    /// worst case for coalescing.
    Scattered,
    /// Runs of 1 to 32 pages with gaps of 1 to 32 pages, the runs sent in
    /// a shuffled order (fragmented free memory, as a guest's allocator
    /// hands it to its balloon driver a run at a time).
    Fragmented,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Contiguous => "contiguous",
            Pattern::Scattered => "scattered",
            Pattern::Fragmented => "fragmented",
        }
    }

    /// The target for this pattern, as (description, met).
    fn target(self, vs_madvise: f64, vs_per_page: f64) -> (&'static str, bool) {
        match self {
            Pattern::Contiguous => (
                "inflate rate >= 0.9x madvise per coalesced run",
                vs_madvise >= 0.9,
            ),
            _ => (
                "inflate rate >= 5x one madvise per page",
                vs_per_page >= 5.0,
            ),
        }
    }
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
/// Deflate queue index.
const DEFLATEQ: u32 = 1;

/// A minimal host-side balloon driver: inflateq and deflateq, rings at
/// `area` (16 KiB each), PFN arrays from `area + 64 KiB`.
struct Driver {
    dev: Arc<VirtioMmio<Balloon>>,
    mem: GuestAccess,
    area: u64,
    avail_idx: [u16; 2],
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
            avail_idx: [0; 2],
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

    fn used_idx(&mut self, q: u32) -> Result<u16> {
        let (_, _, used) = self.ring(q);
        let mut b = [0u8; 2];
        self.mem
            .read(used + 2, &mut b)
            .map_err(|e| anyhow::anyhow!("used idx: {e:?}"))?;
        Ok(u16::from_le_bytes(b))
    }

    /// Writes the PFN arrays and descriptors of one batch (untimed) and
    /// the available-ring entries; returns the new available index,
    /// not yet published.
    fn prepare(&mut self, q: u32, batch: &[u32], per_chain: usize) -> Result<u16> {
        let (desc, avail, _) = self.ring(q);
        let mut off = self.area + 0x1_0000;
        let mut idx = self.avail_idx[q as usize];
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
    fn kick(&mut self, q: u32, idx: u16) -> Result<()> {
        let (_, avail, _) = self.ring(q);
        self.write(avail + 2, &idx.to_le_bytes())?;
        self.avail_idx[q as usize] = idx;
        self.w32(QUEUE_NOTIFY, q);
        Ok(())
    }

    /// Sends `pfns` on queue `q` in queue-sized batches of `per_chain`-PFN
    /// chains; returns the time from each notify to its last used buffer
    /// (the rings and PFN arrays are written untimed) and the notifies.
    fn send(&mut self, q: u32, pfns: &[u32], per_chain: usize) -> Result<(Duration, u64)> {
        let mut timed = Duration::ZERO;
        let mut notifies = 0;
        for batch in pfns.chunks(per_chain * usize::from(QSIZE)) {
            let idx = self.prepare(q, batch, per_chain)?;
            let t = Instant::now();
            self.kick(q, idx)?;
            // The device handles the notify synchronously; wait for the
            // used index anyway, as a driver would.
            while self.used_idx(q)? != idx {
                std::hint::spin_loop();
                if t.elapsed().as_secs() > 60 {
                    bail!("the balloon did not return the buffers of queue {q}");
                }
            }
            timed += t.elapsed();
            notifies += 1;
        }
        Ok((timed, notifies))
    }
}

/// Guest PFNs → `(first, count)` runs.
fn runs_of(pfns: &[u32]) -> Vec<(u64, u64)> {
    crate::mem::runs_of(pfns.iter().map(|&p| u64::from(p)).collect())
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
    deflate_ms: f64,
    rss_drop: u64,
    resident_after: u64,
    errors: u64,
    pages_counted: u64,
    pages_deflated: u64,
    notifies: u64,
    /// Release system calls the inflate made.
    syscalls: u64,
}

/// A VM of `mem_bytes` (with a balloon when `balloon`) whose pages in
/// `[base, base + span)` were written host-side through the fast walk;
/// returns it with the host address of `base`.
/// A VM of `bytes` with anonymous RAM at the bench's leaf size, running
/// `workload`.
fn vm_config(a: &BalloonArgs, bytes: u64, workload: Workload) -> Result<VmConfig> {
    let mut c = VmConfig::new(MemSize::from_bytes(bytes).context("VM size")?);
    c.backing = Backing::Anon;
    c.page_size = if a.page_size == Leaf::Size4K {
        PageSize::Size4K
    } else {
        PageSize::Size2M
    };
    c.workload = workload;
    Ok(c)
}

fn touched_vm(
    a: &BalloonArgs,
    mem_bytes: u64,
    base: u64,
    span: u64,
    balloon: bool,
) -> Result<(Vm, u64)> {
    let mut c = vm_config(a, mem_bytes, Workload::Verify)?;
    c.balloon = balloon.then(BalloonConfig::default);
    let vm = Vm::new(c).context("creating the VM (is /dev/kvm usable?)")?;
    let region = vm.memory().regions()[0];
    if !region.contains(base, span) {
        bail!("inflated range is not inside the VM's first RAM region");
    }
    let host = region.host_addr as u64 + (base - region.gpa.0);
    let mut mem = vm.stage2().access();
    let mut chunk = vec![0u8; MIB as usize];
    let mut at = base;
    while at < base + span {
        for (i, w) in chunk.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&((at + i as u64 * 8) | 1).to_le_bytes());
        }
        mem.write(at, &chunk)
            .map_err(|e| anyhow::anyhow!("guest write at {at:#x}: {e:?}"))?;
        at += MIB;
    }
    Ok((vm, host))
}

/// Inflates `pfns` through the device, then deflates them.
fn inflate_once(
    a: &BalloonArgs,
    mem_bytes: u64,
    base: u64,
    span: u64,
    pfns: &[u32],
) -> Result<InflateRun> {
    let (vm, host) = touched_vm(a, mem_bytes, base, span, true)?;
    let mut d = Driver::new(&vm, 4 * MIB)?;
    d.init()?;
    d.write(4 * MIB + 0x1_0000, &vec![0xa5; (AREA - 0x1_0000) as usize])?;
    let runs = runs_of(pfns);
    let first_pfn = base / PAGE;
    let per_chain = a.per_chain as usize;
    let before = d.dev.counters();
    let calls0 = vm.stage2().table().stats().release_calls;
    let rss0 = vmm::proc_stats::rss().rss;
    std::thread::sleep(SETTLE);
    let (timed, notifies) = d.send(INFLATEQ, pfns, per_chain)?;
    let rss1 = vmm::proc_stats::rss().rss;
    let after = d.dev.counters();
    let syscalls = vm.stage2().table().stats().release_calls - calls0;
    let resident_after = resident_in(host, first_pfn, &runs);
    // Deflate the same pages (they fault back in on their next touch).
    let (deflate, _) = d.send(DEFLATEQ, pfns, per_chain)?;
    let end = d.dev.counters();
    drop(d);
    drop(vm);
    Ok(InflateRun {
        ms: ms(timed),
        device_ms: (after.inflate_ns_total - before.inflate_ns_total) as f64 / 1e6,
        deflate_ms: ms(deflate),
        rss_drop: rss0.saturating_sub(rss1),
        resident_after,
        errors: end.errors - before.errors,
        pages_counted: after.pages_inflated - before.pages_inflated,
        pages_deflated: end.pages_deflated - after.pages_deflated,
        notifies,
        syscalls,
    })
}

/// Where a baseline's madvise calls go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum On {
    /// The RAM of a fresh VM (a KVM memslot, so every call also runs KVM's
    /// mmu_notifier, as in a real VMM).
    VmRam,
    /// A plain anonymous mapping (the kernel alone).
    Plain,
}

/// One madvise per run (`per_page` false) or per page, on equally touched
/// memory. Returns (ms, resident inflated bytes after).
#[allow(clippy::too_many_arguments)]
fn baseline_once(
    a: &BalloonArgs,
    on: On,
    mem_bytes: u64,
    base: u64,
    span: u64,
    pfns: &[u32],
    per_page: bool,
) -> Result<(f64, u64)> {
    let first_pfn = base / PAGE;
    let runs = runs_of(pfns);
    let (vm, plain, host) = match on {
        On::VmRam => {
            let (vm, host) = touched_vm(a, mem_bytes, base, span, false)?;
            (Some(vm), None, host)
        }
        On::Plain => {
            let r = AnonRegion::new(span, a.page_size)?;
            r.touch();
            let host = r.base;
            (None, Some(r), host)
        }
    };
    std::thread::sleep(SETTLE);
    let t = Instant::now();
    let calls: Box<dyn Iterator<Item = (u64, u64)>> = if per_page {
        Box::new(pfns.iter().map(|&p| (u64::from(p), 1)))
    } else {
        Box::new(runs.iter().copied())
    };
    for (s, n) in calls {
        // SAFETY: the pages lie in `[base, base + span)`, inside the VM's
        // first RAM region (checked by touched_vm) or our plain mapping,
        // both alive until the end of this function; nothing else uses
        // them (the VM's vCPUs never ran).
        unsafe { crate::mem::dontneed(host + (s - first_pfn) * PAGE, n * PAGE)? };
    }
    let took = ms(t.elapsed());
    let resident = resident_in(host, first_pfn, &runs);
    drop(vm);
    drop(plain);
    Ok((took, resident))
}

/// The PFNs to inflate, in the order the driver sends them, and the span
/// of guest RAM from `first_pfn` they cover.
fn pattern_pfns(a: &BalloonArgs, first_pfn: u64, pages: u64) -> Result<(Vec<u32>, u64)> {
    let mut rng = Rng::new(a.seed);
    let mut v: Vec<u64> = Vec::with_capacity(usize::try_from(pages)?);
    match a.pattern {
        Pattern::Contiguous => v.extend((0..pages).map(|i| first_pfn + i)),
        Pattern::Scattered => v.extend((0..pages).map(|i| first_pfn + 2 * i)),
        Pattern::Fragmented => {
            let mut runs = Vec::new();
            let (mut p, mut n) = (first_pfn, 0);
            while n < pages {
                let run = (1 + rng.below(32)).min(pages - n);
                runs.push((p, run));
                n += run;
                p += run + 1 + rng.below(32);
            }
            rng.shuffle(&mut runs);
            v.extend(runs.into_iter().flat_map(|(p, n)| p..p + n));
        }
    }
    let span = (v.iter().max().map_or(first_pfn, |&p| p + 1) - first_pfn) * PAGE;
    if a.pattern == Pattern::Scattered {
        rng.shuffle(&mut v);
    }
    let pfns = v
        .into_iter()
        .map(|p| u32::try_from(p).context("--size too large: PFNs must fit 32 bits"))
        .collect::<Result<Vec<u32>>>()?;
    Ok((pfns, span.next_multiple_of(2 * MIB)))
}

/// The TSC rate, calibrated against `CLOCK_MONOTONIC` over 100 ms (KVM
/// gives the guest the host's rate: no TSC scaling is set up).
fn tsc_khz() -> u64 {
    // SAFETY: `rdtsc` has no memory effects; every x86-64 CPU has it.
    let rdtsc = || unsafe { std::arch::x86_64::_rdtsc() };
    let (c0, t0) = (rdtsc(), Instant::now());
    std::thread::sleep(Duration::from_millis(100));
    let (c1, t1) = (rdtsc(), t0.elapsed());
    let khz = (c1.wrapping_sub(c0)) as f64 / t1.as_secs_f64() / 1e3;
    khz.round() as u64
}

/// The `p`-th percentile (nearest rank) of `cycles`, in µs.
fn percentile_us(cycles: &[u64], p: f64, khz: u64) -> f64 {
    if cycles.is_empty() || khz == 0 {
        return 0.0;
    }
    let mut v = cycles.to_vec();
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    round(v[rank.min(v.len()) - 1] as f64 * 1e3 / khz as f64, 2)
}

/// Boots a guest running its own balloon driver, inflates `bytes` (clamped
/// to 16-64 requests of the driver's size: it keeps the last 64 samples per
/// queue) and deflates again, and reads the driver's timing of its
/// notify writes: inflate notifies carry releases, deflate ones do not.
fn guest_notify(a: &BalloonArgs) -> Result<BalloonGuestNotify> {
    use vmm::guest::balloon::DriverState;
    let request = vmm::guest::balloon::MAX_PFNS * PAGE;
    let bytes = a.size.clamp(16 * request, 64 * request);
    let pages = bytes / PAGE;
    let mut c = vm_config(a, bytes + 128 * MIB, Workload::Balloon)?;
    c.console = vmm::Console::Null;
    c.balloon = Some(BalloonConfig::default());
    let mut vm = Vm::new(c).context("creating the VM (is /dev/kvm usable?)")?;
    vm.start().context("starting the vCPU")?;
    let timeout = Duration::from_secs(60);
    let (st, ok) = vm.wait_balloon_driver(timeout, |s| s.state == DriverState::Running)?;
    if !ok {
        bail!("the guest balloon driver did not start: {st:?}");
    }
    let t0 = vm.balloon_notify_times()?;
    vm.set_balloon_target(u32::try_from(pages).context("pages fit u32")?)?;
    let (st, ok) = vm.wait_balloon_driver(timeout, |s| s.pages == pages)?;
    if !ok {
        bail!("the guest did not inflate {pages} pages: {st:?}");
    }
    let t1 = vm.balloon_notify_times()?;
    vm.set_balloon_target(0)?;
    let (st, ok) = vm.wait_balloon_driver(timeout, |s| s.pages == 0)?;
    if !ok {
        bail!("the guest did not deflate: {st:?}");
    }
    let t2 = vm.balloon_notify_times()?;
    let path = format!("{:?}", vm.balloon_notify_path());
    vm.finish_probes()?;
    let _ = vm.destroy().wait_reclaim();
    let khz = tsc_khz();
    let busy = t1[0].since(t0[0].count);
    let idle = t2[1].since(t1[1].count);
    let max = |v: &[u64]| percentile_us(v, 100.0, khz);
    Ok(BalloonGuestNotify {
        vcpu_notify_p99_us: percentile_us(busy, 99.0, khz),
        vcpu_notify_p50_us: percentile_us(busy, 50.0, khz),
        vcpu_notify_max_us: max(busy),
        vcpu_notify_count: t1[0].count - t0[0].count,
        vcpu_notify_bytes: bytes,
        vcpu_notify_p99_us_idle: percentile_us(idle, 99.0, khz),
        vcpu_notify_p50_us_idle: percentile_us(idle, 50.0, khz),
        vcpu_notify_max_us_idle: max(idle),
        vcpu_notify_count_idle: t2[1].count - t1[1].count,
        tsc_khz: khz,
        vcpu_notify_path: path,
    })
}

/// The strategies, rotated each repetition.
const STRATEGIES: [(&str, Option<(On, bool)>); 5] = [
    ("inflate", None),
    ("madvise", Some((On::VmRam, false))),
    ("per-page", Some((On::VmRam, true))),
    ("madvise plain", Some((On::Plain, false))),
    ("per-page plain", Some((On::Plain, true))),
];

pub fn cmd(a: &BalloonArgs) -> Result<()> {
    if a.size == 0 || !a.size.is_multiple_of(2 * MIB) {
        bail!("--size must be a positive multiple of 2M");
    }
    // The inflated range starts at 32 MiB (the driver's area is at 4 MiB,
    // AREA long).
    let base = 32 * MIB;
    let pages = a.size / PAGE;
    let first_pfn = base / PAGE;
    let (pfns, span) = pattern_pfns(a, first_pfn, pages)?;
    let mem_bytes = (base + span + 16 * MIB)
        .max(1 << 30)
        .next_multiple_of(2 * MIB);
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
    let n = STRATEGIES.len();
    let mut ms: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut resident = vec![0u64; n];
    let (mut dev, mut defl, mut drop_) = (vec![], vec![], vec![]);
    let mut errors = 0u64;
    let mut counted_ok = true;
    let (mut notifies, mut syscalls) = (0, 0);
    let pb = crate::progress::bar(u64::from(a.reps) * n as u64, "balloon");
    for rep in 0..a.reps as usize {
        for k in 0..n {
            let i = (k + rep) % n;
            pb.set_message(STRATEGIES[i].0);
            let (t, res) = match STRATEGIES[i].1 {
                None => {
                    let r = inflate_once(a, mem_bytes, base, span, &pfns)?;
                    dev.push(r.device_ms);
                    defl.push(r.deflate_ms);
                    drop_.push(r.rss_drop as f64);
                    errors += r.errors;
                    counted_ok &= r.pages_counted == pages && r.pages_deflated == pages;
                    notifies = r.notifies;
                    syscalls = r.syscalls;
                    (r.ms, r.resident_after)
                }
                Some((on, per_page)) => {
                    baseline_once(a, on, mem_bytes, base, span, &pfns, per_page)?
                }
            };
            ms[i].push(t);
            resident[i] = resident[i].max(res);
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let guest = if a.no_guest_notify {
        None
    } else {
        Some(guest_notify(a).context("timing the guest driver's notifies")?)
    };
    let med: Vec<f64> = ms.iter().map(|v| median(v)).collect();
    let inflate_ms = med[0];
    let rss_drop_bytes = median(&drop_) as u64;
    let released_ok = resident.iter().all(|&r| r == 0) && errors == 0 && counted_ok;
    let ratio = |b: f64| {
        if inflate_ms > 0.0 {
            round(b / inflate_ms, 3)
        } else {
            0.0
        }
    };
    let (target, target_met) = a.pattern.target(ratio(med[1]), ratio(med[2]));
    let all = |v: &[f64]| v.iter().map(|x| round(*x, 3)).collect::<Vec<f64>>();
    let r = BalloonResult {
        tool: "bench-balloon".into(),
        pattern: a.pattern.name().into(),
        size_bytes: a.size,
        pages,
        runs: nruns,
        page_size: a.page_size.to_string(),
        vm_mem_bytes: mem_bytes,
        per_chain: a.per_chain,
        notifies,
        release_syscalls: syscalls,
        reps: a.reps,
        membarrier: crate::membarrier(),
        inflate_ms: round(inflate_ms, 3),
        device_release_ms: round(median(&dev), 3),
        deflate_ms: round(median(&defl), 3),
        madvise_ms: round(med[1], 3),
        per_page_ms: round(med[2], 3),
        madvise_plain_ms: round(med[3], 3),
        per_page_plain_ms: round(med[4], 3),
        ratio_vs_madvise: ratio(med[1]),
        ratio_vs_per_page: ratio(med[2]),
        ratio_vs_madvise_plain: ratio(med[3]),
        ratio_vs_per_page_plain: ratio(med[4]),
        target: target.into(),
        target_met,
        rss_drop_bytes,
        resident_after_inflate: resident[0],
        resident_after_madvise: resident[1].max(resident[3]),
        resident_after_per_page: resident[2].max(resident[4]),
        device_errors: errors,
        released_ok,
        inflate_ms_all: all(&ms[0]),
        madvise_ms_all: all(&ms[1]),
        per_page_ms_all: all(&ms[2]),
        guest_notify: guest,
    };
    crate::say(
        a.json,
        &format!(
            "  inflate          {:>10.3} ms  ({} notifies, {} release syscalls; device release {:.3} ms; deflate {:.3} ms)\n\
             \x20 madvise          {:>10.3} ms  (one per run, VM RAM)    inflate rate x{:.3}\n\
             \x20 per-page         {:>10.3} ms  (one per page, VM RAM)   inflate rate x{:.3}\n\
             \x20 madvise plain    {:>10.3} ms  (one per run, no KVM)    inflate rate x{:.3}\n\
             \x20 per-page plain   {:>10.3} ms  (one per page, no KVM)   inflate rate x{:.3}\n\
             \x20 target: {} -> {}\n  rss drop {}  released_ok {}\n",
            r.inflate_ms, r.notifies, r.release_syscalls, r.device_release_ms, r.deflate_ms,
            r.madvise_ms, r.ratio_vs_madvise, r.per_page_ms, r.ratio_vs_per_page,
            r.madvise_plain_ms, r.ratio_vs_madvise_plain, r.per_page_plain_ms, r.ratio_vs_per_page_plain,
            target, if target_met { "met" } else { "MISSED" },
            human_bytes(rss_drop_bytes), released_ok,
        ),
    );
    if let Some(g) = &r.guest_notify {
        crate::say(
            a.json,
            &format!(
                "  guest notify     p50 {:.2} p99 {:.2} max {:.2} us ({} notifies, inflate {}); idle p50 {:.2} p99 {:.2} max {:.2} us ({} notifies); path {}\n",
                g.vcpu_notify_p50_us, g.vcpu_notify_p99_us, g.vcpu_notify_max_us,
                g.vcpu_notify_count, human_bytes(g.vcpu_notify_bytes),
                g.vcpu_notify_p50_us_idle, g.vcpu_notify_p99_us_idle, g.vcpu_notify_max_us_idle,
                g.vcpu_notify_count_idle, g.vcpu_notify_path
            ),
        );
    }
    crate::emit_json(a.json, &r)?;
    if !released_ok {
        bail!("memory was not released in every strategy (or the device reported errors)");
    }
    Ok(())
}

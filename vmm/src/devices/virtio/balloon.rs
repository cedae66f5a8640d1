//! virtio-balloon (virtio 1.2 §5.5): inflate is a stage-2 unmap through the
//! guest-mm gather.
//!
//! **Inflate.** The chains available on the inflate queue are read, in
//! batches that stop at [`MAX_PFNS_PER_BATCH`] PFNs (device-readable arrays
//! of little-endian `u32` PFNs of 4 KiB pages), every PFN is
//! checked (inside guest RAM, not below [`RamLayout::reserved_below`], where
//! the guest's page tables live), the valid ones are sorted, de-duplicated
//! and coalesced into runs, and the runs go through the VM memory's one
//! release entry point ([`VmMemory::release`] with
//! [`ReleaseMode::Balloon`]): demand faults armed on the runs (rounded out
//! to 2 MiB windows) with the VM's userfaultfd handler, so that a page that
//! comes back (deflate, free page reporting) faults in through the handler
//! and the table's sequence protocol on its next touch; then **one**
//! gather, `unmap_existing(.., UnmapMode::Balloon)` per run, then
//! `finish`. The gather clears the entries under the table lock and,
//! outside it, shoots down the translation caches, tells the KVM-side
//! subscriber, waits for a grace period and releases the backing by kind
//! (anonymous `MADV_DONTNEED`, memfd and guest_memfd punch-hole, hugetlb
//! whole huge pages only with partial tracking). The used elements are
//! returned only after the gather finished: when the driver sees its buffer
//! back, the memory is gone.
//!
//! **Deflate** turns ballooned markers of the listed pages into *discarded*
//! ones ([`guest_mm::Stage2Table::deflate`]): they fault back in (zeros) on touch.
//! **Free page reporting** takes the inflate path with
//! [`ReleaseMode::Discard`]. **Stats**: the last buffer is parsed and kept;
//! the device holds the buffer until the host asks for fresh statistics
//! ([`VirtioMmio::request_stats`]). `DEFLATE_ON_OOM` is offered and
//! reported as negotiated ([`Balloon::deflate_on_oom`]); without it, a
//! deflate that takes the balloon below the host's target is counted.
//!
//! **Bad input** (PFNs outside RAM or in the reserved low memory, arrays of
//! wrong length, duplicates, huge counts, bad descriptors, device-writable
//! buffers where the device reads) is counted in [`BalloonCounters`] and
//! logged ([`Balloon::recent_errors`]); the affected PFNs or chains are
//! skipped, the chain is still returned, and nothing outside guest RAM is
//! ever released (the table clips releases to registered backing as a
//! second line of defence).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use guest_mm::runs::{merge_runs, runs_of_sorted};
use guest_mm::{GatherStats, Gpa, GuestMemoryView};
use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;

use super::mmio::{ConfigError, MmioTransport, VirtioDevice, VirtioMmio, F_VERSION_1};
use super::queue::{
    read_chain, ChainError, ChainReadError, Desc, Discarded, Queue, QueueError, RingArea,
};
use super::RamLayout;
use crate::vstate::memory::{GuestAccess, ReleaseMode, VmMemory};

/// `VIRTIO_BALLOON_F_STATS_VQ`.
pub const F_STATS_VQ: u64 = 1 << 1;
/// `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// `VIRTIO_BALLOON_F_REPORTING`.
pub const F_REPORTING: u64 = 1 << 5;
/// Balloon pages are 4 KiB whatever the guest's page size.
pub const PFN_SHIFT: u32 = 12;
/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most PFNs one inflate/deflate chain may carry: 64 KiB of PFNs (Linux
/// sends 256; the default guest 16384, [`crate::guest::balloon::MAX_PFNS`]).
pub const MAX_PFNS_PER_CHAIN: u64 = 16384;
/// PFNs after which a batch of inflate or deflate requests stops: the
/// device pops chains until their buffers hold this many (so a batch
/// holds less than this plus one chain), releases what they list,
/// returns them, and pops again while a batch ended that way. So what a
/// driver makes the device hold at once (PFN arrays read, pages sorted:
/// 12 bytes per PFN, under 1 MiB) does not grow with the queue's size (a
/// queue's worth of the largest chains would be 48 MiB).
pub const MAX_PFNS_PER_BATCH: u64 = 4 * MAX_PFNS_PER_CHAIN;
/// Nice value of the balloon's device thread: the lowest priority a thread
/// can give itself (19). Its work is giving memory back, which no vCPU
/// waits for on a busy host, and at normal priority it delayed a
/// neighbour VM's demand faults: `gmm bench interference --only balloon`
/// (2 GiB inflated beside a looping VM, 2 cores) measured the neighbour's
/// fault p99 +678 % at nice 0 and +53 % at 19 (3 rounds). `SCHED_IDLE` is
/// no better (three runs of 5 rounds each: +29/+28/+50 % against
/// +32/+55/+27 % at nice 19), and a thread cannot leave it without
/// privilege. Under a saturated host it
/// still gets its fair share of a nice-19 thread (about 1.5 % of a core
/// beside one busy normal thread), so an inflate slows down but ends.
pub const THREAD_NICE: i32 = 19;
/// Most statistics one stats buffer may carry.
pub const MAX_STATS: u64 = 64;
/// Size of one `virtio_balloon_stat` (le16 tag, le64 value, packed).
pub const STAT_SIZE: u64 = 10;
/// Size of the configuration space (num_pages, actual,
/// free_page_hint_cmd_id, poison_val).
pub const CONFIG_SIZE: u64 = 16;
/// Balloon errors kept in the log.
pub const ERROR_LOG: usize = 32;
const PAGE: u64 = 4096;
/// Times one request's buffer may be found discarded (and faulted back in)
/// before the read counts as failed.
const FAULTS_PER_CHAIN: u32 = 4;

/// Fault-in rounds one read section over `q` may take: a few per chain,
/// and some for the rings themselves.
fn fault_rounds(q: &Queue) -> usize {
    usize::from(q.size) * FAULTS_PER_CHAIN as usize + 16
}

/// One batch of inflate or deflate requests: whether any buffer was
/// returned, and whether the batch ended full ([`MAX_PFNS_PER_BATCH`]).
type BatchFn =
    fn(&mut Balloon, &mut Queue, &mut GuestAccess, &RamLayout) -> Result<(bool, bool), QueueError>;

/// Returns `heads` with 0 bytes used, in one read section; a retry after a
/// fault-in resumes after the ones already returned.
fn give_back(q: &mut Queue, mem: &mut GuestAccess, heads: &[u16]) -> Result<bool, QueueError> {
    let mut done = 0;
    let rounds = fault_rounds(q);
    mem.with_view(
        rounds,
        |m| {
            while let Some(&h) = heads.get(done) {
                q.add_used(m, h, 0)?;
                done += 1;
            }
            Ok(())
        },
        QueueError::discarded_at,
    )?;
    Ok(!heads.is_empty())
}

/// What a balloon offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Offer the stats queue.
    pub stats: bool,
    /// Offer `DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// Offer free page reporting.
    pub reporting: bool,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        Self {
            stats: true,
            deflate_on_oom: true,
            reporting: true,
        }
    }
}

/// A guest request the balloon refused (counted; the device goes on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BalloonError {
    /// A refused descriptor chain.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// A chain that could not be read.
    #[error(transparent)]
    Read(#[from] ChainReadError),
    /// A PFN array whose length is not a multiple of 4 bytes.
    #[error("PFN array of {len} bytes is not a whole number of 32-bit PFNs")]
    PfnLength {
        /// Bytes.
        len: usize,
    },
    /// A PFN outside guest RAM or in the reserved low memory.
    #[error("PFN {pfn:#x} (GPA {gpa:#x}) is not releasable guest RAM")]
    BadPfn {
        /// The PFN.
        pfn: u32,
        /// Its address.
        gpa: u64,
    },
    /// A reported free range outside releasable RAM or smaller than a page.
    #[error("reported range {addr:#x} + {len:#x} is not releasable guest RAM")]
    BadReport {
        /// Address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A device-readable buffer on the reporting queue.
    #[error("reported range in descriptor {index} is device-readable; reports are device-writable buffers")]
    ReportReadOnly {
        /// Descriptor.
        index: u16,
    },
    /// A stats buffer that is not a whole number of statistics.
    #[error("stats buffer of {len} bytes is not a whole number of 10-byte statistics")]
    StatsLength {
        /// Bytes.
        len: usize,
    },
    /// The release itself failed (arming the fault handler, the unmap or
    /// the host's release).
    #[error("releasing ballooned memory failed: {0}")]
    Release(String),
}

/// Counters of a balloon.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BalloonCounters {
    /// Guest errors and refused requests (all kinds).
    pub errors: u64,
    /// Refused PFNs.
    pub bad_pfns: u64,
    /// Duplicate PFNs dropped.
    pub duplicate_pfns: u64,
    /// Inflate notifications that released something.
    pub inflates: u64,
    /// 4 KiB pages put in the balloon (a PFN already in it, sent again,
    /// is not counted again).
    pub pages_inflated: u64,
    /// Pages taken out of the balloon.
    pub pages_deflated: u64,
    /// Pages deflated below the host's target without `DEFLATE_ON_OOM`.
    pub deflated_below_target: u64,
    /// Bytes discarded by free page reporting.
    pub bytes_reported: u64,
    /// Bytes of backing the gathers released.
    pub bytes_released: u64,
    /// Coalesced runs unmapped.
    pub runs: u64,
    /// Time of the last inflate's release (arm + gather), ns.
    pub last_inflate_ns: u64,
    /// Total inflate release time, ns.
    pub inflate_ns_total: u64,
    /// Time of the last whole inflate notification (read and check the
    /// PFNs, sort, coalesce, arm, gather, return the buffers), ns.
    pub last_inflate_request_ns: u64,
    /// Stats buffers received.
    pub stats_updates: u64,
}

/// One `virtio_balloon_stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BalloonStat {
    /// `VIRTIO_BALLOON_S_*` tag.
    pub tag: u16,
    /// Value.
    pub val: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// The virtio-balloon device.
pub struct Balloon {
    memory: Arc<VmMemory>,
    offered: BalloonConfig,
    num_pages: u32,
    actual: u32,
    acked: u64,
    roles: Vec<Role>,
    stats_head: Option<(usize, u16)>,
    last_stats: Option<Vec<BalloonStat>>,
    ballooned: u64,
    counters: BalloonCounters,
    recent: VecDeque<BalloonError>,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("num_pages", &self.num_pages)
            .field("actual", &self.actual)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Balloon {
    /// A balloon over the VM's guest `memory`, which it releases through.
    pub fn new(memory: Arc<VmMemory>, offered: BalloonConfig) -> Self {
        Self {
            memory,
            offered,
            num_pages: 0,
            actual: 0,
            acked: 0,
            roles: Vec::new(),
            stats_head: None,
            last_stats: None,
            ballooned: 0,
            counters: BalloonCounters::default(),
            recent: VecDeque::new(),
        }
    }

    /// The host's target, in 4 KiB pages (`num_pages`).
    pub fn target_pages(&self) -> u32 {
        self.num_pages
    }

    /// Sets the target (the caller raises the config interrupt).
    pub fn set_target_pages(&mut self, pages: u32) {
        self.num_pages = pages;
    }

    /// What the driver says it has in the balloon (`actual`).
    pub fn actual_pages(&self) -> u32 {
        self.actual
    }

    /// Pages the device has seen inflated and not deflated.
    pub fn ballooned_pages(&self) -> u64 {
        self.ballooned
    }

    /// Whether the driver negotiated `DEFLATE_ON_OOM`.
    pub fn deflate_on_oom(&self) -> bool {
        self.acked & F_DEFLATE_ON_OOM != 0
    }

    /// Whether free page reporting is on.
    pub fn reporting(&self) -> bool {
        self.acked & F_REPORTING != 0
    }

    /// Counters.
    pub fn counters(&self) -> BalloonCounters {
        self.counters
    }

    /// The last statistics the guest sent.
    pub fn last_stats(&self) -> Option<&[BalloonStat]> {
        self.last_stats.as_deref()
    }

    /// The last [`ERROR_LOG`] refused requests, oldest first.
    pub fn recent_errors(&self) -> Vec<BalloonError> {
        self.recent.iter().cloned().collect()
    }

    fn error(&mut self, e: BalloonError) {
        self.counters.errors += 1;
        if self.recent.len() == ERROR_LOG {
            self.recent.pop_front();
        }
        self.recent.push_back(e);
    }

    /// Pops chains until their buffers hold [`MAX_PFNS_PER_BATCH`] PFNs
    /// or more (at most a queue's worth), then reads their PFN arrays, in one read
    /// section (no release may run inside it); returns their heads, the
    /// PFN pages (validated, unsorted) they carried, and whether the batch
    /// ended full (more requests may be waiting).
    fn pfn_requests(
        &mut self,
        q: &mut Queue,
        mem: &mut GuestAccess,
        ram: &RamLayout,
    ) -> Result<(Vec<u16>, Vec<u64>, bool), QueueError> {
        let (mut heads, mut chains, mut pages) = (Vec::new(), Vec::new(), Vec::new());
        let mut full = false;
        let mut popped = false;
        let (mut next, mut faults) = (0, 0);
        let rounds = fault_rounds(q);
        mem.with_view(
            rounds,
            |m| {
                // All pops first (their errors are logged before the
                // reads'); a retry after a fault-in resumes where it was.
                if !popped {
                    let budget = MAX_PFNS_PER_BATCH * 4;
                    full = self.pop_all(q, m, ram, budget, &mut heads, &mut chains)?;
                    popped = true;
                }
                while let Some(c) = chains.get(next) {
                    match read_chain(m, c, MAX_PFNS_PER_CHAIN * 4) {
                        Err(ChainReadError::Discarded { gpa, .. }) if faults < FAULTS_PER_CHAIN => {
                            // Fault the page in outside the section and
                            // read this chain again.
                            faults += 1;
                            let area = RingArea::Buffer;
                            return Err(Discarded { area, gpa }.into());
                        }
                        Ok(bytes) => self.pfns(&bytes, ram, &mut pages),
                        Err(e) => self.error(e.into()),
                    }
                    (next, faults) = (next + 1, 0);
                }
                Ok(())
            },
            QueueError::discarded_at,
        )?;
        Ok((heads, pages, full))
    }

    /// Pops the available requests (at most a queue's worth) inside a
    /// read section, until the chains popped hold `budget` bytes: the
    /// heads to give back, and the chains that validated (a broken chain
    /// is counted and only given back). Returns whether the budget ended
    /// it. A retry after a fault-in continues after what was popped.
    fn pop_all(
        &mut self,
        q: &mut Queue,
        m: &GuestMemoryView<'_>,
        ram: &RamLayout,
        budget: u64,
        heads: &mut Vec<u16>,
        chains: &mut Vec<Vec<Desc>>,
    ) -> Result<bool, QueueError> {
        let bytes = |c: &[Desc]| c.iter().map(|d| u64::from(d.len)).sum::<u64>();
        let mut taken: u64 = chains.iter().map(|c| bytes(c)).sum();
        while heads.len() < usize::from(q.size) {
            if taken >= budget {
                return Ok(true);
            }
            let Some(p) = q.pop(m, ram)? else { break };
            heads.push(p.head);
            match p.chain {
                Ok(c) => {
                    taken = taken.saturating_add(bytes(&c));
                    chains.push(c);
                }
                Err(e) => self.error(e.into()),
            }
        }
        Ok(false)
    }

    /// The releasable pages of one PFN array, appended to `pages`.
    fn pfns(&mut self, bytes: &[u8], ram: &RamLayout, pages: &mut Vec<u64>) {
        if !bytes.len().is_multiple_of(4) {
            self.error(BalloonError::PfnLength { len: bytes.len() });
            return;
        }
        for c in bytes.chunks_exact(4) {
            let pfn = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            let gpa = u64::from(pfn) << PFN_SHIFT;
            if ram.releasable(gpa, PAGE) {
                pages.push(gpa);
            } else {
                self.counters.bad_pfns += 1;
                self.error(BalloonError::BadPfn { pfn, gpa });
            }
        }
    }

    /// Pops every available request in one read section (see
    /// [`Balloon::pop_all`]).
    #[allow(clippy::type_complexity)]
    fn pop_chains(
        &mut self,
        q: &mut Queue,
        mem: &mut GuestAccess,
        ram: &RamLayout,
    ) -> Result<(Vec<u16>, Vec<Vec<Desc>>), QueueError> {
        let (mut heads, mut chains) = (Vec::new(), Vec::new());
        let rounds = fault_rounds(q);
        mem.with_view(
            rounds,
            |m| {
                self.pop_all(q, m, ram, u64::MAX, &mut heads, &mut chains)
                    .map(|_| ())
            },
            QueueError::discarded_at,
        )?;
        Ok((heads, chains))
    }

    /// The maximal runs of `pages`, which are sorted here in place (linear
    /// when a guest lists them in order): a repeated PFN joins its run once
    /// and is counted in [`BalloonCounters::duplicate_pfns`].
    fn runs(&mut self, pages: &mut [u64]) -> Vec<(u64, u64)> {
        pages.sort_unstable();
        let mut runs = Vec::new();
        self.counters.duplicate_pfns += runs_of_sorted(pages, PAGE, &mut runs);
        runs
    }

    /// Releases `runs` through the VM memory's one entry point (demand
    /// faults armed, then one gather leaving `mode` markers).
    fn release(&self, runs: &[(u64, u64)], mode: ReleaseMode) -> Result<GatherStats, BalloonError> {
        self.memory
            .release(runs, mode)
            .map_err(|e| BalloonError::Release(e.to_string()))
    }

    /// Serves an inflate or deflate queue with `batch` until a batch ends
    /// short of [`MAX_PFNS_PER_BATCH`]; whether any buffer was returned.
    fn batches(
        &mut self,
        q: &mut Queue,
        mem: &mut GuestAccess,
        ram: &RamLayout,
        batch: BatchFn,
    ) -> Result<bool, QueueError> {
        let mut returned = false;
        loop {
            let (r, full) = batch(self, q, mem, ram)?;
            returned |= r;
            if !full {
                return Ok(returned);
            }
        }
    }

    /// One batch of inflate requests; whether any buffer was returned and
    /// whether the batch ended full.
    fn inflate_batch(
        &mut self,
        q: &mut Queue,
        mem: &mut GuestAccess,
        ram: &RamLayout,
    ) -> Result<(bool, bool), QueueError> {
        let t0 = Instant::now();
        let (heads, mut pages, full) = self.pfn_requests(q, mem, ram)?;
        let runs = self.runs(&mut pages);
        if !runs.is_empty() {
            let t = Instant::now();
            match self.release(&runs, ReleaseMode::Balloon) {
                Ok(st) => {
                    let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    let c = &mut self.counters;
                    c.inflates += 1;
                    c.pages_inflated += st.ballooned_pages;
                    c.bytes_released += st.released_bytes;
                    c.runs += runs.len() as u64;
                    c.last_inflate_ns = ns;
                    c.inflate_ns_total += ns;
                    self.ballooned += st.ballooned_pages;
                }
                Err(e) => self.error(e),
            }
        }
        let r = give_back(q, mem, &heads);
        if !runs.is_empty() {
            self.counters.last_inflate_request_ns =
                u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        }
        r.map(|r| (r, full))
    }

    /// One batch of deflate requests; whether any buffer was returned and
    /// whether the batch ended full.
    fn deflate_batch(
        &mut self,
        q: &mut Queue,
        mem: &mut GuestAccess,
        ram: &RamLayout,
    ) -> Result<(bool, bool), QueueError> {
        let (heads, mut pages, full) = self.pfn_requests(q, mem, ram)?;
        let mut done = 0u64;
        for (s, l) in self.runs(&mut pages) {
            match self.memory.stage2().table().deflate(Gpa(s), l) {
                Ok(n) => done += n,
                Err(e) => self.error(BalloonError::Release(e.to_string())),
            }
        }
        let after = self.ballooned.saturating_sub(done);
        if !self.deflate_on_oom() && after < u64::from(self.num_pages) {
            let below = u64::from(self.num_pages) - after;
            self.counters.deflated_below_target += below.min(done);
        }
        self.ballooned = after;
        self.counters.pages_deflated += done;
        give_back(q, mem, &heads).map(|r| (r, full))
    }

    fn report(
        &mut self,
        q: &mut Queue,
        mem: &mut GuestAccess,
        ram: &RamLayout,
    ) -> Result<bool, QueueError> {
        let (heads, chains) = self.pop_chains(q, mem, ram)?;
        let mut ranges = Vec::new();
        for d in chains.into_iter().flatten() {
            if !d.write_only {
                self.error(BalloonError::ReportReadOnly { index: d.index });
                continue;
            }
            // Only whole pages inside the buffer. (The chain was checked to
            // lie in RAM; the arithmetic does not rely on it.)
            let start = d.addr.checked_next_multiple_of(PAGE);
            let end = d
                .addr
                .checked_add(u64::from(d.len))
                .map(|e| e & !(PAGE - 1));
            let (Some(start), Some(end)) = (start, end) else {
                self.error(BalloonError::BadReport {
                    addr: d.addr,
                    len: d.len,
                });
                continue;
            };
            if end <= start || !ram.releasable(start, end - start) {
                self.error(BalloonError::BadReport {
                    addr: d.addr,
                    len: d.len,
                });
                continue;
            }
            ranges.push((start, end - start));
        }
        let runs = merge_runs(ranges);
        if !runs.is_empty() {
            match self.release(&runs, ReleaseMode::Discard) {
                Ok(st) => {
                    self.counters.bytes_reported += runs.iter().map(|r| r.1).sum::<u64>();
                    self.counters.bytes_released += st.released_bytes;
                    self.counters.runs += runs.len() as u64;
                }
                Err(e) => self.error(e),
            }
        }
        give_back(q, mem, &heads)
    }

    /// Serves the stats queue in one read section: keeps the newest
    /// buffer, returns older ones and refused ones.
    fn stats(
        &mut self,
        index: usize,
        q: &mut Queue,
        mem: &mut GuestAccess,
        ram: &RamLayout,
    ) -> Result<bool, QueueError> {
        let mut returned = false;
        let mut owed: VecDeque<u16> = VecDeque::new();
        let (mut popped, mut faults) = (0u16, 0);
        let rounds = fault_rounds(q);
        mem.with_view(
            rounds,
            |m| {
                loop {
                    // What is owed first: a retry resumes here.
                    while let Some(&h) = owed.front() {
                        q.add_used(m, h, 0)?;
                        owed.pop_front();
                        returned = true;
                    }
                    if popped >= q.size {
                        return Ok(());
                    }
                    let mark = q.mark();
                    let Some(p) = q.pop(m, ram)? else {
                        return Ok(());
                    };
                    let parsed = p
                        .chain
                        .map_err(BalloonError::from)
                        .and_then(|c| Ok(read_chain(m, &c, MAX_STATS * STAT_SIZE)?))
                        .and_then(|b| parse_stats(&b));
                    if let Err(BalloonError::Read(ChainReadError::Discarded { gpa, .. })) = parsed {
                        if faults < FAULTS_PER_CHAIN {
                            faults += 1;
                            q.rewind(mark);
                            let area = RingArea::Buffer;
                            return Err(Discarded { area, gpa }.into());
                        }
                    }
                    faults = 0;
                    popped += 1;
                    // One buffer is outstanding at a time: an older one goes back.
                    if let Some((_, old)) = self.stats_head.take() {
                        owed.push_back(old);
                    }
                    match parsed {
                        Ok(s) => {
                            self.last_stats = Some(s);
                            self.counters.stats_updates += 1;
                            self.stats_head = Some((index, p.head));
                        }
                        Err(e) => {
                            self.error(e);
                            owed.push_back(p.head);
                        }
                    }
                }
            },
            QueueError::discarded_at,
        )?;
        Ok(returned)
    }

    /// Gives the held stats buffer back so the driver refills it.
    fn return_stats(
        &mut self,
        queues: &mut [Queue],
        mem: &mut GuestAccess,
    ) -> Result<bool, QueueError> {
        let Some((i, head)) = self.stats_head.take() else {
            return Ok(false);
        };
        let Some(q) = queues.get_mut(i) else {
            return Ok(false);
        };
        let rounds = fault_rounds(q);
        mem.with_view(rounds, |m| q.add_used(m, head, 0), QueueError::discarded_at)?;
        Ok(true)
    }
}

/// The statistics of one stats buffer.
fn parse_stats(b: &[u8]) -> Result<Vec<BalloonStat>, BalloonError> {
    if !(b.len() as u64).is_multiple_of(STAT_SIZE) {
        return Err(BalloonError::StatsLength { len: b.len() });
    }
    Ok(b.chunks_exact(10)
        .map(|c| BalloonStat {
            tag: u16::from_le_bytes([c[0], c[1]]),
            val: u64::from_le_bytes([c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9]]),
        })
        .collect())
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn features(&self) -> u64 {
        let o = self.offered;
        F_VERSION_1
            | if o.stats { F_STATS_VQ } else { 0 }
            | if o.deflate_on_oom {
                F_DEFLATE_ON_OOM
            } else {
                0
            }
            | if o.reporting { F_REPORTING } else { 0 }
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let n = 2 + usize::from(self.offered.stats) + usize::from(self.offered.reporting);
        vec![QUEUE_SIZE; n]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), ConfigError> {
        let len = data.len();
        check_config_range(offset, len)?;
        if len != 4 || !offset.is_multiple_of(4) {
            return Err(ConfigError::WrongSize { offset, len });
        }
        let v = match offset {
            0 => self.num_pages,
            4 => self.actual,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
        Ok(())
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), ConfigError> {
        let len = data.len();
        check_config_range(offset, len)?;
        let Ok(v) = <[u8; 4]>::try_from(data) else {
            return Err(ConfigError::WrongSize { offset, len });
        };
        match offset {
            4 => {
                self.actual = u32::from_le_bytes(v);
                Ok(())
            }
            0 | 8 | 12 => Err(ConfigError::ReadOnly { offset }),
            _ => Err(ConfigError::WrongSize { offset, len }),
        }
    }

    fn activate(&mut self, acked: u64) {
        self.acked = acked;
        // Queues present are numbered in order, absent ones take no index.
        self.roles = vec![Role::Inflate, Role::Deflate];
        if acked & F_STATS_VQ != 0 {
            self.roles.push(Role::Stats);
        }
        if acked & F_REPORTING != 0 {
            self.roles.push(Role::Reporting);
        }
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.roles.clear();
        self.stats_head = None;
        self.actual = 0;
    }

    fn notify(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &mut GuestAccess,
        ram: &RamLayout,
    ) -> Result<bool, QueueError> {
        let (Some(&role), Some(q)) = (self.roles.get(index), queues.get_mut(index)) else {
            return Ok(false);
        };
        match role {
            Role::Inflate => self.batches(q, mem, ram, Self::inflate_batch),
            Role::Deflate => self.batches(q, mem, ram, Self::deflate_batch),
            Role::Stats => self.stats(index, q, mem, ram),
            Role::Reporting => self.report(q, mem, ram),
        }
    }
}

/// Refuses a config access of `len` bytes at `offset` that does not lie
/// inside the [`CONFIG_SIZE`]-byte config space.
fn check_config_range(offset: u64, len: usize) -> Result<(), ConfigError> {
    if offset
        .checked_add(len as u64)
        .is_none_or(|e| e > CONFIG_SIZE)
    {
        return Err(ConfigError::OutOfRange {
            offset,
            len,
            size: CONFIG_SIZE,
        });
    }
    Ok(())
}

impl VirtioMmio<Balloon> {
    /// Sets the balloon target to `pages` 4 KiB pages and raises the
    /// configuration-change interrupt bit.
    pub fn set_target_pages(&self, pages: u32) {
        let mut t = self.lock();
        t.device_mut().set_target_pages(pages);
        t.config_changed();
    }

    /// Gives the held stats buffer back so the driver sends fresh numbers.
    pub fn request_stats(&self) {
        self.lock()
            .with_queues(|d, q, mem, _| d.return_stats(q, mem));
    }

    /// The balloon's counters.
    pub fn counters(&self) -> BalloonCounters {
        self.lock().device().counters()
    }
}

/// A balloon transport, for the VM to put on its bus.
pub type BalloonTransport = MmioTransport<Balloon>;

impl BalloonTransport {
    /// A balloon offering `offered` on its virtio-mmio transport over
    /// `memory`, never releasing below `reserved_below`. This is all a
    /// balloon needs: a VM wraps it in [`VirtioMmio`] and puts it on its
    /// bus; the fuzz target (`tests/fuzz/`) and device tests drive it with
    /// register accesses alone, on guest memory made without KVM
    /// ([`VmMemory::new`] with no VM).
    pub fn balloon(memory: Arc<VmMemory>, offered: BalloonConfig, reserved_below: u64) -> Self {
        let layout = RamLayout::new(&memory.regions(), reserved_below);
        let access = memory.access();
        MmioTransport::new(Balloon::new(memory, offered), access, layout)
    }
}

//! The default guest's virtio-balloon driver ([`super::Workload::Balloon`]):
//! the low-memory pages it owns, the status block it keeps in the control
//! page, and the errors it reports.
//!
//! The driver itself is ring-3 assembly in [`super::image`]. vCPU 0 first
//! writes and verifies its share like [`super::Workload::Verify`] and
//! reports, then drives the virtio-mmio device at
//! [`crate::devices::virtio::BALLOON_MMIO_BASE`] (virtio 1.2 §4.2.3.1:
//! magic, version 2, device ID 5; reset, ACKNOWLEDGE, DRIVER, features with
//! `VIRTIO_F_VERSION_1`, and `DEFLATE_ON_OOM` and `REPORTING` if offered,
//! FEATURES_OK read back, queues 0 (inflate), 1 (deflate) and, with
//! reporting, 2 (free page reporting) of [`QUEUE_SIZE`], DRIVER_OK).
//! Then it polls `num_pages` (no interrupt controller):
//!
//! - `num_pages > actual`: inflate up to [`MAX_PFNS`] pages per request,
//!   taken from the **end** of its share counting down, as one
//!   device-readable descriptor over the PFN array; publish, notify, poll
//!   the used ring for [`super::IDLE_SPIN_CYCLES`] TSC cycles and then
//!   wait in the VMM with `OP_IDLE` between looks (the device thread wakes
//!   the vCPU whenever it returns a buffer: the vCPU does not spin on a
//!   host core while the device releases), then write `actual`;
//! - `num_pages < actual`: deflate the most recently inflated pages the same
//!   way through queue 1, then write and verify the pattern on each
//!   deflated page (each first touch faults in through the VMM's
//!   userfaultfd handler);
//! - equal: take a new control-page command, if any:
//!   [`super::control::CMD_EXIT`] leaves;
//!   [`super::control::CMD_REPORT_FREE`] reports `ARG` pages just below the
//!   balloon as free (device-writable descriptors of at most 16 MiB on the
//!   reporting queue), then touches and verifies them like deflated pages;
//!   otherwise poll again after a round of `pause`s, and once it had
//!   nothing to do for [`super::IDLE_SPIN_CYCLES`] TSC cycles, wait in the
//!   VMM with [`crate::devices::report::OP_IDLE`] before each new look (the
//!   host wakes it when it sets a target or posts a command:
//!   [`crate::vstate::vm::Vm::set_balloon_target`]). An idle driver costs
//!   no host CPU.
//!
//! Every `QueueNotify` write is timed with `rdtsc` on both sides and kept
//! per queue in the control page ([`notify_timing`], [`NotifyTimes`]): what
//! a notify costs the vCPU (`gmm bench balloon`'s `vcpu_notify_*`).
//!
//! Targets beyond the share are clamped to the share (the driver never gives
//! away memory it does not own). Driver errors are written to the status
//! block, printed, and reported with [`OP_BALLOON_ERROR`]; the vCPU then
//! stops (spins without reporting done), and the VMM ends its thread with
//! [`crate::vstate::vcpu::VcpuOutcome::BalloonDriverError`].
//!
//! Under [`super::Workload::BalloonStress`] the same driver runs, and at its
//! target with no new command it rewrites and verifies the next chunk of
//! its share below the balloon (see [`super::stress`]).

use crate::stage2::{GuestAccess, Stage2Error};

use super::layout;

/// Entries per virtqueue (a power of two; the device offers more).
pub const QUEUE_SIZE: u16 = 8;
/// Most PFNs per request: 64 MiB, in sixteen 4 KiB pages of little-endian
/// `u32`s (one descriptor). Linux sends 256; a larger request costs the
/// vCPU fewer exits per MiB (the notify, the wait, `actual`, `num_pages`;
/// on this host each return to the VMM costs the vCPU thread ~50 µs of
/// its own CPU at normal priority): 4 MiB requests had the vCPU busy ~30 %
/// of a 2 GiB inflate here, and with 16 MiB requests its 20-30 ms in a
/// 2 GiB inflate raised a neighbour VM's fault p99 by +44/+51 % where 64
/// MiB gave +27/+28 % (`gmm bench interference --only balloon`, 5 rounds
/// each).
pub const MAX_PFNS: u64 = 16384;
/// Offset of the descriptor table in a queue page.
pub const DESC_OFFSET: u64 = 0;
/// Offset of the available (driver) ring in a queue page.
pub const AVAIL_OFFSET: u64 = 0x100;
/// Offset of the used (device) ring in a queue page.
pub const USED_OFFSET: u64 = 0x200;

// The rings fit their queue page, the PFN array its page, and the device
// takes what the driver sends (checked at compile time).
const _: () = {
    let n = QUEUE_SIZE as u64;
    assert!(n.is_power_of_two());
    assert!(DESC_OFFSET + 16 * n <= AVAIL_OFFSET);
    // flags, idx, ring[n], used_event.
    assert!(AVAIL_OFFSET + 6 + 2 * n <= USED_OFFSET);
    assert!(USED_OFFSET.is_multiple_of(4));
    // flags, idx, ring[n] of (id, len), avail_event.
    assert!(USED_OFFSET + 6 + 8 * n <= 0x1000);
    assert!(MAX_PFNS * 4 == layout::BALLOON_END - layout::BALLOON_PFNS);
    assert!(MAX_PFNS <= crate::devices::virtio::balloon::MAX_PFNS_PER_CHAIN);
    assert!(QUEUE_SIZE <= crate::devices::virtio::balloon::QUEUE_SIZE);
    assert!(status::END <= 0x1000);
};

/// The queue page of queue `index` (0 inflate, 1 deflate, 2 free page
/// reporting).
pub fn queue_page(index: u64) -> u64 {
    layout::BALLOON_QUEUES + index * 0x1000
}

/// Report opcode of a driver error (rdi code, rsi detail, see
/// [`crate::devices::report`] for the protocol). The vCPU stops after it.
pub const OP_BALLOON_ERROR: u32 = 5;

/// Offsets of the driver's status block inside the control page (u64 each,
/// written by the guest only; the host reads them through the fast walk).
pub mod status {
    /// [`super::DriverState`] as a number.
    pub const STATE: u64 = 0x100;
    /// Pages in the balloon now (what the driver last wrote to `actual`).
    pub const PAGES: u64 = 0x108;
    /// Pages inflated since boot.
    pub const INFLATED: u64 = 0x110;
    /// Pages deflated since boot.
    pub const DEFLATED: u64 = 0x118;
    /// Deflated pages written and verified again by the guest.
    pub const REVERIFIED: u64 = 0x120;
    /// Words that did not read back in re-verified pages.
    pub const BAD_WORDS: u64 = 0x128;
    /// First bad GPA in a re-verified page (0: none).
    pub const FIRST_BAD: u64 = 0x130;
    /// [`super::DriverError`] code (0: none).
    pub const ERROR: u64 = 0x138;
    /// The value that made the driver fail (register read, status).
    pub const DETAIL: u64 = 0x140;
    /// The target the driver last acted on (`num_pages` clamped to the
    /// share).
    pub const TARGET: u64 = 0x148;
    /// Index + 1 of the free page reporting queue (0: not negotiated).
    pub const REPORT_QUEUE: u64 = 0x150;
    /// Pages reported free since boot.
    pub const REPORTED: u64 = 0x158;
    /// Sequence of the last control-page command the driver took.
    pub const SEQ: u64 = 0x160;
    /// Report commands ignored (reporting not negotiated).
    pub const REPORTS_REFUSED: u64 = 0x168;
    /// The driver's own: the TSC value until which it polls before it
    /// waits with `OP_IDLE` (0: it worked since it last waited).
    pub const IDLE_UNTIL: u64 = 0x170;
    /// `OP_IDLE` waits since boot.
    pub const IDLE_WAITS: u64 = 0x178;
    /// `OP_IDLE` waits for the device to return a request, since boot.
    pub const SEND_WAITS: u64 = 0x180;
    /// End of the block.
    pub const END: u64 = 0x188;
}

/// Offsets of the driver's notify timing block inside the control page:
/// the guest reads its TSC (`rdtsc`, with `lfence`) before and after each
/// `QueueNotify` write and keeps, per queue, the number of notifies, the
/// largest duration and the last [`SLOTS`](notify_timing::SLOTS) durations
/// in a ring (TSC cycles, u64 each, written by the guest only). A notify
/// write exits to the VMM, so a duration is what the vCPU lost to the
/// notify: the exit, the VMM's handling on the vCPU thread, the re-entry.
pub mod notify_timing {
    /// Queues timed (inflate, deflate, free page reporting).
    pub const QUEUES: u64 = 3;
    /// u64: notifies of queue `q` at `COUNT + 16 * q`.
    pub const COUNT: u64 = 0x800;
    /// u64: the largest duration of queue `q` at `MAX + 16 * q`.
    pub const MAX: u64 = 0x808;
    /// The ring of queue `q` at `SAMPLES + (q << RING_SHIFT)`; notify `n`
    /// (from 0) goes to slot `n % SLOTS`.
    pub const SAMPLES: u64 = 0x840;
    /// Slots per ring (a power of two).
    pub const SLOTS: u64 = 64;
    /// log2 of a ring's bytes.
    pub const RING_SHIFT: u64 = 9;
    /// End of the block.
    pub const END: u64 = SAMPLES + (QUEUES << RING_SHIFT);

    const _: () = {
        use crate::guest::{layout, stress};
        assert!(SLOTS.is_power_of_two() && SLOTS * 8 == 1 << RING_SHIFT);
        assert!(COUNT >= stress::BLOCKS + stress::BLOCK * layout::MAX_VCPUS as u64);
        assert!(MAX + 16 * (QUEUES - 1) + 8 <= SAMPLES);
        assert!(END <= 0x1000);
    };
}

/// The notify timing of one queue (see [`notify_timing`]), in TSC cycles.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct NotifyTimes {
    /// Notifies since boot.
    pub count: u64,
    /// The largest duration since boot.
    pub max_cycles: u64,
    /// The last `min(count, SLOTS)` durations, oldest first.
    pub samples: Vec<u64>,
}

impl NotifyTimes {
    /// Parses queue `q`'s record from the control page's bytes
    /// `[0, notify_timing::END)`.
    pub fn parse(page: &[u8], q: u64) -> Option<Self> {
        use notify_timing::{COUNT, MAX, RING_SHIFT, SAMPLES, SLOTS};
        if q >= notify_timing::QUEUES {
            return None;
        }
        let word = |off: u64| super::le_u64_at(page, off);
        let count = word(COUNT + 16 * q)?;
        let ring = SAMPLES + (q << RING_SHIFT);
        let first = count.saturating_sub(SLOTS);
        let samples = (first..count)
            .map(|n| word(ring + 8 * (n % SLOTS)))
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            count,
            max_cycles: word(MAX + 16 * q)?,
            samples,
        })
    }

    /// Reads every queue's record through the fast walk.
    pub fn read_all(mem: &mut GuestAccess) -> Result<Vec<Self>, Stage2Error> {
        let mut buf = [0u8; notify_timing::END as usize];
        mem.read(layout::CONTROL, &mut buf)?;
        Ok((0..notify_timing::QUEUES)
            .map(|q| {
                // The buffer covers the block, so parsing cannot fail.
                Self::parse(&buf, q).unwrap_or_else(|| unreachable!("buffer covers the block"))
            })
            .collect())
    }

    /// The samples from notify `from` (a count read earlier) on, oldest
    /// first: what the ring still holds of them.
    pub fn since(&self, from: u64) -> &[u64] {
        let held = self.samples.len() as u64;
        let first = self.count - held;
        let skip = from.saturating_sub(first).min(held);
        &self.samples[skip as usize..]
    }
}

/// Where the driver is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum DriverState {
    /// Not started (other workloads, other vCPUs, or still verifying).
    NotStarted,
    /// Initialising the device.
    Negotiating,
    /// DRIVER_OK set, following the target.
    Running,
    /// Left on `CMD_EXIT`.
    Exited,
    /// Stopped on an error.
    Failed,
    /// A value the driver never writes.
    Unknown(u64),
}

impl DriverState {
    fn from_u64(v: u64) -> Self {
        match v {
            0 => Self::NotStarted,
            1 => Self::Negotiating,
            2 => Self::Running,
            3 => Self::Exited,
            4 => Self::Failed,
            x => Self::Unknown(x),
        }
    }
}

/// Why the guest driver gave up (code in [`status::ERROR`], value in
/// [`status::DETAIL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, serde::Serialize)]
pub enum DriverError {
    /// No virtio-mmio device in the window.
    #[error("guest balloon driver: bad magic {0:#x} at the balloon window (no virtio-mmio device there: was the VM configured with a balloon?)")]
    BadMagic(u64),
    /// Not virtio-mmio version 2.
    #[error("guest balloon driver: virtio-mmio version {0}, the driver needs 2 (modern)")]
    BadVersion(u64),
    /// Not a balloon.
    #[error("guest balloon driver: device ID {0}, expected 5 (balloon)")]
    BadDeviceId(u64),
    /// The device does not offer VIRTIO_F_VERSION_1.
    #[error("guest balloon driver: device features[63:32] {0:#x} lack VIRTIO_F_VERSION_1")]
    NoVersion1(u64),
    /// FEATURES_OK did not stick.
    #[error("guest balloon driver: the device refused FEATURES_OK (status {0:#x})")]
    FeaturesRefused(u64),
    /// A queue smaller than the driver's.
    #[error("guest balloon driver: a queue's QueueNumMax is {0}, the driver needs at least 8")]
    QueueTooSmall(u64),
    /// QueueReady did not stick.
    #[error("guest balloon driver: QueueReady reads {0} after the driver set it")]
    QueueNotReady(u64),
    /// The device set NEEDS_RESET.
    #[error("guest balloon driver: the device set NEEDS_RESET (status {0:#x})")]
    NeedsReset(u64),
    /// DRIVER_OK did not stick.
    #[error("guest balloon driver: DRIVER_OK did not stick (status {0:#x})")]
    DriverOkRefused(u64),
    /// A code the driver never writes.
    #[error("guest balloon driver: unknown error code {0} (detail {1:#x})")]
    Unknown(u64, u64),
}

impl DriverError {
    /// The code the assembly writes for this error.
    pub fn code(&self) -> u64 {
        match self {
            Self::BadMagic(_) => 1,
            Self::BadVersion(_) => 2,
            Self::BadDeviceId(_) => 3,
            Self::NoVersion1(_) => 4,
            Self::FeaturesRefused(_) => 5,
            Self::QueueTooSmall(_) => 6,
            Self::QueueNotReady(_) => 7,
            Self::NeedsReset(_) => 8,
            Self::DriverOkRefused(_) => 9,
            Self::Unknown(c, _) => *c,
        }
    }

    /// The error of `code` with `detail`; `None` for 0 (no error).
    pub fn from_code(code: u64, detail: u64) -> Option<Self> {
        Some(match code {
            0 => return None,
            1 => Self::BadMagic(detail),
            2 => Self::BadVersion(detail),
            3 => Self::BadDeviceId(detail),
            4 => Self::NoVersion1(detail),
            5 => Self::FeaturesRefused(detail),
            6 => Self::QueueTooSmall(detail),
            7 => Self::QueueNotReady(detail),
            8 => Self::NeedsReset(detail),
            9 => Self::DriverOkRefused(detail),
            c => Self::Unknown(c, detail),
        })
    }
}

/// The driver's status block, as the host reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DriverStatus {
    /// Where the driver is.
    pub state: DriverState,
    /// Pages in the balloon.
    pub pages: u64,
    /// Pages inflated since boot.
    pub inflated: u64,
    /// Pages deflated since boot.
    pub deflated: u64,
    /// Deflated pages the guest wrote and verified again.
    pub reverified: u64,
    /// Bad words in them.
    pub bad_words: u64,
    /// First bad GPA.
    pub first_bad: Option<u64>,
    /// The target the driver last acted on.
    pub target: u64,
    /// Whether free page reporting was negotiated.
    pub reporting: bool,
    /// Pages reported free since boot.
    pub reported: u64,
    /// Report commands ignored because reporting was not negotiated.
    pub reports_refused: u64,
    /// Sequence of the last control-page command taken.
    pub seq: u64,
    /// Times the driver waited for work with `OP_IDLE`.
    pub idle_waits: u64,
    /// Times the driver waited with `OP_IDLE` for the device to return a
    /// request (it polls the used ring for [`super::IDLE_SPIN_CYCLES`]
    /// first).
    pub send_waits: u64,
    /// Why it failed.
    pub error: Option<DriverError>,
}

impl DriverStatus {
    /// Parses the block from the control page's bytes `[0, status::END)`.
    pub fn parse(page: &[u8]) -> Option<Self> {
        let word = |off: u64| super::le_u64_at(page, off);
        let first_bad = word(status::FIRST_BAD)?;
        Some(Self {
            state: DriverState::from_u64(word(status::STATE)?),
            pages: word(status::PAGES)?,
            inflated: word(status::INFLATED)?,
            deflated: word(status::DEFLATED)?,
            reverified: word(status::REVERIFIED)?,
            bad_words: word(status::BAD_WORDS)?,
            first_bad: (first_bad != 0).then_some(first_bad),
            target: word(status::TARGET)?,
            reporting: word(status::REPORT_QUEUE)? != 0,
            reported: word(status::REPORTED)?,
            reports_refused: word(status::REPORTS_REFUSED)?,
            seq: word(status::SEQ)?,
            idle_waits: word(status::IDLE_WAITS)?,
            send_waits: word(status::SEND_WAITS)?,
            error: DriverError::from_code(word(status::ERROR)?, word(status::DETAIL)?),
        })
    }

    /// Reads the block from guest memory through the fast walk.
    pub fn read(mem: &mut GuestAccess) -> Result<Self, Stage2Error> {
        let mut buf = [0u8; status::END as usize];
        mem.read(layout::CONTROL, &mut buf)?;
        // The buffer covers the whole block, so parsing cannot fail.
        Ok(Self::parse(&buf).unwrap_or_else(|| unreachable!("buffer covers the block")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_block_fits_the_control_page() {
        use super::super::control;
        let fields = [
            status::STATE,
            status::PAGES,
            status::INFLATED,
            status::DEFLATED,
            status::REVERIFIED,
            status::BAD_WORDS,
            status::FIRST_BAD,
            status::ERROR,
            status::DETAIL,
            status::TARGET,
            status::REPORT_QUEUE,
            status::REPORTED,
            status::SEQ,
            status::REPORTS_REFUSED,
            status::IDLE_UNTIL,
            status::IDLE_WAITS,
            status::SEND_WAITS,
        ];
        // After the command mailbox, distinct, aligned, inside the page.
        for (i, f) in fields.iter().enumerate() {
            assert!(*f > control::ARG + 8 && f.is_multiple_of(8) && *f + 8 <= status::END);
            assert_eq!(*f, status::STATE + 8 * i as u64);
        }
    }

    #[test]
    fn error_codes_round_trip() {
        for code in 1..=10 {
            let e = DriverError::from_code(code, 0x77).expect("non-zero code");
            assert_eq!(e.code(), code);
            assert!(!e.to_string().is_empty());
        }
        assert_eq!(DriverError::from_code(0, 5), None);
    }

    #[test]
    fn notify_times_parse_and_wrap() {
        use notify_timing::{COUNT, MAX, RING_SHIFT, SAMPLES, SLOTS};
        let mut page = vec![0u8; notify_timing::END as usize];
        let put = |p: &mut Vec<u8>, off: u64, v: u64| {
            let o = usize::try_from(off).unwrap();
            p[o..o + 8].copy_from_slice(&v.to_le_bytes());
        };
        // Queue 1: 70 notifies, durations 100 + n; the ring keeps 6..70.
        let ring = SAMPLES + (1 << RING_SHIFT);
        for n in 0..70 {
            put(&mut page, ring + 8 * (n % SLOTS), 100 + n);
        }
        put(&mut page, COUNT + 16, 70);
        put(&mut page, MAX + 16, 169);
        let t = NotifyTimes::parse(&page, 1).unwrap();
        assert_eq!((t.count, t.max_cycles), (70, 169));
        assert_eq!(t.samples, (106..170).collect::<Vec<_>>());
        assert_eq!(t.since(68), &[168, 169]);
        assert_eq!(t.since(0).len(), 64, "only what the ring holds");
        assert!(t.since(70).is_empty());
        let q0 = NotifyTimes::parse(&page, 0).unwrap();
        assert_eq!(q0, NotifyTimes::default());
        assert!(NotifyTimes::parse(&page, 3).is_none());
        assert!(NotifyTimes::parse(&page[..0x900], 1).is_none());
    }

    #[test]
    fn status_parses() {
        let mut page = vec![0u8; status::END as usize];
        let put = |p: &mut Vec<u8>, off: u64, v: u64| {
            let o = usize::try_from(off).unwrap();
            p[o..o + 8].copy_from_slice(&v.to_le_bytes());
        };
        put(&mut page, status::STATE, 2);
        put(&mut page, status::PAGES, 300);
        put(&mut page, status::ERROR, 8);
        put(&mut page, status::DETAIL, 0x4f);
        let s = DriverStatus::parse(&page).unwrap();
        assert_eq!(s.state, DriverState::Running);
        assert_eq!(s.pages, 300);
        assert_eq!(s.first_bad, None);
        assert_eq!(s.error, Some(DriverError::NeedsReset(0x4f)));
        assert!(DriverStatus::parse(&page[..16]).is_none());
    }
}

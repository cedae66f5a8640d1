//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2), modern only.
//!
//! A [`MmioTransport`] owns one [`VirtioDevice`], its queues and a
//! [`GuestAccess`] (the fast walk) through which everything the device does
//! to guest memory goes. [`VirtioMmio`] puts it behind a mutex on the MMIO
//! bus: vCPU threads (and tests playing the driver) call
//! [`BusDevice::read`] / [`BusDevice::write`] with offsets into the window.
//! A VM normally registers an ioeventfd per queue on `QueueNotify`
//! ([`super::thread`]): the guest's notify writes then never reach the
//! vCPU path, and the device thread calls
//! [`MmioTransport::handle_notify`] under the same lock instead; a write
//! KVM does not match (another value, no ioeventfd) still arrives here.
//!
//! **Status state machine.** Writing 0 resets the device. Otherwise the
//! driver may only add bits, and only the ones virtio defines for it
//! ([`DRIVER_STATUS_BITS`]; others are dropped and counted). `FEATURES_OK` is kept only if the driver
//! accepted a subset of what was offered that includes `VERSION_1` (the
//! driver reads it back to learn it failed). `DRIVER_OK` needs
//! `FEATURES_OK` and activates the device. `NEEDS_RESET` is set by the
//! device when the driver broke the protocol in a way the device cannot
//! recover from (an invalid queue made ready, a corrupt ring): from then on
//! notifications are ignored until the driver resets, and each one raises
//! the configuration-change bit again (a driver waiting for a buffer
//! learns at once that none will come).
//!
//! **Errors.** Every driver mistake is counted and kept in a short log
//! ([`MmioTransport::errors`], [`MmioTransport::recent_errors`]); none of
//! them panics, and none stops the VM.
//!
//! **Interrupts.** `InterruptStatus` has bit 0 (used buffers) and bit 1
//! (configuration change, also raised with `NEEDS_RESET`); `InterruptACK`
//! clears bits. With a trigger ([`MmioTransport::set_interrupt`]: an
//! eventfd the VM registers with KVM as an irqfd on the device's GSI) a
//! bit going from 0 to 1 also writes 1 to the eventfd; used buffers raise
//! bit 0 only when a queue says the driver wants it
//! ([`Queue::needs_interrupt`]: virtio-queue's `needs_notification` and
//! `VRING_AVAIL_F_NO_INTERRUPT`). A bit that is already set is not
//! signalled again: the driver has an interrupt pending and reads the
//! status, acknowledges it and only then looks at the rings (Linux's
//! `vm_interrupt`), so it sees what was added meanwhile, and an interrupt
//! that finds the status empty would be counted as unhandled. Without a
//! trigger (the embedded test guest polls `InterruptStatus` or the used
//! ring), bit 0 is set whenever used buffers are returned, and a *waker*
//! ([`MmioTransport::set_waker`]) is called each time a bit is raised,
//! whether or not it was already set: the polling driver, which never
//! acknowledges, waits in the VMM between looks (the default guest's
//! `OP_IDLE`) instead of spinning on a host core while the device works.
//!
//! **Linux's driver** (`drivers/virtio/virtio_mmio.c`, version 2) works as
//! is: 32-bit register accesses, `QueueSel` of a queue the device does not
//! have reads `QueueNumMax` 0 and `QueueReady` 0, `QueueReady` reads back
//! what was accepted, status written one bit at a time. It kicks a queue
//! during probe, before `DRIVER_OK` (the balloon's stats buffer): such a
//! notify is counted as a driver error and not served, but when `DRIVER_OK`
//! is set every ready queue is served once, so nothing published before it
//! waits for a notify that will not come.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_SHM_BASE_HIGH,
    VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_LEN_HIGH, VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_SHM_SEL, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};

use vmm_sys_util::eventfd::EventFd;

use super::queue::{LayoutError, Queue, QueueError};
use super::{BusDevice, RamLayout};
use crate::vstate::memory::GuestAccess;

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// virtio-mmio version 2 (modern).
pub const MMIO_VERSION: u32 = 2;
/// Our vendor ID ("GMM\0").
pub const VENDOR_ID: u32 = 0x004d_4d47;
/// `VIRTIO_F_VERSION_1` as a feature mask.
pub const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
/// How many driver errors [`MmioTransport::recent_errors`] keeps.
pub const ERROR_LOG: usize = 32;

/// A device-specific configuration-space access the device refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Not a width/alignment the field allows.
    #[error("config access of {len} bytes at offset {offset:#x}: fields are accessed as aligned 32-bit words")]
    WrongSize {
        /// Offset into the config space.
        offset: u64,
        /// Access width.
        len: usize,
    },
    /// Past the end of the config space.
    #[error("config access at {offset:#x} + {len} is past the {size}-byte config space")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Width.
        len: usize,
        /// Config size.
        size: u64,
    },
    /// A field only the device writes.
    #[error("config field at offset {offset:#x} is read-only for the driver")]
    ReadOnly {
        /// Offset.
        offset: u64,
    },
}

/// A driver mistake seen by the transport.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// A register access that is not an aligned 32-bit access.
    #[error(
        "register access of {len} bytes at {offset:#x}: registers take aligned 32-bit accesses"
    )]
    RegisterWidth {
        /// Offset.
        offset: u64,
        /// Width.
        len: usize,
    },
    /// A write to a read-only or unknown register.
    #[error("write to {offset:#x}, which is not a writable register")]
    NotWritable {
        /// Offset.
        offset: u64,
    },
    /// A status write with bits virtio does not define for the driver
    /// (dropped; the defined ones are taken).
    #[error(
        "status write sets bits {bits:#x} that are no driver status bits (ACKNOWLEDGE, DRIVER, \
         FEATURES_OK, DRIVER_OK, FAILED); they are ignored"
    )]
    StatusUndefined {
        /// The undefined bits written.
        bits: u32,
    },
    /// A status write that clears bits (other than a reset with 0).
    #[error("status write {new:#x} clears bits of {old:#x}; only a write of 0 (reset) may")]
    StatusCleared {
        /// Previous status.
        old: u32,
        /// Written.
        new: u32,
    },
    /// FEATURES_OK with features that were not offered or without VERSION_1.
    #[error("FEATURES_OK refused: driver features {acked:#x} are not a subset of {offered:#x} including VERSION_1")]
    BadFeatures {
        /// Accepted by the driver.
        acked: u64,
        /// Offered.
        offered: u64,
    },
    /// Feature selection after FEATURES_OK.
    #[error("driver features written after FEATURES_OK")]
    FeaturesAfterOk,
    /// DRIVER_OK without FEATURES_OK.
    #[error("DRIVER_OK set before FEATURES_OK")]
    DriverOkEarly,
    /// Queue registers written for a queue that does not exist.
    #[error("queue {queue} does not exist (the device has {count})")]
    NoSuchQueue {
        /// Selected queue.
        queue: u32,
        /// Queues of the device.
        count: usize,
    },
    /// Queue configuration changed while the queue is live.
    #[error("queue {queue} configuration written while the queue is ready")]
    QueueLive {
        /// Queue.
        queue: u32,
    },
    /// A queue made ready with an invalid configuration (NEEDS_RESET).
    #[error("queue {queue} made ready with an invalid configuration: {why}")]
    InvalidQueue {
        /// Queue.
        queue: u32,
        /// What is wrong.
        why: LayoutError,
    },
    /// QueueNotify before DRIVER_OK (or on a queue not ready).
    #[error("queue {queue} notified before the driver is ready (status {status:#x})")]
    NotifyNotReady {
        /// Queue.
        queue: u32,
        /// Status then.
        status: u32,
    },
    /// Notify while NEEDS_RESET is set.
    #[error("queue {queue} notified while the device needs a reset")]
    NotifyNeedsReset {
        /// Queue.
        queue: u32,
    },
    /// A corrupt ring (NEEDS_RESET).
    #[error("queue {queue} ring is corrupt: {why}")]
    Ring {
        /// Queue.
        queue: u32,
        /// What is wrong.
        why: String,
    },
    /// A refused config access.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    /// virtio device ID.
    fn device_type(&self) -> u32;
    /// Features offered (including `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Largest size of each queue the device may have.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Reads device-specific configuration.
    fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), ConfigError>;
    /// Writes device-specific configuration.
    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), ConfigError>;
    /// The driver set DRIVER_OK with `acked` features.
    fn activate(&mut self, acked: u64);
    /// The driver reset the device.
    fn reset(&mut self);
    /// Processes notified queue `index`. Returns whether used buffers were
    /// returned; `Err` means a ring is corrupt (the transport sets
    /// `NEEDS_RESET`). Chain-level errors are the device's to count.
    fn notify(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &mut GuestAccess,
        ram: &RamLayout,
    ) -> Result<bool, QueueError>;
}

/// The virtio-mmio register file of one device.
pub struct MmioTransport<D> {
    device: D,
    queues: Vec<Queue>,
    mem: GuestAccess,
    ram: RamLayout,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    errors: u64,
    recent: VecDeque<TransportError>,
    notifies: u64,
    interrupt: Option<EventFd>,
    interrupts: u64,
    waker: Option<Waker>,
}

/// What a transport without an interrupt trigger calls when it raises an
/// `InterruptStatus` bit (see [`MmioTransport::set_waker`]). It runs on
/// the device's thread with the transport locked: it must not block on
/// anything that waits for the transport.
pub type Waker = Box<dyn Fn() + Send + Sync>;

impl<D: std::fmt::Debug> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device", &self.device)
            .field("status", &self.status)
            .field("errors", &self.errors)
            .field("interrupt", &self.interrupt.is_some())
            .field("waker", &self.waker.is_some())
            .finish_non_exhaustive()
    }
}

/// The register at `offset` for an access of `len` bytes: registers take
/// aligned 32-bit accesses only.
fn register_offset(offset: u64, len: usize) -> Result<u32, TransportError> {
    u32::try_from(offset)
        .ok()
        .filter(|o| len == 4 && o.is_multiple_of(4))
        .ok_or(TransportError::RegisterWidth { offset, len })
}

fn set_half(v: &mut u64, high: bool, x: u32) {
    if high {
        *v = (*v & 0xffff_ffff) | (u64::from(x) << 32);
    } else {
        *v = (*v & !0xffff_ffff) | u64::from(x);
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device`, accessing guest memory through `mem`.
    pub fn new(device: D, mem: GuestAccess, ram: RamLayout) -> Self {
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(Queue::new)
            .collect();
        Self {
            device,
            queues,
            mem,
            ram,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            errors: 0,
            recent: VecDeque::new(),
            notifies: 0,
            interrupt: None,
            interrupts: 0,
            waker: None,
        }
    }

    /// For a driver that polls instead of taking interrupts (no trigger):
    /// `waker` is called whenever the transport raises an
    /// `InterruptStatus` bit (used buffers returned, configuration changed,
    /// `NEEDS_RESET`), set before or not, so that a driver waiting for the
    /// device between its looks is told to look again. The default guest's
    /// VM passes the wake-up of the vCPUs' `OP_IDLE` wait.
    pub fn set_waker(&mut self, waker: Waker) {
        self.waker = Some(waker);
    }

    /// Signals `evt` whenever an `InterruptStatus` bit goes from 0 to 1
    /// (see the [module documentation](self)). The VM registers it with KVM
    /// as an irqfd on the device's GSI. It is made non-blocking (`O_NONBLOCK`
    /// on the open file, shared with every copy of the descriptor), so a
    /// write never waits: a full counter means an interrupt is pending
    /// anyway.
    pub fn set_interrupt(&mut self, evt: EventFd) {
        use std::os::fd::AsRawFd;
        let fd = evt.as_raw_fd();
        // SAFETY: F_GETFL on a descriptor `evt` owns and keeps open; no
        // memory is passed.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: F_SETFL on the same open descriptor, with an integer
        // argument.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            // Only a closed descriptor fails here; a blocking eventfd
            // would block only after 2^64 - 2 unread signals.
            eprintln!(
                "vmm: virtio-mmio: making the interrupt eventfd non-blocking failed: {}",
                std::io::Error::last_os_error()
            );
        }
        self.interrupt = Some(evt);
    }

    /// Interrupts signalled through the trigger.
    pub fn interrupts(&self) -> u64 {
        self.interrupts
    }

    /// Sets `bit` of `InterruptStatus`; signals the trigger if it was clear
    /// (one `write(2)` of a stack value: no allocation, no blocking), and
    /// calls the waker, if any, in any case.
    fn raise(&mut self, bit: u32) {
        let was = self.interrupt_status & bit;
        self.interrupt_status |= bit;
        if let Some(wake) = &self.waker {
            wake();
        }
        if was != 0 {
            return;
        }
        if let Some(evt) = &self.interrupt {
            // EAGAIN (a full counter) means an interrupt is pending.
            let _ = evt.write(1);
            self.interrupts += 1;
        }
    }

    /// After the device ran: if it returned used buffers, asks their
    /// queues whether the driver wants an interrupt (one short read
    /// section) and raises bit 0 if so. Without a trigger the bit is set
    /// whenever buffers were returned, as the polling driver expects.
    fn used_interrupt(&mut self) {
        if !self.queues.iter().any(Queue::has_new_used) {
            return;
        }
        let queues = &mut self.queues;
        let mut want = false;
        let _ = self.mem.with_view(
            0,
            |m| {
                for q in queues.iter_mut() {
                    want |= q.needs_interrupt(m);
                }
                Ok::<(), ()>(())
            },
            |_| None,
        );
        if want || self.interrupt.is_none() {
            self.raise(VIRTIO_MMIO_INT_VRING);
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably (host-side control).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Runs a host-side device operation that may use the queues; sets the
    /// used-buffer interrupt bit if it returned buffers. A ring error sets
    /// `NEEDS_RESET`.
    pub fn with_queues(
        &mut self,
        f: impl FnOnce(&mut D, &mut [Queue], &mut GuestAccess, &RamLayout) -> Result<bool, QueueError>,
    ) {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
            || self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0
        {
            return;
        }
        let r = f(&mut self.device, &mut self.queues, &mut self.mem, &self.ram);
        self.used_interrupt();
        if let Err(e) = r {
            self.needs_reset(TransportError::Ring {
                queue: u32::MAX,
                why: e.to_string(),
            });
        }
    }

    /// The device changed its configuration (host side): bump the
    /// generation and raise the configuration-change interrupt bit.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// `InterruptStatus`.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// Driver errors seen by the transport.
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// The last [`ERROR_LOG`] driver errors, oldest first.
    pub fn recent_errors(&self) -> Vec<TransportError> {
        self.recent.iter().cloned().collect()
    }

    /// Queue notifications processed.
    pub fn notifies(&self) -> u64 {
        self.notifies
    }

    /// The queues (read-only, for tests and tools).
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn error(&mut self, e: TransportError) {
        self.errors += 1;
        if self.recent.len() == ERROR_LOG {
            self.recent.pop_front();
        }
        self.recent.push_back(e);
    }

    fn needs_reset(&mut self, e: TransportError) {
        self.error(e);
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    fn reset(&mut self) {
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        let i = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(i)
    }

    fn register(&self, offset: u32) -> u32 {
        let feat = self.device.features();
        let q = usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i));
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => (feat & 0xffff_ffff) as u32,
                1 => (feat >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size)),
            VIRTIO_MMIO_QUEUE_NUM => q.map_or(0, |q| u32::from(q.size)),
            VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_QUEUE_DESC_LOW => q.map_or(0, |q| q.desc_table as u32),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => q.map_or(0, |q| (q.desc_table >> 32) as u32),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.map_or(0, |q| q.avail_ring as u32),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.map_or(0, |q| (q.avail_ring >> 32) as u32),
            VIRTIO_MMIO_QUEUE_USED_LOW => q.map_or(0, |q| q.used_ring as u32),
            VIRTIO_MMIO_QUEUE_USED_HIGH => q.map_or(0, |q| (q.used_ring >> 32) as u32),
            // No shared memory regions: length reads as all ones.
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    /// A driver read of `data.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let cfg = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= cfg {
            if let Err(e) = self.device.read_config(offset - cfg, data) {
                self.error(e.into());
            }
            return;
        }
        match register_offset(offset, data.len()) {
            Ok(off) => data.copy_from_slice(&self.register(off).to_le_bytes()),
            Err(e) => self.error(e),
        }
    }

    /// A driver write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let cfg = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= cfg {
            if let Err(e) = self.device.write_config(offset - cfg, data) {
                self.error(e.into());
            }
            return;
        }
        let (Ok(off), Ok(v)) = (
            register_offset(offset, data.len()),
            <[u8; 4]>::try_from(data),
        ) else {
            return self.error(TransportError::RegisterWidth {
                offset,
                len: data.len(),
            });
        };
        let v = u32::from_le_bytes(v);
        match off {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
                    self.error(TransportError::FeaturesAfterOk);
                } else {
                    match self.driver_features_sel {
                        0 => set_half(&mut self.acked, false, v),
                        1 => set_half(&mut self.acked, true, v),
                        // Features past bit 63 do not exist: accepting any
                        // is caught at FEATURES_OK; nothing to store.
                        _ if v != 0 => self.error(TransportError::BadFeatures {
                            acked: u64::MAX,
                            offered: self.device.features(),
                        }),
                        _ => {}
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.queue_config(off, v),
            VIRTIO_MMIO_QUEUE_READY => self.queue_ready(v),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.queue_notify(v),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => self.set_status(v),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => self.error(TransportError::NotWritable { offset }),
        }
    }

    fn queue_config(&mut self, off: u32, v: u32) {
        let (sel, count) = (self.queue_sel, self.queues.len());
        let Some(q) = self.selected() else {
            self.error(TransportError::NoSuchQueue { queue: sel, count });
            return;
        };
        if q.ready() {
            self.error(TransportError::QueueLive { queue: sel });
            return;
        }
        match off {
            // Checked against max_size (and power of two) at QueueReady.
            VIRTIO_MMIO_QUEUE_NUM => q.size = u16::try_from(v).unwrap_or(0),
            VIRTIO_MMIO_QUEUE_DESC_LOW => set_half(&mut q.desc_table, false, v),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => set_half(&mut q.desc_table, true, v),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => set_half(&mut q.avail_ring, false, v),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => set_half(&mut q.avail_ring, true, v),
            VIRTIO_MMIO_QUEUE_USED_LOW => set_half(&mut q.used_ring, false, v),
            _ => set_half(&mut q.used_ring, true, v),
        }
    }

    fn queue_ready(&mut self, v: u32) {
        let (sel, count) = (self.queue_sel, self.queues.len());
        let ram = self.ram.clone();
        let Some(q) = self.selected() else {
            self.error(TransportError::NoSuchQueue { queue: sel, count });
            return;
        };
        if v == 0 {
            q.set_unready();
            return;
        }
        if let Err(why) = q.set_ready(&ram) {
            self.needs_reset(TransportError::InvalidQueue { queue: sel, why });
        }
    }

    /// Runs the device for a `QueueNotify` of `v`: from the vCPU (a
    /// register write) or from the device thread (an ioeventfd for queue
    /// `v`, [`super::thread`]). The same checks either way.
    pub fn handle_notify(&mut self, v: u32) {
        self.queue_notify(v);
    }

    fn queue_notify(&mut self, v: u32) {
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            self.error(TransportError::NotifyNeedsReset { queue: v });
            // Tell the driver again: one that notifies now waits for a
            // buffer this device will not return, and may have
            // acknowledged the first configuration change, or (polling)
            // have been idle when it came. The guest sets the rate: one
            // bit, one `write(2)` at most.
            self.raise(VIRTIO_MMIO_INT_CONFIG);
            return;
        }
        let index = usize::try_from(v).unwrap_or(usize::MAX);
        if index >= self.queues.len() {
            self.error(TransportError::NoSuchQueue {
                queue: v,
                count: self.queues.len(),
            });
            return;
        }
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 || !self.queues[index].ready() {
            self.error(TransportError::NotifyNotReady {
                queue: v,
                status: self.status,
            });
            return;
        }
        self.notifies += 1;
        self.serve(index);
    }

    /// Runs the device on queue `index` (ready, `DRIVER_OK`, no
    /// `NEEDS_RESET`), then raises what it calls for.
    fn serve(&mut self, index: usize) {
        let r = self
            .device
            .notify(index, &mut self.queues, &mut self.mem, &self.ram);
        self.used_interrupt();
        if let Err(e) = r {
            self.needs_reset(TransportError::Ring {
                queue: u32::try_from(index).unwrap_or(u32::MAX),
                why: e.to_string(),
            });
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // NEEDS_RESET is the device's to set.
        let keep = self.status & VIRTIO_CONFIG_S_NEEDS_RESET;
        let old = self.status & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let mut new = v & !VIRTIO_CONFIG_S_NEEDS_RESET;
        // Bits virtio does not define are never stored (found by the
        // balloon_mmio fuzz target: 0xfe000000 was kept and read back).
        let undefined = new & !DRIVER_STATUS_BITS;
        if undefined != 0 {
            self.error(TransportError::StatusUndefined { bits: undefined });
            new &= DRIVER_STATUS_BITS;
        }
        if new & old != old {
            self.error(TransportError::StatusCleared { old, new });
            return;
        }
        let added = new & !old;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.acked & !offered != 0 || self.acked & F_VERSION_1 == 0 {
                self.error(TransportError::BadFeatures {
                    acked: self.acked,
                    offered,
                });
                new &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && new & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            self.error(TransportError::DriverOkEarly);
            new &= !VIRTIO_CONFIG_S_DRIVER_OK;
        }
        self.status = new | keep;
        if new & !old & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.device.activate(self.acked);
            // Serve what the driver published before DRIVER_OK (Linux's
            // balloon kicks its stats queue during probe).
            for index in 0..self.queues.len() {
                if self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 && self.queues[index].ready() {
                    self.serve(index);
                }
            }
        }
    }
}

/// Every status bit a driver may set.
pub const DRIVER_STATUS_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FAILED;

/// Status bits a driver sets, in order, for tests and drivers.
pub const STATUS_SEQUENCE: [u32; 4] = [
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_DRIVER_OK,
];
/// `FAILED`, for drivers giving up.
pub const STATUS_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

/// A transport on the MMIO bus.
pub struct VirtioMmio<D> {
    inner: Mutex<MmioTransport<D>>,
}

impl<D> std::fmt::Debug for VirtioMmio<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMmio").finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// Puts `t` behind its lock.
    pub fn new(t: MmioTransport<D>) -> Self {
        Self {
            inner: Mutex::new(t),
        }
    }

    /// The transport (host-side control and inspection).
    pub fn lock(&self) -> MutexGuard<'_, MmioTransport<D>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<D: VirtioDevice> BusDevice for VirtioMmio<D> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.lock().read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.lock().write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{desc, publish, ram};
    use super::*;
    use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;

    /// One queue of 8; returns every chain with its total length.
    #[derive(Debug, Default)]
    struct Echo {
        activated: Option<u64>,
        resets: u32,
        config: [u8; 8],
    }

    impl VirtioDevice for Echo {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            F_VERSION_1 | 1 << 3
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), ConfigError> {
            let o = usize::try_from(offset).unwrap_or(usize::MAX);
            match self.config.get(o..o.saturating_add(data.len())) {
                Some(s) => {
                    data.copy_from_slice(s);
                    Ok(())
                }
                None => Err(ConfigError::OutOfRange {
                    offset,
                    len: data.len(),
                    size: 8,
                }),
            }
        }
        fn write_config(&mut self, offset: u64, _: &[u8]) -> Result<(), ConfigError> {
            Err(ConfigError::ReadOnly { offset })
        }
        fn activate(&mut self, acked: u64) {
            self.activated = Some(acked);
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated = None;
        }
        fn notify(
            &mut self,
            index: usize,
            queues: &mut [Queue],
            mem: &mut GuestAccess,
            ram: &RamLayout,
        ) -> Result<bool, QueueError> {
            let q = &mut queues[index];
            let mut any = false;
            mem.with_view(
                8,
                |m| {
                    while let Some(p) = q.pop(m, ram)? {
                        let len = p.chain.map_or(0, |c| c.iter().map(|d| d.len).sum());
                        q.add_used(m, p.head, len)?;
                        any = true;
                    }
                    Ok(any)
                },
                QueueError::discarded_at,
            )
        }
    }

    fn w(t: &mut MmioTransport<Echo>, off: u32, v: u32) {
        t.write(u64::from(off), &v.to_le_bytes());
    }
    fn r(t: &mut MmioTransport<Echo>, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    const DESC: u64 = 0x30_0000;
    const AVAIL: u64 = 0x30_1000;
    const USED: u64 = 0x30_2000;

    fn setup_queue(t: &mut MmioTransport<Echo>, desc_at: u64) {
        w(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        w(t, VIRTIO_MMIO_QUEUE_NUM, 8);
        w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, desc_at as u32);
        w(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, (desc_at >> 32) as u32);
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL as u32);
        w(t, VIRTIO_MMIO_QUEUE_USED_LOW, USED as u32);
        w(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    fn negotiate(t: &mut MmioTransport<Echo>, features: u64) -> u32 {
        w(t, VIRTIO_MMIO_STATUS, 0);
        w(t, VIRTIO_MMIO_STATUS, STATUS_SEQUENCE[0]);
        w(
            t,
            VIRTIO_MMIO_STATUS,
            STATUS_SEQUENCE[0] | STATUS_SEQUENCE[1],
        );
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        w(t, VIRTIO_MMIO_STATUS, 0b1011);
        r(t, VIRTIO_MMIO_STATUS)
    }

    #[test]
    fn identity_and_features() {
        let (vmem, _, layout) = ram();
        let mut t = MmioTransport::new(Echo::default(), vmem.access(), layout);
        assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(r(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 42);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1 << 3);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
        // Without VERSION_1, or with a feature not offered: refused.
        assert_eq!(negotiate(&mut t, 1 << 3) & 8, 0);
        assert_eq!(negotiate(&mut t, F_VERSION_1 | 1 << 4) & 8, 0);
        assert_eq!(t.errors(), 2);
        assert!(matches!(
            t.recent_errors()[0],
            TransportError::BadFeatures { .. }
        ));
        assert_eq!(negotiate(&mut t, F_VERSION_1 | 1 << 3) & 8, 8);
        // Features are frozen after FEATURES_OK.
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
        assert_eq!(t.acked_features(), F_VERSION_1 | 1 << 3);
        assert_eq!(
            t.recent_errors().last(),
            Some(&TransportError::FeaturesAfterOk)
        );
    }

    #[test]
    fn status_machine_and_notify() {
        let (vmem, _, layout) = ram();
        let mut t = MmioTransport::new(Echo::default(), vmem.access(), layout);
        // DRIVER_OK before FEATURES_OK is dropped.
        w(&mut t, VIRTIO_MMIO_STATUS, 0b0111);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS) & 4, 0);
        assert_eq!(t.recent_errors(), vec![TransportError::DriverOkEarly]);
        assert_eq!(negotiate(&mut t, F_VERSION_1), 0b1011);
        setup_queue(&mut t, DESC);
        // Notify before DRIVER_OK: counted, nothing done.
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(matches!(
            t.recent_errors().last(),
            Some(TransportError::NotifyNotReady { queue: 0, .. })
        ));
        w(&mut t, VIRTIO_MMIO_STATUS, 0b1111);
        assert_eq!(t.device().activated, Some(F_VERSION_1));
        // Clearing bits is refused.
        w(&mut t, VIRTIO_MMIO_STATUS, 0b0111);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0b1111);
        // Queue config while live is refused.
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 4);
        assert_eq!(t.queues()[0].size, 8);
        let before = t.errors();
        {
            let mut mem = vmem.access();
            desc(&mut mem, DESC, 2, 0x40_0000, 77, 0, 0);
            publish(&mut mem, AVAIL, 8, 0, &[2]);
        }
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(t.errors(), before);
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        let mut mem = vmem.access();
        let mut b = [0u8; 12];
        mem.read(USED, &mut b).unwrap();
        assert_eq!(&b[2..4], &1u16.to_le_bytes());
        assert_eq!(&b[8..12], &77u32.to_le_bytes());
        // A corrupt ring: NEEDS_RESET, then notifications are ignored.
        mem.write(AVAIL + 2, &100u16.to_le_bytes()).unwrap();
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & 64, 0);
        assert_ne!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS) & 2, 0);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(matches!(
            t.recent_errors().last(),
            Some(TransportError::NotifyNeedsReset { queue: 0 })
        ));
        // Reset clears everything.
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert!(!t.queues()[0].ready());
        assert_eq!(
            t.device().resets,
            2,
            "negotiate reset once, the driver once more"
        );
    }

    #[test]
    fn undefined_status_bits_are_dropped_and_counted() {
        // Found by the balloon_mmio fuzz target (tests/fuzz/artifacts/):
        // a status write of 0xfe000000 was stored and read back.
        let (vmem, _, layout) = ram();
        let mut t = MmioTransport::new(Echo::default(), vmem.access(), layout);
        w(&mut t, VIRTIO_MMIO_STATUS, 0xfe00_0001);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 1);
        assert_eq!(
            t.recent_errors(),
            vec![TransportError::StatusUndefined { bits: 0xfe00_0000 }]
        );
        // NEEDS_RESET (the device's) and bit 4 are not the driver's either.
        w(&mut t, VIRTIO_MMIO_STATUS, 0x51);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 1);
        assert_eq!(negotiate(&mut t, F_VERSION_1), 0b1011);
    }

    #[test]
    fn invalid_queue_needs_reset_and_bad_widths_are_counted() {
        let (vmem, _, layout) = ram();
        let mut t = MmioTransport::new(Echo::default(), vmem.access(), layout);
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, 1 << 40);
        assert!(!t.queues()[0].ready());
        assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & 64, 0);
        assert_eq!(
            t.recent_errors().last(),
            Some(&TransportError::InvalidQueue {
                queue: 0,
                why: LayoutError::OutsideRam {
                    area: super::super::queue::RingArea::DescTable,
                    addr: 1 << 40,
                    len: 128
                }
            })
        );
        // Non-32-bit register accesses and unknown registers.
        let n = t.errors();
        t.write(u64::from(VIRTIO_MMIO_STATUS), &[0]);
        let mut b = [0u8; 2];
        t.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut b);
        assert_eq!(b, [0, 0]);
        t.write(0x72, &[0; 4]);
        w(&mut t, VIRTIO_MMIO_MAGIC_VALUE, 1);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 5);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 4);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 9);
        // Config: device-refused accesses are counted too.
        t.write(u64::from(VIRTIO_MMIO_CONFIG), &[1; 4]);
        let mut c = [0u8; 4];
        t.read(u64::from(VIRTIO_MMIO_CONFIG) + 6, &mut c);
        assert_eq!(t.errors(), n + 8, "{:?}", t.recent_errors());
        assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS), 0, "still alive");
    }

    /// A transport with an interrupt trigger, negotiated, queue 0 live.
    fn live_with_trigger(
        vmem: &crate::vstate::memory::VmMemory,
        layout: RamLayout,
    ) -> (MmioTransport<Echo>, EventFd) {
        let mut t = MmioTransport::new(Echo::default(), vmem.access(), layout);
        let evt = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("eventfd");
        t.set_interrupt(evt.try_clone().expect("clone"));
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, DESC);
        w(&mut t, VIRTIO_MMIO_STATUS, 0b1111);
        (t, evt)
    }

    /// How many times the eventfd was written since the last call.
    fn signals(evt: &EventFd) -> u64 {
        evt.read().unwrap_or(0)
    }

    #[test]
    fn trigger_is_signalled_for_used_buffers_and_config_changes() {
        let (vmem, _, layout) = ram();
        let (mut t, evt) = live_with_trigger(&vmem, layout);
        assert_eq!(signals(&evt), 0, "nothing yet");
        let mut mem = vmem.access();
        desc(&mut mem, DESC, 0, 0x40_0000, 8, 0, 0);
        publish(&mut mem, AVAIL, 8, 0, &[0]);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        assert_eq!(signals(&evt), 1, "used buffer");
        // Acknowledged: the next used buffer signals again.
        w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        publish(&mut mem, AVAIL, 8, 1, &[0]);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(signals(&evt), 1, "second used buffer");
        // Not acknowledged: the bit is pending, no second interrupt.
        publish(&mut mem, AVAIL, 8, 2, &[0]);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(signals(&evt), 0, "bit still pending");
        // A notify that returns nothing does not signal.
        w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(signals(&evt), 0, "nothing used");
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // A configuration change: bit 1 and a signal.
        t.config_changed();
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 2);
        assert_eq!(signals(&evt), 1, "config change");
        assert_eq!(r(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 1);
        assert_eq!(t.interrupts(), 3);
        assert_eq!(t.errors(), 0, "{:?}", t.recent_errors());
    }

    #[test]
    fn waker_is_called_for_every_used_return_and_config_change() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let (vmem, _, layout) = ram();
        let mut t = MmioTransport::new(Echo::default(), vmem.access(), layout);
        let woken = Arc::new(AtomicU64::new(0));
        let w2 = Arc::clone(&woken);
        t.set_waker(Box::new(move || {
            w2.fetch_add(1, Ordering::SeqCst);
        }));
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, DESC);
        w(&mut t, VIRTIO_MMIO_STATUS, 0b1111);
        let mut mem = vmem.access();
        desc(&mut mem, DESC, 0, 0x40_0000, 8, 0, 0);
        publish(&mut mem, AVAIL, 8, 0, &[0]);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(woken.load(Ordering::SeqCst), 1, "used buffer");
        // The polling driver never acknowledges: each return wakes it.
        publish(&mut mem, AVAIL, 8, 1, &[0]);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(woken.load(Ordering::SeqCst), 2, "bit already set");
        // A notify that returns nothing does not.
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(woken.load(Ordering::SeqCst), 2, "nothing used");
        t.config_changed();
        assert_eq!(woken.load(Ordering::SeqCst), 3, "config change");
        assert_eq!(t.interrupts(), 0, "no trigger, no signal");
        assert_eq!(t.errors(), 0, "{:?}", t.recent_errors());
        // A corrupt ring: NEEDS_RESET wakes the driver, and so does every
        // notify the device then ignores (a driver that went idle before
        // the first wake-up and now waits for its buffer must not wait
        // for its backstop).
        mem.write(AVAIL + 2, &100u16.to_le_bytes()).unwrap();
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & 64, 0, "NEEDS_RESET");
        assert_eq!(woken.load(Ordering::SeqCst), 4, "NEEDS_RESET");
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(woken.load(Ordering::SeqCst), 5, "ignored notify");
    }

    #[test]
    fn an_ignored_notify_signals_the_configuration_change_again() {
        let (vmem, _, layout) = ram();
        let (mut t, evt) = live_with_trigger(&vmem, layout);
        let mut mem = vmem.access();
        mem.write(AVAIL + 2, &100u16.to_le_bytes()).unwrap();
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & 64, 0, "NEEDS_RESET");
        assert_eq!(signals(&evt), 1, "the configuration change");
        // Still pending: a second notify adds no interrupt.
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(signals(&evt), 0, "bit still set");
        // Acknowledged, then a notify the device ignores: signalled again.
        w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 2);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(signals(&evt), 1, "signalled again");
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS) & 2, 2);
    }

    #[test]
    fn no_interrupt_flag_suppresses_the_trigger() {
        let no_interrupt = VRING_AVAIL_F_NO_INTERRUPT as u16;
        let (vmem, _, layout) = ram();
        let (mut t, evt) = live_with_trigger(&vmem, layout.clone());
        let mut mem = vmem.access();
        mem.write(AVAIL, &no_interrupt.to_le_bytes()).unwrap();
        desc(&mut mem, DESC, 0, 0x40_0000, 8, 0, 0);
        publish(&mut mem, AVAIL, 8, 0, &[0]);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        let mut b = [0u8; 2];
        mem.read(USED + 2, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b), 1, "the buffer was used");
        assert_eq!(signals(&evt), 0, "the driver asked for no interrupt");
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // The driver wants interrupts again.
        mem.write(AVAIL, &0u16.to_le_bytes()).unwrap();
        publish(&mut mem, AVAIL, 8, 1, &[0]);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(signals(&evt), 1);
        // A configuration change is signalled whatever the ring says.
        w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 3);
        mem.write(AVAIL, &no_interrupt.to_le_bytes()).unwrap();
        t.config_changed();
        assert_eq!(signals(&evt), 1);

        // Without a trigger (a polling driver) the bit is set as before.
        let (vmem, _, layout) = ram();
        let mut t = MmioTransport::new(Echo::default(), vmem.access(), layout);
        negotiate(&mut t, F_VERSION_1);
        setup_queue(&mut t, DESC);
        w(&mut t, VIRTIO_MMIO_STATUS, 0b1111);
        let mut mem = vmem.access();
        mem.write(AVAIL, &no_interrupt.to_le_bytes()).unwrap();
        desc(&mut mem, DESC, 0, 0x40_0000, 8, 0, 0);
        publish(&mut mem, AVAIL, 8, 0, &[0]);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    }

    #[test]
    fn needs_reset_signals_a_config_interrupt() {
        let (vmem, _, layout) = ram();
        let (mut t, evt) = live_with_trigger(&vmem, layout);
        let mut mem = vmem.access();
        mem.write(AVAIL + 2, &100u16.to_le_bytes()).unwrap();
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & 64, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 2);
        assert_eq!(signals(&evt), 1);
    }

    /// What Linux's virtio_mmio.c (version 2) does, step by step.
    #[test]
    fn linux_driver_sequence() {
        let (vmem, _, layout) = ram();
        let mut t = MmioTransport::new(Echo::default(), vmem.access(), layout);
        assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(r(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_ne!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 0);
        r(&mut t, VIRTIO_MMIO_VENDOR_ID);
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
        for bit in [1, 2] {
            let s = r(&mut t, VIRTIO_MMIO_STATUS);
            w(&mut t, VIRTIO_MMIO_STATUS, s | bit);
        }
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let lo = r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES);
        let features = u64::from(hi) << 32 | u64::from(lo);
        assert_ne!(features & F_VERSION_1, 0);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, hi);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, lo);
        let s = r(&mut t, VIRTIO_MMIO_STATUS);
        w(&mut t, VIRTIO_MMIO_STATUS, s | 8);
        assert_ne!(r(&mut t, VIRTIO_MMIO_STATUS) & 8, 0, "FEATURES_OK kept");
        // Shared memory regions: none (length all ones).
        w(&mut t, VIRTIO_MMIO_SHM_SEL, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        // A queue the device does not have: QueueNumMax 0, not ready.
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 3);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        // Queue 0, as setup_vq does it.
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8);
        for (lo, hi, a) in [
            (
                VIRTIO_MMIO_QUEUE_DESC_LOW,
                VIRTIO_MMIO_QUEUE_DESC_HIGH,
                DESC,
            ),
            (
                VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                AVAIL,
            ),
            (
                VIRTIO_MMIO_QUEUE_USED_LOW,
                VIRTIO_MMIO_QUEUE_USED_HIGH,
                USED,
            ),
        ] {
            w(&mut t, lo, a as u32);
            w(&mut t, hi, (a >> 32) as u32);
        }
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
        // The driver publishes and kicks during probe, before DRIVER_OK:
        // counted, not served ...
        let mut mem = vmem.access();
        desc(&mut mem, DESC, 1, 0x40_0000, 10, 0, 0);
        publish(&mut mem, AVAIL, 8, 0, &[1]);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(matches!(
            t.recent_errors()[..],
            [TransportError::NotifyNotReady { queue: 0, .. }]
        ));
        let mut b = [0u8; 2];
        mem.read(USED + 2, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b), 0);
        // ... and served when DRIVER_OK is set.
        let s = r(&mut t, VIRTIO_MMIO_STATUS);
        w(&mut t, VIRTIO_MMIO_STATUS, s | 4);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0xf);
        mem.read(USED + 2, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b), 1, "served at DRIVER_OK");
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        let st = r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS);
        w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, st);
        assert_eq!(r(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 0);
        // del_vq: QueueReady 0 reads back 0; then a reset.
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(t.errors(), 1, "{:?}", t.recent_errors());
    }
}

//! The split virtqueue (virtio 1.2 §2.7), device side: rust-vmm's
//! `virtio-queue` driven through a pinned view of the stage-2 table.
//!
//! The descriptor table, the available ring and the used ring are guest
//! memory written by a driver we do not trust. The ring state machine is
//! [`virtio_queue::Queue`] (`QueueT` / `QueueOwnedT`): it reads the
//! available index (Acquire) and refuses one that ran more than the queue
//! size ahead, pops heads, writes used elements before the used index
//! (Release) and answers `needs_notification`. Its guest memory is a
//! [`GuestMemoryView`]: vm-memory's `GuestMemory` over the stage-2 table,
//! valid for one read section of the device's walker
//! ([`GuestAccess::with_view`]). The view refuses unmapped, ballooned and
//! discarded pages and anything past the table, so neither the crate nor
//! this module can touch memory the guest gave back; a discarded page (free
//! page reporting: still mapped, reads zeros) is faulted back in outside
//! the section and the step retried, as [`GuestAccess::read`] does.
//!
//! Every guest-controlled value is checked before it is used:
//!
//! - ring addresses: aligned and inside guest RAM, checked when the driver
//!   sets `QueueReady` ([`Queue::validate`]);
//! - the available index: at most `size` entries ahead of the device's
//!   (otherwise the ring is corrupt: fatal, `NEEDS_RESET`);
//! - head and `next` indices: below `size`;
//! - chains: at most `size` descriptors (a loop ends there), no indirect
//!   descriptors (not offered), no zero-length buffers, every buffer inside
//!   guest RAM without wrapping.
//!
//! The chain walk is ours, over the crate's [`Descriptor`] layout and the
//! same view: the crate's `DescriptorChain` iterator ends *silently* on a
//! loop, an out-of-range `next` or an unreadable descriptor (a device could
//! not tell a short chain from a broken one) and follows an indirect table
//! whether or not `VIRTIO_RING_F_INDIRECT_DESC` was negotiated, where we
//! must refuse it. The crate's `needs_notification` ignores
//! `VRING_AVAIL_F_NO_INTERRUPT` without `EVENT_IDX` (which we do not
//! offer); [`Queue::needs_interrupt`] honours it.
//!
//! A bad *chain* is a [`ChainError`]: the device answers the head with an
//! empty used element and goes on. A bad *ring* is a [`QueueError`]: the
//! device cannot know what the driver meant and asks for a reset.
//!
//! **Read sections.** A view must never be held across a release of guest
//! memory (the gather waits for readers' grace periods), so a device pops
//! and reads a batch in one section, releases outside it, and returns the
//! used elements in another.

use std::sync::atomic::Ordering;

use guest_mm::mutation::{broken, Rule};
use guest_mm::{GuestMemoryView, WalkError};
use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, Permissions};

use super::RamLayout;
#[cfg(doc)]
use crate::vstate::memory::GuestAccess;

/// A guest page a step needs is discarded (released by free page
/// reporting, still mapped): the step is undone, the page faulted back in
/// outside the read section and the step run again
/// ([`GuestAccess::with_view`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "guest page {gpa:#x} of the {area} is discarded (released by free page reporting) \
     and did not stay faulted in"
)]
pub struct Discarded {
    /// What the page holds.
    pub area: RingArea,
    /// The page's first failing address.
    pub gpa: u64,
}

/// A ring the device cannot trust any more (the device needs a reset).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The available index ran too far ahead.
    #[error(
        "the driver's available index {avail} is {ahead} entries ahead of the device's {next}, \
         more than the queue size {size}: the available ring is corrupt"
    )]
    AvailAhead {
        /// Driver's avail.idx.
        avail: u16,
        /// Device's next index.
        next: u16,
        /// avail - next (wrapping).
        ahead: u16,
        /// Queue size.
        size: u16,
    },
    /// A head index past the descriptor table.
    #[error("the available ring names head descriptor {head}, past the queue size {size}")]
    HeadIndex {
        /// The head.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// The rings themselves could not be read or written (a ring page the
    /// guest ballooned or that is not mapped).
    #[error("accessing the {area} of the virtqueue failed: {err}")]
    Memory {
        /// Which ring.
        area: RingArea,
        /// Why (the stage-2 walk's reason, or virtio-queue's error).
        err: String,
    },
    /// A ring or descriptor page is discarded (see [`Discarded`]); only
    /// seen once the bounded retries are spent.
    #[error(transparent)]
    Discarded(#[from] Discarded),
    /// Used before `QueueReady`.
    #[error("queue used before the driver made it ready")]
    NotReady,
}

impl QueueError {
    /// The discarded page to fault in before running the step again.
    pub fn discarded_at(&self) -> Option<u64> {
        match self {
            QueueError::Discarded(d) => Some(d.gpa),
            _ => None,
        }
    }
}

/// One of the three areas of a split virtqueue, or a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingArea {
    /// The descriptor table.
    DescTable,
    /// The available (driver) ring.
    AvailRing,
    /// The used (device) ring.
    UsedRing,
    /// A buffer a descriptor points to.
    Buffer,
}

impl std::fmt::Display for RingArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RingArea::DescTable => "descriptor table",
            RingArea::AvailRing => "available ring",
            RingArea::UsedRing => "used ring",
            RingArea::Buffer => "buffer",
        })
    }
}

/// A queue configuration refused at `QueueReady` (the device needs a reset).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Not a power of two in `1..=max`.
    #[error("queue size {size} is not a power of two in 1..={max}")]
    Size {
        /// Size the driver chose.
        size: u16,
        /// Largest the device supports.
        max: u16,
    },
    /// A ring area not aligned as virtio requires.
    #[error("{area} at {addr:#x} is not {align}-byte aligned")]
    Unaligned {
        /// Which area.
        area: RingArea,
        /// Its address.
        addr: u64,
        /// Required alignment.
        align: u64,
    },
    /// A ring area not inside guest RAM.
    #[error("{area} at {addr:#x} + {len:#x} is not inside guest RAM")]
    OutsideRam {
        /// Which area.
        area: RingArea,
        /// Its address.
        addr: u64,
        /// Its length for the queue's size.
        len: u64,
    },
    /// An available ring at guest address 0, which virtio-queue takes for
    /// a queue that was never configured.
    #[error(
        "the available ring at guest address 0 is refused: address 0 means an unconfigured queue"
    )]
    AvailAtZero,
}

/// A descriptor chain the device refuses (answered empty; the device goes on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A `next` index past the table.
    #[error("descriptor {index} chains to {next}, past the queue size {size}")]
    NextIndex {
        /// Descriptor.
        index: u16,
        /// Its next.
        next: u16,
        /// Queue size.
        size: u16,
    },
    /// More descriptors than the queue has: a loop.
    #[error("the chain from head {head} has more than {size} descriptors (a loop)")]
    TooLong {
        /// Head.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// A buffer outside guest RAM (or wrapping around).
    #[error("descriptor {index}: buffer {addr:#x} + {len:#x} is not inside guest RAM")]
    OutsideRam {
        /// Descriptor.
        index: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A zero-length buffer.
    #[error("descriptor {index} has a zero-length buffer")]
    ZeroLength {
        /// Descriptor.
        index: u16,
    },
    /// An indirect descriptor (VIRTIO_F_INDIRECT_DESC is not offered).
    #[error("descriptor {index} is indirect, which this device does not offer")]
    Indirect {
        /// Descriptor.
        index: u16,
    },
    /// The descriptor table could not be read.
    #[error("reading descriptor {index} failed: {err}")]
    Memory {
        /// Descriptor.
        index: u16,
        /// Why.
        err: String,
    },
}

/// One validated descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Index in the table.
    pub index: u16,
    /// Guest-physical buffer address (inside RAM, checked).
    pub addr: u64,
    /// Buffer length (non-zero, checked).
    pub len: u32,
    /// Whether the device may write it (`VRING_DESC_F_WRITE`).
    pub write_only: bool,
}

/// A chain popped from the available ring.
#[derive(Debug)]
pub struct Popped {
    /// Head index (to return in the used ring).
    pub head: u16,
    /// The validated descriptors, or why the chain is refused.
    pub chain: Result<Vec<Desc>, ChainError>,
}

/// Why `[addr, addr + len)` could not be accessed through `mem`: the
/// stage-2 walk's reason for the first page that failed, if the range is
/// not accessible now.
fn walk_reason(
    mem: &GuestMemoryView<'_>,
    addr: u64,
    len: usize,
    access: Permissions,
) -> Option<WalkError> {
    mem.check(GuestAddress(addr), len, access).err()
}

/// A failed access to `area` at `[addr, addr + len)`: [`Discarded`] if
/// the page that failed is discarded (the caller retries after a fault-in),
/// otherwise the reason as text.
fn access_error(
    mem: &GuestMemoryView<'_>,
    area: RingArea,
    addr: u64,
    len: usize,
    access: Permissions,
    err: &dyn std::fmt::Display,
) -> Result<String, Discarded> {
    match walk_reason(mem, addr, len, access) {
        Some(WalkError::Discarded(g)) => Err(Discarded { area, gpa: g.0 }),
        Some(why) => Ok(why.to_string()),
        None => Ok(err.to_string()),
    }
}

/// virtio-queue's error with the guest-memory detail it leaves out of its
/// message.
fn crate_error(e: &virtio_queue::Error) -> String {
    match e {
        virtio_queue::Error::GuestMemory(g) => format!("{e}: {g}"),
        other => other.to_string(),
    }
}

/// Device-side state of one split virtqueue: the driver's configuration
/// registers, and once ready, virtio-queue's ring state.
#[derive(Debug, Default)]
pub struct Queue {
    /// Largest size the device supports.
    pub max_size: u16,
    /// Size chosen by the driver (`QueueNum`).
    pub size: u16,
    /// Descriptor table GPA.
    pub desc_table: u64,
    /// Available (driver) ring GPA.
    pub avail_ring: u64,
    /// Used (device) ring GPA.
    pub used_ring: u64,
    /// The ring state, configured from the registers when the driver made
    /// the queue ready (and kept, with its indices, while it is not).
    ring: Option<virtio_queue::Queue>,
    /// `QueueReady`.
    ready: bool,
    /// Used elements added since [`Queue::needs_interrupt`] last asked.
    added: bool,
}

impl Queue {
    /// A queue of at most `max_size` entries, not ready.
    pub fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Self::default()
        }
    }

    /// Back to the reset state (keeps `max_size`).
    pub fn reset(&mut self) {
        *self = Self::new(self.max_size);
    }

    /// `QueueReady`.
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// Checks what the driver configured before the queue goes live:
    /// a power-of-two size up to `max_size`, aligned rings inside guest RAM.
    pub fn validate(&self, ram: &RamLayout) -> Result<(), LayoutError> {
        let n = u64::from(self.size);
        if self.size == 0 || self.size > self.max_size || !self.size.is_power_of_two() {
            return Err(LayoutError::Size {
                size: self.size,
                max: self.max_size,
            });
        }
        let areas = [
            (RingArea::DescTable, self.desc_table, 16 * n, 16),
            (RingArea::AvailRing, self.avail_ring, 6 + 2 * n, 2),
            (RingArea::UsedRing, self.used_ring, 6 + 8 * n, 4),
        ];
        for (area, addr, len, align) in areas {
            if !addr.is_multiple_of(align) {
                return Err(LayoutError::Unaligned { area, addr, align });
            }
            if !ram.contains(addr, len) {
                return Err(LayoutError::OutsideRam { area, addr, len });
            }
        }
        if self.avail_ring == 0 {
            return Err(LayoutError::AvailAtZero);
        }
        Ok(())
    }

    /// The driver wrote 1 to `QueueReady`: validates the configuration and
    /// configures virtio-queue's ring from it. The indices carry over from
    /// an earlier ready period (they restart at 0 after a reset).
    pub fn set_ready(&mut self, ram: &RamLayout) -> Result<(), LayoutError> {
        if self.ready {
            return Ok(());
        }
        self.validate(ram)?;
        let size_err = LayoutError::Size {
            size: self.size,
            max: self.max_size,
        };
        // Validated above: a power of two, aligned rings; the crate checks
        // again (and refuses sizes past its own maximum).
        let mut ring = virtio_queue::Queue::new(self.size).map_err(|_| size_err.clone())?;
        ring.try_set_size(self.size).map_err(|_| size_err)?;
        let unaligned = |area, addr, align| LayoutError::Unaligned { area, addr, align };
        ring.try_set_desc_table_address(GuestAddress(self.desc_table))
            .map_err(|_| unaligned(RingArea::DescTable, self.desc_table, 16))?;
        ring.try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .map_err(|_| unaligned(RingArea::AvailRing, self.avail_ring, 2))?;
        ring.try_set_used_ring_address(GuestAddress(self.used_ring))
            .map_err(|_| unaligned(RingArea::UsedRing, self.used_ring, 4))?;
        if let Some(old) = &self.ring {
            ring.set_next_avail(old.next_avail());
            ring.set_next_used(old.next_used());
        }
        // VIRTIO_RING_F_EVENT_IDX is not offered.
        ring.set_event_idx(false);
        ring.set_ready(true);
        self.ring = Some(ring);
        self.ready = true;
        Ok(())
    }

    /// The driver wrote 0 to `QueueReady`.
    pub fn set_unready(&mut self) {
        self.ready = false;
        if let Some(r) = &mut self.ring {
            r.set_ready(false);
        }
    }

    fn live(&mut self) -> Result<&mut virtio_queue::Queue, QueueError> {
        match &mut self.ring {
            Some(r) if self.ready => Ok(r),
            _ => Err(QueueError::NotReady),
        }
    }

    /// A ring access that failed: [`QueueError::Discarded`] (retried by the
    /// caller's read section) or [`QueueError::Memory`].
    fn ring_error(
        mem: &GuestMemoryView<'_>,
        area: RingArea,
        addr: u64,
        len: u64,
        access: Permissions,
        e: &virtio_queue::Error,
    ) -> QueueError {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        match access_error(mem, area, addr, len, access, &crate_error(e)) {
            Ok(err) => QueueError::Memory { area, err },
            Err(d) => d.into(),
        }
    }

    /// Pops the next available chain, validating it. `Ok(None)` if the ring
    /// is empty; `Err` if the ring itself is corrupt or unreadable, or
    /// [`QueueError::Discarded`] (nothing popped) if a page must be faulted
    /// in first.
    pub fn pop(
        &mut self,
        mem: &GuestMemoryView<'_>,
        ram: &RamLayout,
    ) -> Result<Option<Popped>, QueueError> {
        let (size, avail_ring, desc_table) = (self.size, self.avail_ring, self.desc_table);
        let ring = self.live()?;
        let next = ring.next_avail();
        // The crate reads avail.idx with Acquire (the ring entries it
        // publishes are read after it) and refuses an index that ran more
        // than the queue size ahead.
        let popped = match ring.iter(mem) {
            Ok(mut it) => it.next().map(|c| c.head_index()),
            Err(virtio_queue::Error::InvalidAvailRingIndex) => {
                let avail = ring.avail_idx(mem, Ordering::Relaxed).map_or(next, |w| w.0);
                return Err(QueueError::AvailAhead {
                    avail,
                    next,
                    ahead: avail.wrapping_sub(next),
                    size,
                });
            }
            Err(e) => {
                let e = Self::ring_error(
                    mem,
                    RingArea::AvailRing,
                    avail_ring,
                    4,
                    Permissions::Read,
                    &e,
                );
                return Err(e);
            }
        };
        let Some(head) = popped else {
            // Either nothing is available, or the head's slot could not be
            // read: the crate does not say which.
            let ring = self.live()?;
            if matches!(ring.avail_idx(mem, Ordering::Acquire), Ok(w) if w.0 == next) {
                return Ok(None);
            }
            let slot = avail_ring + 4 + 2 * u64::from(next % size);
            let e = match mem.load::<u16>(GuestAddress(slot), Ordering::Acquire) {
                // Readable now: the driver moved its index back meanwhile
                // (nothing to serve), or the page came back.
                Ok(_) => return Ok(None),
                Err(e) => e,
            };
            return Err(
                match access_error(mem, RingArea::AvailRing, slot, 2, Permissions::Read, &e) {
                    Ok(err) => QueueError::Memory {
                        area: RingArea::AvailRing,
                        err,
                    },
                    Err(d) => d.into(),
                },
            );
        };
        if head >= size {
            return Err(QueueError::HeadIndex { head, size });
        }
        match walk_chain(mem, ram, desc_table, size, head) {
            Ok(chain) => Ok(Some(Popped { head, chain })),
            Err(d) => {
                // Undo the pop: the chain is read again after the fault-in.
                if let Some(r) = &mut self.ring {
                    r.set_next_avail(next);
                }
                Err(d.into())
            }
        }
    }

    /// Returns chain `head` to the driver with `len` bytes written (the
    /// element is visible before the index that publishes it). On
    /// [`QueueError::Discarded`] nothing was published and the call may be
    /// repeated.
    pub fn add_used(
        &mut self,
        mem: &GuestMemoryView<'_>,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        let (used_ring, size) = (self.used_ring, self.size);
        let ring = self.live()?;
        let before = ring.next_used();
        if let Err(e) = ring.add_used(mem, head, len) {
            // The crate advances its index before it stores it: put it back
            // so that a retry writes the same slot.
            ring.set_next_used(before);
            let len = 6 + 8 * u64::from(size);
            return Err(Self::ring_error(
                mem,
                RingArea::UsedRing,
                used_ring,
                len,
                Permissions::Write,
                &e,
            ));
        }
        self.added = true;
        Ok(())
    }

    /// Whether the driver wants an interrupt for the used elements added
    /// since the last call: virtio-queue's `needs_notification` (a full
    /// fence after the used index; always yes without `EVENT_IDX`), then
    /// `VRING_AVAIL_F_NO_INTERRUPT` in the available ring's flags, which
    /// the crate leaves to us. If nothing was added, no. If the flags cannot
    /// be read, yes: a spurious interrupt is harmless, a missed one leaves
    /// the driver waiting.
    pub fn needs_interrupt(&mut self, mem: &GuestMemoryView<'_>) -> bool {
        if !std::mem::take(&mut self.added) {
            return false;
        }
        let avail_ring = self.avail_ring;
        let Ok(ring) = self.live() else {
            return false;
        };
        match ring.needs_notification(mem) {
            Ok(false) => false,
            Ok(true) | Err(_) => mem
                .load::<u16>(GuestAddress(avail_ring), Ordering::Acquire)
                .map_or(true, |f| {
                    u32::from(u16::from_le(f)) & VRING_AVAIL_F_NO_INTERRUPT == 0
                }),
        }
    }

    /// Whether used elements were added since [`Queue::needs_interrupt`]
    /// last asked.
    pub fn has_new_used(&self) -> bool {
        self.added
    }

    /// The device's next available index (for tests and tools).
    pub fn next_avail(&self) -> u16 {
        self.ring.as_ref().map_or(0, |r| r.next_avail())
    }

    /// The device's next used index.
    pub fn next_used(&self) -> u16 {
        self.ring.as_ref().map_or(0, |r| r.next_used())
    }

    /// The position of the available ring, to undo pops with
    /// [`Queue::rewind`] (a step that must be retried after a fault-in).
    pub fn mark(&self) -> u16 {
        self.next_avail()
    }

    /// Puts the available position back to `mark`.
    pub fn rewind(&mut self, mark: u16) {
        if let Some(r) = &mut self.ring {
            r.set_next_avail(mark);
        }
    }
}

/// Walks the chain from `head` in the table at `desc_table`, validating
/// every descriptor. `Err` only when a descriptor page is discarded.
fn walk_chain(
    mem: &GuestMemoryView<'_>,
    ram: &RamLayout,
    desc_table: u64,
    size: u16,
    head: u16,
) -> Result<Result<Vec<Desc>, ChainError>, Discarded> {
    let mut out = Vec::new();
    let mut index = head;
    loop {
        if out.len() >= usize::from(size) {
            return Ok(Err(ChainError::TooLong { head, size }));
        }
        let at = desc_table + 16 * u64::from(index);
        let d: Descriptor = match mem.read_obj(GuestAddress(at)) {
            Ok(d) => d,
            Err(e) => {
                let err = access_error(mem, RingArea::DescTable, at, 16, Permissions::Read, &e)?;
                return Ok(Err(ChainError::Memory { index, err }));
            }
        };
        let (addr, len, flags) = (d.addr().0, d.len(), u32::from(d.flags()));
        if flags & VRING_DESC_F_INDIRECT != 0 {
            return Ok(Err(ChainError::Indirect { index }));
        }
        if len == 0 && !broken(Rule::DescLength) {
            return Ok(Err(ChainError::ZeroLength { index }));
        }
        // (A mutation build may check only the first byte, or nothing.)
        let checked_len = if broken(Rule::DescLength) {
            1
        } else {
            u64::from(len)
        };
        if !broken(Rule::DescAddress) && !ram.contains(addr, checked_len) {
            return Ok(Err(ChainError::OutsideRam { index, addr, len }));
        }
        out.push(Desc {
            index,
            addr,
            len,
            write_only: flags & VRING_DESC_F_WRITE != 0,
        });
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(Ok(out));
        }
        let next = d.next();
        if next >= size {
            return Ok(Err(ChainError::NextIndex { index, next, size }));
        }
        index = next;
    }
}

/// Reads a whole device-readable chain into one buffer of at most `max`
/// bytes. Refuses device-writable descriptors and chains longer than `max`.
/// [`ChainReadError::Discarded`] asks the caller to fault the page in and
/// read the chain again.
pub fn read_chain(
    mem: &GuestMemoryView<'_>,
    chain: &[Desc],
    max: u64,
) -> Result<Vec<u8>, ChainReadError> {
    let total: u64 = chain.iter().map(|d| u64::from(d.len)).sum();
    if total > max {
        return Err(ChainReadError::TooBig { total, max });
    }
    let mut out =
        vec![0u8; usize::try_from(total).map_err(|_| ChainReadError::TooBig { total, max })?];
    let mut at = 0usize;
    for d in chain {
        if d.write_only {
            return Err(ChainReadError::WriteOnly { index: d.index });
        }
        let n = d.len as usize;
        if let Err(e) = mem.read_slice(&mut out[at..at + n], GuestAddress(d.addr)) {
            return Err(
                match access_error(mem, RingArea::Buffer, d.addr, n, Permissions::Read, &e) {
                    Ok(err) => ChainReadError::Memory {
                        index: d.index,
                        err,
                    },
                    Err(Discarded { gpa, .. }) => ChainReadError::Discarded {
                        index: d.index,
                        gpa,
                    },
                },
            );
        }
        at += n;
    }
    Ok(out)
}

/// Why a device-readable chain could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainReadError {
    /// More data than the request type allows.
    #[error("the chain carries {total} bytes, more than the {max} this request allows")]
    TooBig {
        /// Bytes in the chain.
        total: u64,
        /// Limit.
        max: u64,
    },
    /// A device-writable descriptor where the device expects to read.
    #[error("descriptor {index} is device-writable, but this request is read by the device")]
    WriteOnly {
        /// Descriptor.
        index: u16,
    },
    /// A buffer could not be read (unmapped, ballooned).
    #[error("reading the buffer of descriptor {index} failed: {err}")]
    Memory {
        /// Descriptor.
        index: u16,
        /// Why.
        err: String,
    },
    /// A buffer page is discarded (free page reporting): the caller faults
    /// it in and reads the chain again; seen as an error only when that
    /// did not help.
    #[error(
        "the buffer of descriptor {index} is in page {gpa:#x}, discarded by free page \
         reporting, which did not stay faulted in"
    )]
    Discarded {
        /// Descriptor.
        index: u16,
        /// First discarded address.
        gpa: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{desc, publish, ram, view};
    use super::*;
    use crate::vstate::memory::GuestAccess;

    const DESC: u64 = 0x30_0000;
    const AVAIL: u64 = 0x30_1000;
    const USED: u64 = 0x30_2000;
    const BUF: u64 = 0x40_0000;
    const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    fn queue(layout: &RamLayout) -> Queue {
        let mut q = Queue::new(8);
        q.size = 8;
        q.desc_table = DESC;
        q.avail_ring = AVAIL;
        q.used_ring = USED;
        q.validate(layout).expect("valid queue");
        q.set_ready(layout).expect("valid queue");
        q
    }

    #[test]
    fn good_chain_pops_and_returns() {
        let (vmem, _, layout) = ram();
        let mut mem = vmem.access();
        let mut q = queue(&layout);
        assert!(view(&mut mem, |m| q.pop(m, &layout)).unwrap().is_none());
        desc(&mut mem, DESC, 3, BUF, 100, F_NEXT, 5);
        desc(&mut mem, DESC, 5, BUF + 4096, 8, F_WRITE, 0);
        publish(&mut mem, AVAIL, 8, 0, &[3]);
        let p = view(&mut mem, |m| q.pop(m, &layout)).unwrap().unwrap();
        assert_eq!(p.head, 3);
        let c = p.chain.unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].addr, c[0].len, c[0].write_only), (BUF, 100, false));
        assert_eq!((c[1].index, c[1].write_only), (5, true));
        view(&mut mem, |m| q.add_used(m, 3, 8)).unwrap();
        let mut b = [0u8; 12];
        mem.read(USED, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 1, "used idx");
        assert_eq!(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), 3, "used id");
        assert_eq!(
            u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            8,
            "used len"
        );
        assert!(view(&mut mem, |m| q.pop(m, &layout)).unwrap().is_none());
    }

    fn pop_one(setup: impl FnOnce(&mut GuestAccess)) -> Result<Option<Popped>, QueueError> {
        let (vmem, _, layout) = ram();
        let mut mem = vmem.access();
        let mut q = queue(&layout);
        setup(&mut mem);
        view(&mut mem, |m| q.pop(m, &layout))
    }

    fn chain_err(setup: impl FnOnce(&mut GuestAccess)) -> ChainError {
        let p = pop_one(|m| {
            setup(m);
            publish(m, AVAIL, 8, 0, &[0]);
        })
        .unwrap()
        .unwrap();
        p.chain.unwrap_err()
    }

    #[test]
    fn loop_is_bounded_by_queue_size() {
        let e = chain_err(|m| {
            desc(m, DESC, 0, BUF, 4, F_NEXT, 1);
            desc(m, DESC, 1, BUF, 4, F_NEXT, 0);
        });
        assert_eq!(e, ChainError::TooLong { head: 0, size: 8 });
        let e = chain_err(|m| desc(m, DESC, 0, BUF, 4, F_NEXT, 0));
        assert_eq!(e, ChainError::TooLong { head: 0, size: 8 });
    }

    #[test]
    fn bad_descriptors_are_refused() {
        let e = chain_err(|m| desc(m, DESC, 0, BUF, 4, F_NEXT, 8));
        assert_eq!(
            e,
            ChainError::NextIndex {
                index: 0,
                next: 8,
                size: 8
            }
        );
        assert_eq!(
            chain_err(|m| desc(m, DESC, 0, BUF, 0, 0, 0)),
            ChainError::ZeroLength { index: 0 }
        );
        assert_eq!(
            chain_err(|m| desc(m, DESC, 0, BUF, 16, F_INDIRECT, 0)),
            ChainError::Indirect { index: 0 }
        );
        // Past the end of RAM, straddling it, and wrapping around.
        for (addr, len) in [(16 << 20, 4), ((16 << 20) - 2, 4), (u64::MAX - 1, 4)] {
            assert_eq!(
                chain_err(|m| desc(m, DESC, 0, addr, len, 0, 0)),
                ChainError::OutsideRam {
                    index: 0,
                    addr,
                    len
                }
            );
        }
    }

    #[test]
    fn corrupt_rings_are_fatal() {
        let r = pop_one(|m| m.write(AVAIL + 2, &9u16.to_le_bytes()).unwrap());
        assert!(
            matches!(r, Err(QueueError::AvailAhead { ahead: 9, .. })),
            "{r:?}"
        );
        let r = pop_one(|m| publish(m, AVAIL, 8, 0, &[8]));
        assert!(
            matches!(r, Err(QueueError::HeadIndex { head: 8, size: 8 })),
            "{r:?}"
        );
    }

    #[test]
    fn validate_rejects_bad_layouts() {
        let (_vmem, _, layout) = ram();
        let mut q = queue(&layout);
        q.set_unready();
        const END: u64 = 16 << 20;
        let outside = |area, addr, len| Err(LayoutError::OutsideRam { area, addr, len });
        let unaligned = |area, addr, align| Err(LayoutError::Unaligned { area, addr, align });
        for (size, d, a, u, want) in [
            (
                0,
                DESC,
                AVAIL,
                USED,
                Err(LayoutError::Size { size: 0, max: 8 }),
            ),
            (
                6,
                DESC,
                AVAIL,
                USED,
                Err(LayoutError::Size { size: 6, max: 8 }),
            ),
            (
                16,
                DESC,
                AVAIL,
                USED,
                Err(LayoutError::Size { size: 16, max: 8 }),
            ),
            (
                8,
                DESC + 8,
                AVAIL,
                USED,
                unaligned(RingArea::DescTable, DESC + 8, 16),
            ),
            (
                8,
                DESC,
                AVAIL + 1,
                USED,
                unaligned(RingArea::AvailRing, AVAIL + 1, 2),
            ),
            (
                8,
                DESC,
                AVAIL,
                USED + 2,
                unaligned(RingArea::UsedRing, USED + 2, 4),
            ),
            (8, END, AVAIL, USED, outside(RingArea::DescTable, END, 128)),
            (
                8,
                END - 112,
                AVAIL,
                USED,
                outside(RingArea::DescTable, END - 112, 128),
            ),
            (
                8,
                DESC,
                END - 20,
                USED,
                outside(RingArea::AvailRing, END - 20, 22),
            ),
            (
                8,
                DESC,
                AVAIL,
                END - 8,
                outside(RingArea::UsedRing, END - 8, 70),
            ),
            (
                8,
                DESC,
                AVAIL,
                u64::MAX - 3,
                outside(RingArea::UsedRing, u64::MAX - 3, 70),
            ),
            // Rings that end at (or, aligned, just before) the end of RAM.
            (8, END - 128, END - 22, END - 72, Ok(())),
            (1, DESC, AVAIL, USED, Ok(())),
        ] {
            q.size = size;
            q.desc_table = d;
            q.avail_ring = a;
            q.used_ring = u;
            assert_eq!(q.validate(&layout), want, "{size} {d:#x} {a:#x} {u:#x}");
        }
    }

    #[test]
    fn buffers_are_checked_for_their_whole_length() {
        const END: u64 = 16 << 20;
        // Ending exactly at the end of RAM, or in the low memory the
        // balloon never releases: a buffer may be anywhere in RAM.
        for (addr, len) in [(END - 4, 4), (END - 4096, 4096), (0x1000, 4), (0, 1)] {
            let p = pop_one(|m| {
                desc(m, DESC, 0, addr, len, 0, 0);
                publish(m, AVAIL, 8, 0, &[0]);
            })
            .unwrap()
            .unwrap();
            let c = p
                .chain
                .unwrap_or_else(|e| panic!("{addr:#x}+{len:#x}: {e}"));
            assert_eq!((c[0].addr, c[0].len), (addr, len));
        }
        // Starting inside RAM and running past its end (only the first
        // byte is RAM), and far past the end of RAM.
        for (addr, len) in [
            (END - 4096, 4097),
            (END - 1, 2),
            (0x40_0000, u32::MAX),
            (1 << 40, 4),
            (END, 1),
        ] {
            assert_eq!(
                chain_err(|m| desc(m, DESC, 0, addr, len, 0, 0)),
                ChainError::OutsideRam {
                    index: 0,
                    addr,
                    len
                },
                "{addr:#x}+{len:#x}"
            );
        }
        // The bad descriptor in the middle of a chain.
        let e = chain_err(|m| {
            desc(m, DESC, 0, BUF, 8, F_NEXT, 4);
            desc(m, DESC, 4, END - 2, 4, F_NEXT, 2);
            desc(m, DESC, 2, BUF, 8, 0, 0);
        });
        assert_eq!(
            e,
            ChainError::OutsideRam {
                index: 4,
                addr: END - 2,
                len: 4
            }
        );
        let e = chain_err(|m| {
            desc(m, DESC, 0, BUF, 8, F_NEXT, 6);
            desc(m, DESC, 6, BUF, 0, F_NEXT, 2);
            desc(m, DESC, 2, BUF, 8, 0, 0);
        });
        assert_eq!(e, ChainError::ZeroLength { index: 6 });
    }

    #[test]
    fn read_chain_refuses_writable_and_big() {
        let (vmem, _, _layout) = ram();
        let mut mem = vmem.access();
        let d = |write_only, len| Desc {
            index: 0,
            addr: BUF,
            len,
            write_only,
        };
        assert_eq!(
            view(&mut mem, |m| read_chain(m, &[d(true, 4)], 64)),
            Err(ChainReadError::WriteOnly { index: 0 })
        );
        assert_eq!(
            view(&mut mem, |m| read_chain(m, &[d(false, 65)], 64)),
            Err(ChainReadError::TooBig { total: 65, max: 64 })
        );
        assert_eq!(
            view(&mut mem, |m| read_chain(m, &[d(false, 8)], 64))
                .unwrap()
                .len(),
            8
        );
    }

    fn discarded_at(e: &ChainReadError) -> Option<u64> {
        match e {
            ChainReadError::Discarded { gpa, .. } => Some(*gpa),
            _ => None,
        }
    }

    /// A page released by free page reporting is refused by the view, then
    /// faulted back in (zeros) outside the read section and the step run
    /// again: buffers, the descriptor table, the available and used rings.
    #[test]
    fn discarded_pages_are_faulted_in_and_retried() {
        use crate::vstate::memory::ReleaseMode;
        let (vmem, _, layout) = ram();
        let mut mem = vmem.access();
        let mut q = queue(&layout);
        desc(&mut mem, DESC, 0, BUF, 8, 0, 0);
        mem.write(BUF, &[7u8; 8]).unwrap();
        publish(&mut mem, AVAIL, 8, 0, &[0]);
        vmem.release(&[(BUF, 4096)], ReleaseMode::Discard).unwrap();
        let p = view(&mut mem, |m| q.pop(m, &layout)).unwrap().unwrap();
        let c = p.chain.unwrap();
        assert_eq!(
            view(&mut mem, |m| read_chain(m, &c, 64)),
            Err(ChainReadError::Discarded { index: 0, gpa: BUF })
        );
        let bytes = mem
            .with_view(2, |m| read_chain(m, &c, 64), discarded_at)
            .unwrap();
        assert_eq!(bytes, vec![0u8; 8], "a discarded page reads zeros");
        // Without rounds left the error is the caller's.
        vmem.release(&[(BUF, 4096)], ReleaseMode::Discard).unwrap();
        assert!(matches!(
            mem.with_view(0, |m| read_chain(m, &c, 64), discarded_at),
            Err(ChainReadError::Discarded { .. })
        ));

        // The used ring: the element and the index land after the fault-in.
        vmem.release(&[(USED, 4096)], ReleaseMode::Discard).unwrap();
        assert!(matches!(
            view(&mut mem, |m| q.add_used(m, 0, 8)),
            Err(QueueError::Discarded(Discarded {
                area: RingArea::UsedRing,
                gpa: USED
            }))
        ));
        assert_eq!(q.next_used(), 0, "nothing published");
        mem.with_view(2, |m| q.add_used(m, 0, 8), QueueError::discarded_at)
            .unwrap();
        let mut b = [0u8; 12];
        mem.read(USED, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 1, "used idx");
        assert_eq!(u32::from_le_bytes([b[8], b[9], b[10], b[11]]), 8);

        // The descriptor table: the pop is undone, then done again on the
        // zeroed table (a zero-length descriptor now).
        publish(&mut mem, AVAIL, 8, 1, &[0]);
        vmem.release(&[(DESC, 4096)], ReleaseMode::Discard).unwrap();
        assert!(matches!(
            view(&mut mem, |m| q.pop(m, &layout)),
            Err(QueueError::Discarded(Discarded {
                area: RingArea::DescTable,
                ..
            }))
        ));
        assert_eq!(q.next_avail(), 1, "the pop was undone");
        let p = mem
            .with_view(2, |m| q.pop(m, &layout), QueueError::discarded_at)
            .unwrap()
            .unwrap();
        assert_eq!(p.chain, Err(ChainError::ZeroLength { index: 0 }));
        assert_eq!(q.next_avail(), 2);

        // The available ring of a fresh queue: empty after the fault-in.
        let mut q = queue(&layout);
        vmem.release(&[(AVAIL, 4096)], ReleaseMode::Discard)
            .unwrap();
        let r = mem.with_view(2, |m| q.pop(m, &layout), QueueError::discarded_at);
        assert!(r.unwrap().is_none());
    }

    /// A ring in a ballooned page cannot be read: an error, not a retry.
    #[test]
    fn ballooned_ring_is_an_error() {
        use crate::vstate::memory::ReleaseMode;
        let (vmem, _, layout) = ram();
        let mut mem = vmem.access();
        let mut q = queue(&layout);
        desc(&mut mem, DESC, 0, BUF, 8, 0, 0);
        publish(&mut mem, AVAIL, 8, 0, &[0]);
        vmem.release(&[(AVAIL, 4096)], ReleaseMode::Balloon)
            .unwrap();
        let r = mem.with_view(4, |m| q.pop(m, &layout), QueueError::discarded_at);
        assert!(
            matches!(
                r,
                Err(QueueError::Memory {
                    area: RingArea::AvailRing,
                    ..
                })
            ),
            "{r:?}"
        );
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("available ring"), "{msg}");
    }
}

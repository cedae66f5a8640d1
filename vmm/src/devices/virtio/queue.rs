//! The split virtqueue (virtio 1.2 §2.7), device side, over the fast walk.
//!
//! The descriptor table, the available ring and the used ring are guest
//! memory written by a driver we do not trust. Every access goes through
//! [`GuestAccess`] (the stage-2 fast walk: a released or ballooned page is
//! refused, never read), and every guest-controlled value is checked before
//! it is used:
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
//! A bad *chain* is a [`ChainError`]: the device answers the head with an
//! empty used element and goes on. A bad *ring* is a [`QueueError`]: the
//! device cannot know what the driver meant and asks for a reset.
//!
//! Ordering: the available index is read before the ring entries it
//! publishes (Acquire fence after the read); used elements are written
//! before the used index (Release fence before it).

use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use guest_mm::mutation::{broken, Rule};

use super::RamLayout;
use crate::vstate::memory::{GuestAccess, Stage2Error};

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
    /// The rings themselves could not be read or written.
    #[error("accessing the virtqueue rings failed: {0}")]
    Memory(#[from] Stage2Error),
    /// Used before `QueueReady`.
    #[error("queue used before the driver made it ready")]
    NotReady,
}

/// One of the three areas of a split virtqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingArea {
    /// The descriptor table.
    DescTable,
    /// The available (driver) ring.
    AvailRing,
    /// The used (device) ring.
    UsedRing,
}

impl std::fmt::Display for RingArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RingArea::DescTable => "descriptor table",
            RingArea::AvailRing => "available ring",
            RingArea::UsedRing => "used ring",
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

/// Device-side state of one split virtqueue.
#[derive(Debug, Clone, Default)]
pub struct Queue {
    /// Largest size the device supports.
    pub max_size: u16,
    /// Size chosen by the driver (`QueueNum`).
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table GPA.
    pub desc_table: u64,
    /// Available (driver) ring GPA.
    pub avail_ring: u64,
    /// Used (device) ring GPA.
    pub used_ring: u64,
    next_avail: u16,
    next_used: u16,
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
        Ok(())
    }

    fn read_u16(mem: &mut GuestAccess, gpa: u64) -> Result<u16, Stage2Error> {
        let mut b = [0u8; 2];
        mem.read(gpa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Pops the next available chain, validating it. `Ok(None)` if the ring
    /// is empty; `Err` if the ring itself is corrupt.
    pub fn pop(
        &mut self,
        mem: &mut GuestAccess,
        ram: &RamLayout,
    ) -> Result<Option<Popped>, QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        let avail = Self::read_u16(mem, self.avail_ring + 2)?;
        // The ring entries published by this index are read after it.
        fence(Ordering::Acquire);
        let ahead = avail.wrapping_sub(self.next_avail);
        if ahead == 0 {
            return Ok(None);
        }
        if ahead > self.size {
            return Err(QueueError::AvailAhead {
                avail,
                next: self.next_avail,
                ahead,
                size: self.size,
            });
        }
        let slot = u64::from(self.next_avail % self.size);
        let head = Self::read_u16(mem, self.avail_ring + 4 + 2 * slot)?;
        if head >= self.size {
            return Err(QueueError::HeadIndex {
                head,
                size: self.size,
            });
        }
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(Popped {
            head,
            chain: self.walk_chain(mem, ram, head),
        }))
    }

    fn walk_chain(
        &self,
        mem: &mut GuestAccess,
        ram: &RamLayout,
        head: u16,
    ) -> Result<Vec<Desc>, ChainError> {
        let mut out = Vec::new();
        let mut index = head;
        loop {
            if out.len() >= usize::from(self.size) {
                return Err(ChainError::TooLong {
                    head,
                    size: self.size,
                });
            }
            let mut raw = [0u8; 16];
            mem.read(self.desc_table + 16 * u64::from(index), &mut raw)
                .map_err(|e| ChainError::Memory {
                    index,
                    err: e.to_string(),
                })?;
            let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = raw;
            let addr = u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]);
            let len = u32::from_le_bytes([l0, l1, l2, l3]);
            let flags = u32::from(u16::from_le_bytes([f0, f1]));
            let next = u16::from_le_bytes([n0, n1]);
            if flags & VRING_DESC_F_INDIRECT != 0 {
                return Err(ChainError::Indirect { index });
            }
            if len == 0 && !broken(Rule::DescLength) {
                return Err(ChainError::ZeroLength { index });
            }
            // (A mutation build may check only the first byte, or nothing.)
            let checked_len = if broken(Rule::DescLength) {
                1
            } else {
                u64::from(len)
            };
            if !broken(Rule::DescAddress) && !ram.contains(addr, checked_len) {
                return Err(ChainError::OutsideRam { index, addr, len });
            }
            out.push(Desc {
                index,
                addr,
                len,
                write_only: flags & VRING_DESC_F_WRITE != 0,
            });
            if flags & VRING_DESC_F_NEXT == 0 {
                return Ok(out);
            }
            if next >= self.size {
                return Err(ChainError::NextIndex {
                    index,
                    next,
                    size: self.size,
                });
            }
            index = next;
        }
    }

    /// Returns chain `head` to the driver with `len` bytes written.
    pub fn add_used(
        &mut self,
        mem: &mut GuestAccess,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        let slot = u64::from(self.next_used % self.size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write(self.used_ring + 4 + 8 * slot, &elem)?;
        // The element is visible before the index that publishes it.
        fence(Ordering::Release);
        self.next_used = self.next_used.wrapping_add(1);
        mem.write(self.used_ring + 2, &self.next_used.to_le_bytes())?;
        Ok(())
    }

    /// The device's next available index (for tests and tools).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The device's next used index.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }
}

/// Reads a whole device-readable chain into one buffer of at most `max`
/// bytes. Refuses device-writable descriptors and chains longer than `max`.
pub fn read_chain(
    mem: &mut GuestAccess,
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
        mem.read(d.addr, &mut out[at..at + n])
            .map_err(|e| ChainReadError::Memory {
                index: d.index,
                err: e.to_string(),
            })?;
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
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{desc, publish, ram};
    use super::*;

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
        q.ready = true;
        q
    }

    #[test]
    fn good_chain_pops_and_returns() {
        let (vmem, _, layout) = ram();
        let mut mem = vmem.access();
        let mut q = queue(&layout);
        assert!(q.pop(&mut mem, &layout).unwrap().is_none());
        desc(&mut mem, DESC, 3, BUF, 100, F_NEXT, 5);
        desc(&mut mem, DESC, 5, BUF + 4096, 8, F_WRITE, 0);
        publish(&mut mem, AVAIL, 8, 0, &[3]);
        let p = q.pop(&mut mem, &layout).unwrap().unwrap();
        assert_eq!(p.head, 3);
        let c = p.chain.unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].addr, c[0].len, c[0].write_only), (BUF, 100, false));
        assert_eq!((c[1].index, c[1].write_only), (5, true));
        q.add_used(&mut mem, 3, 8).unwrap();
        let mut b = [0u8; 12];
        mem.read(USED, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 1, "used idx");
        assert_eq!(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), 3, "used id");
        assert_eq!(
            u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            8,
            "used len"
        );
        assert!(q.pop(&mut mem, &layout).unwrap().is_none());
    }

    fn pop_one(setup: impl FnOnce(&mut GuestAccess)) -> Result<Option<Popped>, QueueError> {
        let (vmem, _, layout) = ram();
        let mut mem = vmem.access();
        let mut q = queue(&layout);
        setup(&mut mem);
        q.pop(&mut mem, &layout)
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
        q.ready = false;
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
            read_chain(&mut mem, &[d(true, 4)], 64),
            Err(ChainReadError::WriteOnly { index: 0 })
        );
        assert_eq!(
            read_chain(&mut mem, &[d(false, 65)], 64),
            Err(ChainReadError::TooBig { total: 65, max: 64 })
        );
        assert_eq!(read_chain(&mut mem, &[d(false, 8)], 64).unwrap().len(), 8);
    }
}

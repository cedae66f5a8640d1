//! virtio devices on the virtio-mmio transport (virtio 1.2, modern only).
//!
//! - [`mmio`]: the transport — register file, feature negotiation, the
//!   device status state machine (with `NEEDS_RESET` on driver errors),
//!   queue set-up and `QueueNotify`.
//! - [`queue`]: the split virtqueue: rust-vmm's `virtio-queue` over a
//!   pinned [`guest_mm::GuestMemoryView`] of the stage-2 table, every
//!   guest-controlled value validated before use.
//! - [`balloon`]: virtio-balloon; inflate is a stage-2 unmap through the
//!   guest-mm gather.
//! - [`thread`]: the device thread, woken by a KVM ioeventfd per queue on
//!   `QueueNotify`, so a guest's notify does not run the device (and its
//!   releases) on the vCPU thread; the vCPU path stays as the fallback.
//!
//! **Invariants.** Nothing the guest writes (registers, rings, descriptors,
//! buffers) can make the host panic or touch memory outside guest RAM: ring
//! and buffer addresses are checked against [`RamLayout`] and then accessed
//! only through the stage-2 table (the fast walk, or a view pinned on it),
//! which refuses unmapped and ballooned pages.
//! A guest error is either counted (the request is answered with an empty
//! used element and the device goes on) or, when the rings themselves can no
//! longer be trusted, turns the device into `NEEDS_RESET` until the driver
//! resets it.
//!
//! **Interrupts.** The transport sets `InterruptStatus` (used buffer /
//! configuration change) and, given a trigger
//! ([`mmio::MmioTransport::set_interrupt`], an eventfd the VM registers as
//! a KVM irqfd), signals it when the driver wants an interrupt. Without one
//! (the embedded test guest) the driver polls the used ring and
//! `InterruptStatus`.
//!
//! **virtio-queue.** Constants come from `virtio-bindings`; the split ring's
//! state machine is rust-vmm's `virtio-queue` ([`virtio_queue::Queue`]:
//! available index and its bound, head pops, used elements and index with
//! their memory ordering, `needs_notification`). Its accessors take any
//! vm-memory `GuestMemory`, and the one we give them is a
//! [`guest_mm::GuestMemoryView`]: vm-memory's trait implemented by
//! translating through the stage-2 table inside a pinned read section of
//! the device's walker ([`crate::vstate::memory::GuestAccess::with_view`]).
//! So the crate keeps the fast walk's guarantee: it can reach only pages
//! the table maps as present (a ballooned, unmapped or discarded page is an
//! error, not a read), and no slice it uses outlives the section, which a
//! release's grace period waits for. Devices therefore pop and read a batch
//! in one section, release guest memory outside any section (holding one
//! across the gather would wait for itself), and return used elements in
//! another. A discarded page (free page reporting) is faulted back in
//! between two sections and the step retried, bounded. We walk descriptor
//! chains ourselves over the crate's `Descriptor` layout, because the
//! crate's chain iterator ends silently on a loop, a bad `next` or an
//! unreadable descriptor and follows indirect tables even when
//! `VIRTIO_RING_F_INDIRECT_DESC` is not negotiated; see [`queue`].

pub mod balloon;
pub mod mmio;
pub mod queue;
pub mod thread;

use guest_mm::mutation::{broken, Rule};

use crate::vstate::memory::RegionDesc;

/// Where the balloon's virtio-mmio window lives: in the 2 MiB MMIO page the
/// default guest already maps, one page above the report device (outside
/// every RAM size, which is at most 64 GiB).
pub const BALLOON_MMIO_BASE: u64 = crate::guest::layout::MMIO_BASE + 0x1000;
/// Size of a virtio-mmio window.
pub const MMIO_WINDOW: u64 = 0x1000;

/// Guest RAM as the devices see it: which guest-physical ranges are RAM, and
/// below which address the guest's own structures (page tables, descriptor
/// tables, stacks) live and must never be given away.
#[derive(Debug, Clone)]
pub struct RamLayout {
    regions: Vec<(u64, u64)>,
    reserved_below: u64,
}

impl RamLayout {
    /// The layout of `regions`; pages below `reserved_below` are RAM the
    /// guest may put rings in but never balloon or report.
    pub fn new(regions: &[RegionDesc], reserved_below: u64) -> Self {
        Self {
            regions: regions.iter().map(|r| (r.gpa.0, r.len)).collect(),
            reserved_below,
        }
    }

    /// Whether `[gpa, gpa + len)` is non-empty and inside one RAM region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        len != 0
            && self
                .regions
                .iter()
                .any(|&(s, l)| gpa >= s && len <= l && gpa - s <= l - len)
    }

    /// Whether `[gpa, gpa + len)` is RAM the guest may give back (balloon,
    /// free page reporting): inside RAM and not below the reserved limit.
    pub fn releasable(&self, gpa: u64, len: u64) -> bool {
        (gpa >= self.reserved_below || broken(Rule::BalloonReservedLow))
            && (self.contains(gpa, len) || broken(Rule::BalloonBounds))
    }

    /// First address that may be released.
    pub fn reserved_below(&self) -> u64 {
        self.reserved_below
    }
}

/// A device on the MMIO bus. Accesses come from vCPU threads (and tests);
/// implementations lock internally.
pub trait BusDevice: Send + Sync {
    /// A read of `data.len()` bytes at `offset` into the window.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` into the window.
    fn write(&self, offset: u64, data: &[u8]);
}

/// The MMIO devices of a VM: fixed windows, looked up on each exit.
#[derive(Default)]
pub struct MmioBus {
    devices: Vec<(u64, u64, std::sync::Arc<dyn BusDevice>)>,
}

impl std::fmt::Debug for MmioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w: Vec<_> = self.devices.iter().map(|(b, l, _)| (*b, *l)).collect();
        f.debug_struct("MmioBus").field("windows", &w).finish()
    }
}

impl MmioBus {
    /// Adds a device at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, dev: std::sync::Arc<dyn BusDevice>) {
        self.devices.push((base, len, dev));
    }

    /// The device and offset for `addr`, if any.
    pub fn find(&self, addr: u64) -> Option<(&dyn BusDevice, u64)> {
        self.devices
            .iter()
            .find(|(b, l, _)| addr >= *b && addr - *b < *l)
            .map(|(b, _, d)| (d.as_ref(), addr - b))
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Guest memory and its stage-2 table without KVM, for device unit tests.

    use super::RamLayout;
    use crate::vstate::memory::{GuestAccess, VmMemory};

    /// 16 MiB of anonymous 4K-page guest memory, an accessor of it (the
    /// fast walk) and its layout.
    pub(crate) fn ram() -> (VmMemory, GuestAccess, RamLayout) {
        let vmem = crate::vstate::memory::test_memory("16M");
        let layout = RamLayout::new(&vmem.regions(), 0x20_0000);
        let access = vmem.access();
        (vmem, access, layout)
    }

    /// Runs `f` on a pinned view of guest memory (one read section).
    pub(crate) fn view<R>(
        mem: &mut GuestAccess,
        f: impl FnOnce(&guest_mm::GuestMemoryView<'_>) -> R,
    ) -> R {
        let mut f = Some(f);
        mem.with_view(
            0,
            |m| Ok::<R, ()>(f.take().expect("called once")(m)),
            |_| None,
        )
        .expect("no error")
    }

    /// Writes one split-ring descriptor.
    pub(crate) fn desc(
        mem: &mut GuestAccess,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        mem.write(table + 16 * u64::from(i), &b)
            .expect("write desc");
    }

    /// Publishes `heads` in the available ring and sets its index.
    pub(crate) fn publish(mem: &mut GuestAccess, avail: u64, size: u16, start: u16, heads: &[u16]) {
        let mut idx = start;
        for &h in heads {
            let slot = u64::from(idx % size);
            mem.write(avail + 4 + 2 * slot, &h.to_le_bytes())
                .expect("write avail");
            idx = idx.wrapping_add(1);
        }
        mem.write(avail + 2, &idx.to_le_bytes()).expect("avail idx");
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::ram;

    const END: u64 = 16 << 20;
    const FLOOR: u64 = 0x20_0000;

    /// Guards the rules `balloon_bounds` and `balloon_reserved_low`.
    #[test]
    fn releasable_is_ram_at_or_above_the_floor() {
        let (_vmem, _, l) = ram();
        assert_eq!(l.reserved_below(), FLOOR);
        for (gpa, len) in [(FLOOR, 4096), (END - 4096, 4096), (FLOOR, END - FLOOR)] {
            assert!(l.releasable(gpa, len), "{gpa:#x}+{len:#x}");
        }
        for (gpa, len, why) in [
            (0, 4096, "page 0"),
            (FLOOR - 4096, 4096, "last reserved page"),
            (FLOOR - 4096, 8192, "starts below the floor"),
            (END, 4096, "first page past RAM"),
            (END - 4096, 8192, "runs past RAM"),
            (1 << 40, 4096, "far past RAM"),
            (u64::MAX - 4095, 4096, "top of the address space"),
            (u64::MAX - 4095, 8192, "wraps around"),
        ] {
            assert!(!l.releasable(gpa, len), "{why}: {gpa:#x}+{len:#x}");
        }
    }

    #[test]
    fn contains_is_exactly_ram() {
        let (_vmem, _, l) = ram();
        assert!(l.contains(0, END));
        assert!(l.contains(END - 1, 1));
        assert!(l.contains(0, 1));
        for (gpa, len) in [(0, 0), (END, 1), (END - 1, 2), (0, END + 1), (u64::MAX, 2)] {
            assert!(!l.contains(gpa, len), "{gpa:#x}+{len:#x}");
        }
    }
}
